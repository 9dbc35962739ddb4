package fusefs

import (
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// generatedTOC yields n entries laid out like syntheticTOC, made on the
// fly so that no []FileMetadata exists: what the daemon does with
// ztoc.DecodeFiles.
func generatedTOC(n int) Entries {
	return func(fn func(*ztoc.FileMetadata) error) error {
		mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
		var off int64 = 512
		prev := ""
		var buf []byte
		name := func(dir []byte, prefix string, i int, suffix string) string {
			buf = append(append(buf[:0], dir...), prefix...)
			buf = strconv.AppendInt(buf, int64(10_000_000+i), 10)[1:]
			return string(append(buf, suffix...))
		}
		for i := range n {
			// ./usr/dNNN/sNN/
			dir := []byte("./usr/d000/s00/")
			dir[7], dir[8], dir[9] = byte('0'+i/100_000%10), byte('0'+i/10_000%10), byte('0'+i/1000%10)
			dir[12], dir[13] = byte('0'+i/100%10), '0'
			var f ztoc.FileMetadata
			switch {
			case i%100 == 0:
				f = ztoc.FileMetadata{Name: string(dir), Type: ztoc.TypeDir, Mode: 0o755}
			case i%50 == 7:
				f = ztoc.FileMetadata{Name: name(dir, "l", i, ""), Type: ztoc.TypeSymlink, Linkname: "../target"}
			case i%50 == 9:
				f = ztoc.FileMetadata{Name: name(dir, "h", i, ""), Type: ztoc.TypeHardlink, Linkname: prev}
			default:
				f = ztoc.FileMetadata{Name: name(dir, "f", i, ".so"), Type: ztoc.TypeReg, Mode: 0o644,
					UncompressedOffset: off, UncompressedSize: 3000}
				off += 3584
			}
			f.ModTime = mtime
			prev = f.Name
			if err := fn(&f); err != nil {
				return err
			}
		}
		return nil
	}
}

// treeHeap builds the tree of n generated entries and returns it with the
// live heap it holds and the time the build took.
func treeHeap(t testing.TB, n int) (*Tree, uint64, time.Duration) {
	before := liveHeap()
	start := time.Now()
	tr, err := NewTree(generatedTOC(n), nil)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	after := liveHeap()
	runtime.KeepAlive(tr)
	if after < before {
		t.Fatalf("live heap fell from %d to %d bytes while building a tree of %d entries: the measurement is off", before, after, n)
	}
	return tr, after - before, took
}

// liveHeap returns the bytes of live heap objects. Two collections: the
// garbage of an earlier test (a tree of a million entries, run with
// -count) may need a second one to be freed, and the first figure would
// then be too high.
func liveHeap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestTreeMemory measures the live heap of the tree of a layer of a
// million entries (and of 100,000, to see that the cost per entry does
// not grow), the figure the package documentation states.
func TestTreeMemory(t *testing.T) {
	for _, n := range []int{100_000, 1_000_000} {
		tr, heap, took := treeHeap(t, n)
		per := float64(heap) / float64(n)
		var names int
		for k := range tr.ents {
			names += int(tr.ents[k].nlen)
		}
		t.Logf("%d entries: %d nodes, %.1f MB live heap, %.1f bytes/entry (%.1f of them names), built in %v",
			n, tr.Len(), float64(heap)/1e6, per, float64(names)/float64(n), took)
		if per > 150 {
			t.Errorf("%d entries cost %.1f bytes of heap each, want at most 150", n, per)
		}
	}
}

// BenchmarkTreeBuild measures building the tree of generated entries
// (the generator's own cost included).
func BenchmarkTreeBuild(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		benchNewTree(b, n, func() Entries { return generatedTOC(n) })
	}
}
