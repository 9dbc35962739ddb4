package fusefs

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"

	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/treediff"
	"github.com/spanpull/spanpull/ztoc"
)

// tocFromTar returns the TOC of a tar as the indexer writes it: one entry
// per member, PAX global headers skipped. Unlike toctest.FromTar it
// accepts any name, so that fusefs's name rules can be tested whatever
// ztoc accepts.
func tocFromTar(t *testing.T, tarball []byte) []ztoc.FileMetadata {
	t.Helper()
	files, err := tocOf(tarball)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// tocOf is tocFromTar for the helper processes, which have no testing.T.
func tocOf(tarball []byte) ([]ztoc.FileMetadata, error) {
	types := map[byte]string{tar.TypeReg: ztoc.TypeReg, tar.TypeDir: ztoc.TypeDir, tar.TypeSymlink: ztoc.TypeSymlink,
		tar.TypeLink: ztoc.TypeHardlink, tar.TypeChar: ztoc.TypeChar, tar.TypeBlock: ztoc.TypeBlock, tar.TypeFifo: ztoc.TypeFifo}
	var files []ztoc.FileMetadata
	_, err := layertest.Walk(tarball, func(h *tar.Header, offset int64, _ io.Reader) error {
		if h.Typeflag == tar.TypeXGlobalHeader {
			return nil
		}
		f := ztoc.FileMetadata{Name: h.Name, Type: types[h.Typeflag], UncompressedOffset: offset, Linkname: h.Linkname,
			Mode: h.Mode, UID: uint32(h.Uid), GID: uint32(h.Gid), ModTime: h.ModTime.UTC(), Devmajor: h.Devmajor,
			Devminor: h.Devminor, PAXRecords: h.PAXRecords}
		if f.Type == ztoc.TypeReg {
			f.UncompressedSize = h.Size
		}
		files = append(files, f)
		return nil
	})
	return files, err
}

// applyContainerd unpacks tarball as containerd unpacks a layer into an
// overlayfs snapshot.
func applyContainerd(t *testing.T, tarball []byte) (string, error) {
	t.Helper()
	dir := t.TempDir()
	_, err := archive.Apply(context.Background(), dir, bytes.NewReader(tarball),
		archive.WithConvertWhiteout(archive.OverlayConvertWhiteout))
	return dir, err
}

// entry helpers with the fixed time of every test entry.
func reg(name string, mode int64, data string) layertest.Entry {
	e := layertest.Reg(name, mode, []byte(data))
	e.Header.ModTime = layertest.ModTime
	return e
}

func dir(name string, mode int64) layertest.Entry {
	e := layertest.Dir(name, mode)
	e.Header.ModTime = layertest.ModTime
	return e
}

func symlink(name, target string) layertest.Entry {
	e := layertest.Symlink(name, target)
	e.Header.ModTime = layertest.ModTime
	return e
}

// hardlink is a hardlink header carrying the metadata of its target (mode
// and time), as tar writers write them: containerd applies a hardlink's
// metadata to the shared inode, fusefs (like GNU tar) does not.
func hardlink(name, target string, mode int64) layertest.Entry {
	e := layertest.Hardlink(name, target)
	e.Header.ModTime, e.Header.Mode = layertest.ModTime, mode
	return e
}

func withOwner(e layertest.Entry, uid, gid int) layertest.Entry {
	e.Header.Uid, e.Header.Gid = uid, gid
	return e
}

func withXattrs(e layertest.Entry, kv ...string) layertest.Entry {
	e.Header.PAXRecords = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		e.Header.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	return e
}

// TestNameRulesMatchContainerd mounts layers whose names need cleaning,
// confining or resolving, and compares the mount with what containerd's
// own archive.Apply unpacks from the same tar for an overlayfs snapshot:
// every path, type, mode, owner, mtime, xattr, link target, device and
// content.
func TestNameRulesMatchContainerd(t *testing.T) {
	global := layertest.Entry{Header: tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header",
		PAXRecords: map[string]string{"comment": "global"}, Format: tar.FormatPAX}}
	for name, entries := range map[string][]layertest.Entry{
		"absolute": {
			dir("/", 0o700), dir("/abs/", 0o750), reg("/abs/file", 0o640, "absolute"), reg("/top", 0o600, "top"),
			reg("//double//slash", 0o644, "double"),
		},
		"dot": {
			dir("./", 0o711), reg("./a/b", 0o644, "b"), reg(".//c/./d", 0o644, "d"), dir("./e/./", 0o700),
			reg(".", 0o644, "the root as a file"),
		},
		"dotdot": {
			reg("../x", 0o644, "x"), reg("a/../../y", 0o644, "y"), reg("../../z/w", 0o644, "w"),
			reg("a/b/../../c", 0o644, "c"), dir("..", 0o700), dir("q/r/", 0o755), reg("q/r/../../../s", 0o644, "s"),
			reg("../q/../../t", 0o644, "t"),
		},
		"dir and file replacement": {
			// (containerd fails on a directory entry below a directory
			// that a file replaced: only implicit ones here.)
			dir("d/", 0o755), reg("d/child", 0o644, "child"), reg("d/sub/deep", 0o644, "deep"),
			reg("d", 0o600, "d is a file now"),
			reg("e", 0o644, "e is a file"), dir("e/", 0o711), reg("e/x", 0o644, "x"),
			withXattrs(dir("m/", 0o700), "trusted.first", "1", "trusted.both", "old"), reg("m/a", 0o644, "a"),
			withOwner(withXattrs(dir("m/", 0o755), "trusted.both", "new", "trusted.second", "2"), 5, 6),
			reg("f/g", 0o644, "g"), symlink("f", "elsewhere"),
		},
		"hardlinks": {
			reg("f", 0o644, "target"), hardlink("h1", "f", 0o644), hardlink("sub/h2", "../f", 0o644), hardlink("sub/h3", "/f", 0o644),
			hardlink("sub/h4", "sub/../f", 0o644), hardlink("sub/h5", "../../../f", 0o644), hardlink("h6", "./f", 0o644),
			reg("g", 0o600, "old g"), hardlink("hg", "g", 0o600), reg("g", 0o644, "new g"),
			reg("self", 0o644, "self"), hardlink("self2", "self", 0o644), hardlink("self", "self2", 0o644),
			dir("hd/", 0o755), reg("hd/in", 0o644, "in"), hardlink("out", "hd/in", 0o644), reg("hd", 0o644, "hd is a file"),
		},
		"symlink parents": {
			symlink("l", "/etc"), reg("l/passwd", 0o644, "not the host's"),
			symlink("rel", "d1/d2"), reg("rel/f", 0o644, "via a relative link"),
			symlink("up", "../../outside"), reg("up/f", 0o644, "confined"),
			dir("real/", 0o755), symlink("real/back", "../rel"), reg("real/back/g", 0o644, "two links"),
			hardlink("hl", "l/passwd", 0o644), hardlink("hl2", "up/f", 0o644),
			symlink("abs2", "/real/.."), reg("abs2/h", 0o644, "dotdot in a target"),
		},
		"duplicates": {
			reg("dup", 0o644, "first version"), reg("dup", 0o600, "second"), withOwner(reg("dup", 0o640, "third"), 7, 8),
			dir("dd/", 0o700), reg("dd/f", 0o644, "f"), dir("dd/", 0o755),
			symlink("sym", "one"), symlink("sym", "two"),
		},
		"whiteouts": {
			withOwner(reg(".wh.gone", 0o600, ""), 3, 4), reg("wd/.wh.x", 0o600, ""), dir("od/", 0o755),
			reg("od/.wh..wh..opq", 0o600, ""), reg("od/keep", 0o644, "keep"), reg(".wh.v", 0o600, ""),
			reg("v", 0o644, "v is back"), reg("/abs/.wh.y", 0o600, ""), reg("../.wh.z", 0o600, ""),
		},
		"global header": {
			global, reg("g1", 0o644, "after a global header"), global, dir("gd/", 0o755),
		},
		"xattrs and devices": {
			withXattrs(reg("x", 0o644, "x"), "user.a", "1", "trusted.b", "\x00\xff"),
			withXattrs(dir("xd/", 0o755), "trusted.dir", "d"),
			{Header: tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: layertest.ModTime}},
			{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "dev/blk", Mode: 0o660, Devmajor: 259, Devminor: 70000, ModTime: layertest.ModTime}},
			{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "dev/fifo", Mode: 0o644, ModTime: layertest.ModTime}},
			reg("setuid", 0o4755, "#!/bin/sh"),
		},
	} {
		t.Run(name, func(t *testing.T) {
			tarball := layertest.Tar(t, entries...)
			want, err := applyContainerd(t, tarball)
			if err != nil {
				t.Fatalf("containerd: %v", err)
			}
			files := tocFromTar(t, tarball)
			mnt := mountTOC(t, files, plainSource(tarball), Options{})
			compareTrees(t, want, mnt)
		})
	}
}

// TestNameRulesRejectAsContainerd checks that layers containerd refuses to
// unpack are refused.
func TestNameRulesRejectAsContainerd(t *testing.T) {
	for name, entries := range map[string][]layertest.Entry{
		"parent is a file":         {reg("f", 0o644, "f"), reg("f/x", 0o644, "x")},
		"parent is a file via ..":  {reg("f", 0o644, "f"), reg("../f/x", 0o644, "x")},
		"hardlink to nothing":      {hardlink("h", "missing", 0o644)},
		"hardlink out to nothing":  {reg("x", 0o644, "x"), hardlink("h", "../../y", 0o644)},
		"hardlink to a directory":  {dir("d/", 0o755), hardlink("h", "d", 0o644)},
		"hardlink to the root":     {hardlink("h", "..", 0o644)},
		"whiteout of nothing":      {reg("d/.wh.", 0o600, "")},
		"whiteout of the parent":   {reg("d/.wh..", 0o600, "")},
		"symlink loop":             {symlink("a", "b"), symlink("b", "a"), reg("a/x", 0o644, "x")},
		"hardlink removed by name": {dir("d/", 0o755), reg("d/f", 0o644, "f"), hardlink("d", "d/f", 0o644)},
	} {
		t.Run(name, func(t *testing.T) {
			tarball := layertest.Tar(t, entries...)
			if _, err := applyContainerd(t, tarball); err == nil {
				t.Fatal("containerd accepts the layer: the test is wrong")
			}
			if _, err := NewTree(Files(tocFromTar(t, tarball)), nil); err == nil {
				t.Error("NewTree accepts a layer containerd refuses")
			}
		})
	}
}

// compareTrees checks that the tree at got (a mount) is the tree at want
// (what containerd unpacked), the root's own attributes aside.
func compareTrees(t *testing.T, want, got string) {
	t.Helper()
	treediff.Compare(t, want, got, treediff.Options{Mtime: containerdMtime, SkipXattr: containerdRefuses})
}

// containerdMtime checks an entry's mtime against containerd's: containerd
// gives what it makes itself (parent directories, whiteouts) the current
// time; the mount shows 0 for the directories and the tar's time for the
// whiteouts. Everything from the tar has the tar's time on both sides.
func containerdMtime(rel string, w, g *syscall.Stat_t) string {
	wt, gt := time.Unix(w.Mtim.Unix()), time.Unix(g.Mtim.Unix())
	switch {
	case wt.Equal(layertest.ModTime):
		if g.Mtim != w.Mtim {
			return fmt.Sprintf("mtime %v, containerd %v", gt, wt)
		}
	case w.Mode&syscall.S_IFMT == syscall.S_IFDIR:
		if g.Mtim.Sec != 0 || g.Mtim.Nsec != 0 {
			return fmt.Sprintf("a directory made for its children has mtime %v, want 0", gt)
		}
	case w.Mode == syscall.S_IFCHR && w.Rdev == 0:
		if !gt.Equal(layertest.ModTime) {
			return fmt.Sprintf("a whiteout has mtime %v, want the tar's %v", gt, layertest.ModTime)
		}
	default:
		return fmt.Sprintf("containerd gave it the time %v, not the tar's", wt)
	}
	return ""
}

// containerdRefuses reports whether containerd leaves the xattr name of a
// tar out: it refuses trusted.* xattrs from a tar, which fusefs shows
// (TestMountMatchesGNUTar), except that both mark opaque directories.
func containerdRefuses(name string) bool {
	return strings.HasPrefix(name, "trusted.") && name != OpaqueXattr
}

// TestNameRulesOfTree checks how the rules place entries, at the tree
// level: what each rule does, and that nothing resolves outside the layer.
func TestNameRulesOfTree(t *testing.T) {
	files := []ztoc.FileMetadata{
		meta("/etc/passwd", ztoc.TypeReg),
		meta("a/../../etc/group", ztoc.TypeReg),
		meta("..", ztoc.TypeDir),
		meta("", ztoc.TypeReg),
		meta("./", ztoc.TypeReg),
		link("l", ztoc.TypeSymlink, "/etc"),
		meta("l/shadow", ztoc.TypeReg),
		link("h", ztoc.TypeHardlink, "../etc/passwd"),
		link("m", ztoc.TypeSymlink, "../../../.."),
		meta("m/top", ztoc.TypeReg),
	}
	var logs syncio.Buffer
	tr, err := NewTree(Files(files), testLogger(&logs))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"etc/passwd", "etc/group", "etc/shadow", "top"} {
		if n := walk(t, tr, p); n == nil || n.mode&syscall.S_IFMT != syscall.S_IFREG {
			t.Errorf("%s = %+v, want a file", p, n)
		}
	}
	if h, p := walk(t, tr, "h"), walk(t, tr, "etc/passwd"); h == nil || p == nil || h.index != p.index || h.nlink != 2 {
		t.Errorf("h = %+v, want etc/passwd's node (%+v)", h, p)
	}
	if got := strings.Count(logs.String(), "tar entry skipped"); got != 2 {
		t.Errorf("%d entries logged as skipped, want 2 (\"\" and \"./\"): %s", got, logs.String())
	}
	if !strings.Contains(logs.String(), "resolves to the layer root") {
		t.Errorf("log does not give the reason: %s", logs.String())
	}
	if _, err := NewTree(Files([]ztoc.FileMetadata{meta("../../..", ztoc.TypeReg)}), nil); err != nil {
		t.Errorf("a file named ../../.. is not skipped: %v", err)
	}
}
