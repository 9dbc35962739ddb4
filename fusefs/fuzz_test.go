package fusefs

import (
	"strings"
	"testing"

	"github.com/spanpull/spanpull/ztoc"
)

// FuzzNewRoot feeds TOCs of arbitrary names, types and links: NewTree
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
		tr, err := NewTree(Files(files), nil)
		if err != nil {
			return
		}
		// every node reachable has as many names as links to it
		names := map[uint32]uint32{}
		reached := map[uint32]bool{0: true}
		var walk func(d uint32)
		walk = func(d uint32) {
			for _, e := range tr.children(d) {
				name := tr.name(&e)
				if name == "" || strings.Contains(name, "/") || name == "." || name == ".." || e.parent != d {
					t.Fatalf("bad child %q -> %d of %d", name, e.node, d)
				}
				reached[e.node] = true
				if tr.isDir(e.node) {
					walk(e.node)
				} else {
					names[e.node]++
				}
			}
		}
		walk(0)
		for n, c := range names {
			if tr.nodes[n].nlink != c {
				t.Fatalf("node %d has %d names but nlink %d", n, c, tr.nodes[n].nlink)
			}
		}
		if len(reached) != tr.Len() {
			t.Fatalf("%d of %d nodes are reachable", len(reached), tr.Len())
		}
	})
}
