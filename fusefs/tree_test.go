package fusefs

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

func meta(name, typ string) ztoc.FileMetadata {
	return ztoc.FileMetadata{Name: name, Type: typ, Mode: 0o644}
}

func link(name, typ, target string) ztoc.FileMetadata {
	f := meta(name, typ)
	f.Linkname = target
	return f
}

// nodeInfo is what the tests look at of a node.
type nodeInfo struct {
	index                       uint32
	mode, uid, nlink, rdev      uint32
	mtime                       int64
	mtimeNsec                   uint32
	target                      string
	whiteout, opaque, directory bool
}

func (n *nodeInfo) isDir() bool { return n.directory }

func info(tr *Tree, i uint32) *nodeInfo {
	n := &tr.nodes[i]
	ni := &nodeInfo{index: i, mode: n.mode & modeBits, uid: n.uid, nlink: n.nlink, mtime: n.mtime, mtimeNsec: n.nsec,
		whiteout: n.mode&flagWhiteout != 0, opaque: tr.opaque(i), directory: tr.isDir(i)}
	switch tr.typ(i) {
	case syscall.S_IFLNK:
		ni.target = tr.target(i)
	case syscall.S_IFCHR, syscall.S_IFBLK:
		ni.rdev = uint32(n.data)
	}
	return ni
}

// walk returns the node at a cleaned path, whiteouts included.
func walk(t *testing.T, tr *Tree, p string) *nodeInfo {
	t.Helper()
	n := uint32(0)
	if p == "" {
		return info(tr, n)
	}
	for _, c := range strings.Split(p, "/") {
		if !tr.isDir(n) {
			t.Fatalf("%s: %s is not a directory", p, c)
		}
		var ok bool
		if n, ok = tr.child(n, c); !ok {
			return nil
		}
	}
	return info(tr, n)
}

func TestNewRootErrors(t *testing.T) {
	dev := func(name string, major, minor int64) ztoc.FileMetadata {
		f := meta(name, ztoc.TypeChar)
		f.Devmajor, f.Devminor = major, minor
		return f
	}
	bad := func(name string, off, size int64) ztoc.FileMetadata {
		f := meta(name, ztoc.TypeReg)
		f.UncompressedOffset, f.UncompressedSize = off, size
		return f
	}
	for _, tc := range []struct {
		name  string
		files []ztoc.FileMetadata
		want  string // in the error, besides the entry name
		entry string
	}{
		{"hardlink missing", []ztoc.FileMetadata{link("h", ztoc.TypeHardlink, "nothere")}, "no such file", "h"},
		{"hardlink escaping", []ztoc.FileMetadata{link("h", ztoc.TypeHardlink, "../x")}, "no such file", "h"},
		{"symlink loop", []ztoc.FileMetadata{link("l", ztoc.TypeSymlink, "m"), link("m", ztoc.TypeSymlink, "l"), meta("l/x", ztoc.TypeReg)}, "symbolic links", "l/x"},
		{"long name", []ztoc.FileMetadata{meta("d/"+strings.Repeat("n", 256), ztoc.TypeReg)}, "longer than 255", "d/" + strings.Repeat("n", 256)},
		{"NUL in name", []ztoc.FileMetadata{meta("a\x00b", ztoc.TypeReg)}, "NUL", "a\x00b"},
		{"parent is a file via symlink", []ztoc.FileMetadata{meta("f", ztoc.TypeReg), link("l", ztoc.TypeSymlink, "/f"), meta("l/x", ztoc.TypeReg)}, "not a directory", "l/x"},
		{"hardlink to dir", []ztoc.FileMetadata{meta("d/", ztoc.TypeDir), link("h", ztoc.TypeHardlink, "d")}, "directory", "h"},
		{"hardlink to whiteout", []ztoc.FileMetadata{meta(".wh.x", ztoc.TypeReg), link("h", ztoc.TypeHardlink, "x")}, "no such file", "h"},
		{"empty symlink", []ztoc.FileMetadata{link("s", ztoc.TypeSymlink, "")}, "no target", "s"},
		{"unknown type", []ztoc.FileMetadata{meta("x", "sparse")}, "unsupported", "x"},
		{"device major", []ztoc.FileMetadata{dev("c", 4096, 0)}, "out of range", "c"},
		{"device minor", []ztoc.FileMetadata{dev("c", 1, 1<<20)}, "out of range", "c"},
		{"negative device", []ztoc.FileMetadata{dev("c", -1, 0)}, "out of range", "c"},
		{"negative size", []ztoc.FileMetadata{bad("f", 0, -1)}, "data range", "f"},
		{"negative offset", []ztoc.FileMetadata{bad("f", -5, 1)}, "data range", "f"},
		{"offset overflow", []ztoc.FileMetadata{bad("f", 1<<62, 1<<62)}, "data range", "f"},
		{"parent is a file", []ztoc.FileMetadata{meta("f", ztoc.TypeReg), meta("f/x", ztoc.TypeReg)}, `parent "f" is not a directory`, "f/x"},
		{"empty whiteout", []ztoc.FileMetadata{meta("a/.wh.", ztoc.TypeReg)}, "whiteout", "a/.wh."},
		{"dot whiteout", []ztoc.FileMetadata{meta("a/.wh..", ztoc.TypeReg)}, "whiteout", "a/.wh.."},
		{"dotdot whiteout", []ztoc.FileMetadata{meta(".wh...", ztoc.TypeReg)}, "whiteout", ".wh..."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewTree(Files(tc.files), nil)
			if err == nil {
				t.Fatal("NewTree succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.entry)) {
				t.Errorf("error %q does not say %q about entry %q", err, tc.want, tc.entry)
			}
		})
	}
	tree, err := NewTree(Files(nil), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewRoot(tree, nil, Options{}); err == nil {
		t.Error("NewRoot accepted a nil StreamReader")
	}
	if _, err := NewRoot(nil, &memSource{}, Options{}); err == nil {
		t.Error("NewRoot accepted a nil Tree")
	}
}

func TestTreeSemantics(t *testing.T) {
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	rootEntry := meta("./", ztoc.TypeDir)
	rootEntry.Mode, rootEntry.UID, rootEntry.ModTime = 0o700, 7, mtime
	redir := meta("d/", ztoc.TypeDir)
	redir.Mode = 0o711
	files := []ztoc.FileMetadata{
		rootEntry,
		// names are normalized
		meta("./a//b/", ztoc.TypeDir),
		meta("a/b/./c", ztoc.TypeReg),
		// later entries replace earlier ones
		meta("r", ztoc.TypeReg),
		link("r", ztoc.TypeSymlink, "target"),
		// a directory entry over a directory keeps the children
		meta("d/", ztoc.TypeDir),
		meta("d/child", ztoc.TypeReg),
		redir,
		// replacing a directory drops the names below it
		meta("gone/f", ztoc.TypeReg),
		link("h1", ztoc.TypeHardlink, "gone/f"),
		link("h2", ztoc.TypeHardlink, "./gone/f"),
		meta("gone", ztoc.TypeReg),
		// whiteouts hide lower layers only
		meta("x", ztoc.TypeReg),
		meta(".wh.x", ztoc.TypeReg),
		meta("y/", ztoc.TypeDir),
		meta(".wh.y", ztoc.TypeReg),
		meta(".wh.z", ztoc.TypeReg),
		meta("z/", ztoc.TypeDir),
		meta(".wh.w", ztoc.TypeReg),
		meta("w/f", ztoc.TypeReg),
		meta(".wh.v", ztoc.TypeReg),
		meta("v", ztoc.TypeReg),
		meta("s/.wh.lower", ztoc.TypeReg),
		// AUFS metadata is skipped; an opaque marker marks its dir
		meta(".wh..wh.plnk/123.456", ztoc.TypeReg),
		meta(".wh..wh..opq", ztoc.TypeReg),
	}
	tr, err := NewTree(Files(files), nil)
	if err != nil {
		t.Fatal(err)
	}
	root := walk(t, tr, "")
	if root.mode != syscall.S_IFDIR|0o700 || root.uid != 7 || root.mtime != mtime.Unix() || root.mtimeNsec != 123456789 {
		t.Errorf("root: mode %o uid %d mtime %d.%d", root.mode, root.uid, root.mtime, root.mtimeNsec)
	}
	if !root.opaque {
		t.Error("root is not opaque")
	}
	if n := walk(t, tr, "a/b/c"); n == nil || n.mode != syscall.S_IFREG|0o644 {
		t.Errorf("a/b/c = %+v", n)
	}
	if n := walk(t, tr, "r"); n == nil || n.target != "target" || n.mode&syscall.S_IFMT != syscall.S_IFLNK {
		t.Errorf("r = %+v", n)
	}
	if n := walk(t, tr, "d"); n == nil || n.mode != syscall.S_IFDIR|0o711 || walk(t, tr, "d/child") == nil {
		t.Errorf("d = %+v", n)
	}
	if n := walk(t, tr, "gone"); n == nil || n.isDir() {
		t.Errorf("gone = %+v", n)
	}
	if h1, h2 := walk(t, tr, "h1"), walk(t, tr, "h2"); h1 == nil || h2 == nil || h1.index != h2.index || h1.nlink != 2 {
		t.Errorf("h1 = %+v, h2 = %+v, want the same node with 2 names", h1, h2)
	}
	if n := walk(t, tr, "x"); n == nil || n.whiteout || n.mode&syscall.S_IFMT != syscall.S_IFREG {
		t.Errorf("x = %+v, want the regular file of this layer", n)
	}
	for _, p := range []string{"y", "z", "w"} {
		if n := walk(t, tr, p); n == nil || !n.isDir() || !n.opaque {
			t.Errorf("%s = %+v, want an opaque directory", p, n)
		}
	}
	if n := walk(t, tr, "v"); n == nil || n.whiteout {
		t.Errorf("v = %+v, want the regular file", n)
	}
	if n := walk(t, tr, "s/lower"); n == nil || !n.whiteout || n.mode != syscall.S_IFCHR || n.rdev != 0 {
		t.Errorf("s/lower = %+v, want a whiteout", n)
	}
	if walk(t, tr, ".wh..wh.plnk") != nil || walk(t, tr, ".wh..wh..opq") != nil {
		t.Error("AUFS metadata is shown")
	}
	// dirs: root a a/b d y z w s; files: c r d/child gone h1(=h2) x w/f v s/lower
	if tr.Len() != 8+9 {
		t.Errorf("tree counts %d nodes, want 17", tr.Len())
	}
}
