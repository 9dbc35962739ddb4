package fusefs

import (
	"fmt"
	"testing"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// syntheticTOC returns n entries laid out like a distro layer: 1% dirs,
// files 3 levels deep, some symlinks and hardlinks, parents listed first.
func syntheticTOC(n int) []ztoc.FileMetadata {
	files := make([]ztoc.FileMetadata, 0, n)
	mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	var off int64 = 512
	for len(files) < n {
		i := len(files)
		var f ztoc.FileMetadata
		switch d := fmt.Sprintf("./usr/d%03d/s%02d/", i/1000, i/100%10); {
		case i%100 == 0:
			f = ztoc.FileMetadata{Name: d, Type: ztoc.TypeDir, Mode: 0o755}
		case i%50 == 7:
			f = ztoc.FileMetadata{Name: fmt.Sprintf("%sl%07d", d, i), Type: ztoc.TypeSymlink, Linkname: "../target"}
		case i%50 == 9:
			f = ztoc.FileMetadata{Name: fmt.Sprintf("%sh%07d", d, i), Type: ztoc.TypeHardlink, Linkname: files[i-1].Name}
		default:
			f = ztoc.FileMetadata{Name: fmt.Sprintf("%sfile-%07d.so", d, i), Type: ztoc.TypeReg, Mode: 0o644,
				UncompressedOffset: off, UncompressedSize: 3000}
			off += 3584
		}
		f.ModTime = mtime
		files = append(files, f)
	}
	return files
}

// BenchmarkNewRoot measures building the tree at mount time; ns/entry
// must stay flat from 10k to 100k entries.
func BenchmarkNewRoot(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		files := syntheticTOC(n)
		benchNewTree(b, n, func() Entries { return Files(files) })
	}
}

// benchNewTree runs a sub-benchmark that builds a tree of the n entries
// that entries returns, called again for each build, and reports the
// time per entry.
func benchNewTree(b *testing.B, n int, entries func() Entries) {
	b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := NewTree(entries(), nil); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/entry")
	})
}

func TestSyntheticTOCBuilds(t *testing.T) {
	files := syntheticTOC(2000)
	tr, err := NewTree(Files(files), nil)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Len() < 1900 {
		t.Errorf("only %d nodes", tr.Len())
	}
}
