package fusefs

import (
	"strings"
	"testing"

	"github.com/spanpull/spanpull/ztoc"
)

// FuzzNewRoot feeds TOCs of arbitrary names, types and links: NewRoot
// either fails with an error or builds a tree whose counts add up.
func FuzzNewRoot(f *testing.F) {
	f.Add("a/b\x00dir\x00a/b/c\x00reg\x00d\x00hardlink:a/b/c\x00.wh.a\x00reg")
	f.Add("./\x00dir\x00x/.wh..wh..opq\x00reg\x00x\x00reg\x00x/y\x00dir")
	f.Add("../x\x00reg")
	f.Add("a\x00reg\x00a/b\x00reg")
	f.Add("d/f\x00reg\x00h\x00hardlink:d/f\x00d\x00symlink:h\x00.wh.d\x00reg\x00d/g\x00char:1")
	f.Fuzz(func(t *testing.T, spec string) {
		parts := strings.Split(spec, "\x00")
		var files []ztoc.FileMetadata
		for i := 0; i+1 < len(parts); i += 2 {
			fm := ztoc.FileMetadata{Name: parts[i], Mode: int64(i) * 0o1234}
			typ, arg, _ := strings.Cut(parts[i+1], ":")
			fm.Type = typ
			switch typ {
			case ztoc.TypeHardlink, ztoc.TypeSymlink:
				fm.Linkname = arg
			case ztoc.TypeReg:
				fm.UncompressedOffset, fm.UncompressedSize = int64(len(arg))*1000, int64(len(arg))
			case ztoc.TypeChar, ztoc.TypeBlock:
				fm.Devmajor, fm.Devminor = int64(len(arg)), int64(i)
			}
			files = append(files, fm)
		}
		tr, err := buildTree(files)
		if err != nil {
			return
		}
		// every node reachable has as many names as links to it
		names := map[*node]uint32{}
		var walk func(n *node)
		walk = func(n *node) {
			for _, name := range n.dir.names {
				c := n.dir.children[name]
				if c == nil || name == "" || strings.Contains(name, "/") || name == "." || name == ".." {
					t.Fatalf("bad child %q -> %v", name, c)
				}
				if c.isDir() {
					walk(c)
				} else {
					names[c]++
				}
			}
		}
		walk(tr.root)
		for n, c := range names {
			if n.nlink != c {
				t.Fatalf("node %d has %d names but nlink %d", n.ino, c, n.nlink)
			}
		}
	})
}
