package span

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestLayerSequentialReadsInflateOnce: small reads through a span served
// from the disk cache inflate it once while memory holds it, and more
// often without memory.
func TestLayerSequentialReadsInflateOnce(t *testing.T) {
	tarball := textTar(t)
	blob := layertest.GzipCommand(t, tarball, "-6")
	z := build(t, blob, 256<<10)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	filled := mustOpen(t, z, bytes.NewReader(blob), Options{Cache: cache})
	if err := filled.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	filled.Close()
	for _, tc := range []struct {
		memory int64
		want   func(reads, inflations int64) bool
	}{
		{DefaultMemoryBytes, func(_, n int64) bool { return n == 1 }},
		{0, func(reads, n int64) bool { return n > 1 }},
	} {
		rb := newRecBlob(blob)
		l, err := NewLayer(filled.digest, z, rb, Options{Cache: cache, Memory: NewMemoryCache(tc.memory)})
		if err != nil {
			t.Fatal(err)
		}
		s := l.Spans()[2]
		var reads int64
		for off := s.UncompressedStart; off < s.UncompressedEnd; off += 4096 {
			readCheck(t, l, tarball, off, min(4096, s.UncompressedEnd-off))
			l.wg.Wait() // the next read starts a load of its own, never joins this one
			reads++
		}
		l.Close()
		if n := l.inflations.Load(); !tc.want(reads, n) || len(rb.requests()) != 0 {
			t.Errorf("memory %d: %d reads of a cached span inflated it %d times with %d range reads", tc.memory, reads, n, len(rb.requests()))
		}
	}
}

// BenchmarkLayerReadFilesWarm reads every regular file of the Debian layer
// from a warm disk cache (compressed spans) through a fresh Layer, with
// and without a MemoryCache: without one, every read of a file re-inflates
// its span from the checkpoint.
func BenchmarkLayerReadFilesWarm(b *testing.B) {
	f, z := debianZtoc(b)
	cache := mustCache(b, b.TempDir(), CacheOptions{})
	d := digest.FromString("debian")
	filler, err := NewLayer(d, z, LocalBlob(f), Options{Cache: cache})
	if err != nil {
		b.Fatal(err)
	}
	if err := filler.Fill(b.Context()); err != nil {
		b.Fatal(err)
	}
	filler.Close()
	for _, bc := range []struct {
		name   string
		memory int64
	}{{"memory=0", 0}, {"memory=64MiB", DefaultMemoryBytes}} {
		b.Run(bc.name, func(b *testing.B) {
			var total int64
			for b.Loop() {
				l, err := NewLayer(d, z, LocalBlob(f), Options{Cache: cache, Memory: NewMemoryCache(bc.memory)})
				if err != nil {
					b.Fatal(err)
				}
				for i := range z.Files {
					if fm := &z.Files[i]; fm.Type == ztoc.TypeReg {
						n, err := l.WriteFile(b.Context(), io.Discard, fm)
						if err != nil {
							b.Fatal(err)
						}
						total += n
					}
				}
				l.Close()
			}
			b.SetBytes(total / int64(b.N))
		})
	}
}
