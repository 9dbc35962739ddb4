package span

// Reads of the stream and of files through a Layer return exactly the
// layer's bytes, and a blob that does not match the zTOC (other contents,
// a corrupt span, a truncated file) yields an error and never wrong bytes.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestLayerMismatchedBlob: a zTOC used on another layer of the same size
// fails with ErrSpanDigest and never passes on the other layer's bytes.
func TestLayerMismatchedBlob(t *testing.T) {
	ctx := context.Background()
	tarA, tarB := layertest.SeededTar(t, 1), layertest.SeededTar(t, 2)
	want := fileContents(t, tarA)
	for _, l := range readerLayers[:2] {
		t.Run(l.name, func(t *testing.T) {
			blobA, blobB := l.compress(t, tarA), l.compress(t, tarB)
			if len(blobA) != len(blobB) {
				t.Fatalf("layers of %d and %d bytes; the test needs equal sizes", len(blobA), len(blobB))
			}
			z, r := mustLayer(t, blobA, bytes.NewReader(blobB), 16<<10)
			for _, f := range regularFiles(z) {
				if f.UncompressedSize == 0 {
					continue
				}
				var got bytes.Buffer
				n, err := r.WriteFile(ctx, &got, f)
				if !errors.Is(err, ztoc.ErrSpanDigest) {
					t.Errorf("WriteFile(%s) on the wrong layer: %d, %v; want ErrSpanDigest", f.Name, n, err)
				}
				if !bytes.HasPrefix(want[f.Name], got.Bytes()) || n != int64(got.Len()) {
					t.Errorf("WriteFile(%s) on the wrong layer wrote %d bytes (returned %d) that are not the file's", f.Name, got.Len(), n)
				}
			}
			p := make([]byte, z.UncompressedArchiveSize)
			n, err := r.ReadAt(ctx, p, 0)
			if !errors.Is(err, ztoc.ErrSpanDigest) {
				t.Errorf("ReadAt on the wrong layer: %d, %v; want ErrSpanDigest", n, err)
			}
			if !bytes.Equal(p[:n], tarA[:n]) {
				t.Errorf("ReadAt on the wrong layer returned %d bytes that are not the layer's", n)
			}
		})
	}
}

// TestLayerCorruptSpanInFiles: one corrupt byte in a span makes the reads
// that need that span fail with ErrSpanDigest, after passing on only
// correct bytes; reads of other spans are unaffected.
func TestLayerCorruptSpanInFiles(t *testing.T) {
	ctx := context.Background()
	tarball := layertest.SeededTar(t, 3)
	want := fileContents(t, tarball)
	eachReaderLayer(t, tarball, func(t *testing.T, blob []byte) {
		z := build(t, blob, 16<<10)
		spans := mustSpans(t, z)
		// Corrupt the middle of the span holding the middle of r/b.
		b := mustLookup(t, z, "r/b")
		bad, _ := ztoc.SpanForOffset(spans, b.UncompressedOffset+b.UncompressedSize/2)
		s := spans[bad]
		corrupt := bytes.Clone(blob)
		corrupt[(s.CompressedStart+s.CompressedEnd)/2] ^= 0xff
		r := mustOpen(t, z, bytes.NewReader(corrupt), Options{})
		sawBad := false
		for _, f := range regularFiles(z) {
			first, last := fileSpans(spans, f)
			var got bytes.Buffer
			n, err := r.WriteFile(ctx, &got, f)
			if f.UncompressedSize > 0 && first <= bad && bad <= last {
				sawBad = true
				if !errors.Is(err, ztoc.ErrSpanDigest) || !strings.Contains(err.Error(), fmt.Sprintf("span %d", bad)) {
					t.Errorf("WriteFile(%s) across corrupt span %d: %v; want ErrSpanDigest naming the span", f.Name, bad, err)
				}
				if !bytes.HasPrefix(want[f.Name], got.Bytes()) || n != int64(got.Len()) {
					t.Errorf("WriteFile(%s) wrote %d bytes (returned %d) that are not the file's", f.Name, got.Len(), n)
				}
				if limit := s.UncompressedStart - f.UncompressedOffset; int64(got.Len()) > max(limit, 0) {
					t.Errorf("WriteFile(%s) wrote %d bytes, past the corrupt span's start (%d bytes in)", f.Name, got.Len(), limit)
				}
				continue
			}
			if err != nil || !bytes.Equal(got.Bytes(), want[f.Name]) {
				t.Errorf("WriteFile(%s), spans %d-%d away from corrupt span %d: %v", f.Name, first, last, bad, err)
			}
		}
		if !sawBad {
			t.Fatal("no file covers the corrupt span")
		}
	})
}

// TestLayerTruncatedBlob: reads that need bytes past the end of a
// truncated layer fail with a clear error; earlier spans still read.
func TestLayerTruncatedBlob(t *testing.T) {
	ctx := context.Background()
	tarball := layertest.SeededTar(t, 4)
	want := fileContents(t, tarball)
	eachReaderLayer(t, tarball, func(t *testing.T, blob []byte) {
		cut := int64(len(blob) / 2)
		z, r := mustLayer(t, blob, bytes.NewReader(blob[:cut]), 16<<10)
		spans := r.Spans()
		for _, f := range regularFiles(z) {
			_, last := fileSpans(spans, f)
			var got bytes.Buffer
			_, err := r.WriteFile(ctx, &got, f)
			if spans[last].CompressedEnd <= cut || f.UncompressedSize == 0 {
				if err != nil || !bytes.Equal(got.Bytes(), want[f.Name]) {
					t.Errorf("WriteFile(%s) from spans before the cut: %v", f.Name, err)
				}
				continue
			}
			if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), "span") {
				t.Errorf("WriteFile(%s) past the cut at %d: %v; want an unexpected-EOF error naming the span", f.Name, cut, err)
			}
			if !bytes.HasPrefix(want[f.Name], got.Bytes()) {
				t.Errorf("WriteFile(%s) past the cut wrote wrong bytes", f.Name)
			}
		}
		// An empty blob fails cleanly too.
		_, r = mustLayer(t, blob, bytes.NewReader(nil), 16<<10)
		if _, err := r.ReadAt(ctx, make([]byte, 10), 0); err == nil {
			t.Error("ReadAt from an empty blob succeeded")
		}
	})
}

// TestLayerReadAt compares random ranges read through the zTOC with the
// tar stream, including ranges across spans and at the end.
func TestLayerReadAt(t *testing.T) {
	ctx := context.Background()
	tarball := layertest.SeededTar(t, 5)
	for _, l := range readerLayers {
		for _, spanSize := range []int64{16 << 10, 100000} {
			t.Run(fmt.Sprintf("%s/%d", l.name, spanSize), func(t *testing.T) {
				blob := l.compress(t, tarball)
				z, r := mustLayer(t, blob, bytes.NewReader(blob), spanSize)
				size := z.UncompressedArchiveSize
				rng := rand.New(rand.NewPCG(1, 2))
				spans := r.Spans()
				check := func(off, n int64) {
					t.Helper()
					p := make([]byte, n)
					got, err := r.ReadAt(ctx, p, off)
					wantN := max(min(n, size-off), 0)
					if int64(got) != wantN || (wantN < n) != (err == io.EOF) || (err != nil && err != io.EOF) {
						t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d bytes (archive %d)", n, off, got, err, wantN, size)
						return
					}
					if !bytes.Equal(p[:got], tarball[off:off+int64(got)]) {
						t.Errorf("ReadAt(%d bytes at %d) differs at byte %d", n, off, firstDiff(p[:got], tarball[off:]))
					}
				}
				for range 200 {
					off := rng.Int64N(size)
					check(off, rng.Int64N(min(size-off, 3*spanSize))+1)
				}
				for _, s := range spans[1:] {
					check(s.UncompressedStart-1, 2)       // across the boundary
					check(s.UncompressedStart, 1)         // first byte of a span
					check(s.UncompressedStart-4096, 4096) // ends on the boundary
				}
				check(0, size)
				check(size-10, 100) // past the end: short read, io.EOF
				check(size, 1)
				if n, err := r.ReadAt(ctx, make([]byte, 0), 5); n != 0 || err != nil {
					t.Errorf("empty ReadAt = %d, %v", n, err)
				}
				if _, err := r.ReadAt(ctx, make([]byte, 1), -1); err == nil {
					t.Error("ReadAt at offset -1 succeeded")
				}
			})
		}
	}
}

// TestLayerFetchSpan: the one fetch path reads exactly each span's
// compressed bytes, and Prefetch refuses spans the layer does not have.
func TestLayerFetchSpan(t *testing.T) {
	tarball := layertest.SeededTar(t, 6)
	eachReaderLayer(t, tarball, func(t *testing.T, blob []byte) {
		z, r := mustLayer(t, blob, bytes.NewReader(blob), 16<<10)
		for _, s := range r.Spans() {
			fetch, err := r.openChunks(context.Background(), ClassDemand, s, 0, len(r.chunks[s.ID]))
			if err != nil {
				t.Fatalf("openChunks(%d): %v", s.ID, err)
			}
			comp, err := fetch.rest()
			fetch.Close()
			if err != nil || !bytes.Equal(comp, blob[s.CompressedStart:s.CompressedEnd]) {
				t.Fatalf("fetch of span %d: %d bytes, %v; want its compressed bytes", s.ID, len(comp), err)
			}
			if err := r.Prefetch(context.Background(), []ztoc.SpanID{s.ID}); err != nil {
				t.Fatalf("Prefetch(%d): %v", s.ID, err)
			}
		}
		if err := r.Prefetch(context.Background(), []ztoc.SpanID{ztoc.SpanID(z.NumSpans())}); err == nil {
			t.Error("Prefetch past the last span succeeded")
		}
		if err := r.Prefetch(context.Background(), []ztoc.SpanID{-1}); err == nil {
			t.Error("Prefetch(-1) succeeded")
		}
	})
}

// failWriter fails every write.
type failWriter struct{ err error }

func (w failWriter) Write([]byte) (int, error) { return 0, w.err }

// TestLayerWriteFileErrors: WriteFile refuses non-regular entries and
// passes on the writer's error.
func TestLayerWriteFileErrors(t *testing.T) {
	ctx := context.Background()
	blob := layertest.SeededTar(t, 7)
	z, r := mustLayer(t, blob, bytes.NewReader(blob), 16<<10)
	dir := mustLookup(t, z, "r")
	if _, err := r.WriteFile(ctx, io.Discard, dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("WriteFile(directory) = %v", err)
	}
	f := mustLookup(t, z, "r/b")
	boom := errors.New("pipe closed")
	if _, err := r.WriteFile(ctx, failWriter{boom}, f); !errors.Is(err, boom) {
		t.Errorf("WriteFile to a failing writer = %v", err)
	}
}

// BenchmarkLayerReadRandom4K measures reading a random 4 KiB range of the
// real Debian layer through its zTOC (default span size) from the local
// file, as a cold read: fetch, verify and inflate of the span(s) it falls
// in, up to the bytes the read needs. It reports the median latency of
// the reads (median-ns) besides the mean time per iteration (ns/op), which
// also counts opening and closing the Layer.
func BenchmarkLayerReadRandom4K(b *testing.B) {
	f, z := debianZtoc(b)
	coldReads4K(b, digest.FromString("debian"), z, LocalBlob(f))
}

// TestLayerConcurrent: one Layer serves concurrent reads of the stream and
// of files (as the FUSE file system does); run with -race.
func TestLayerConcurrent(t *testing.T) {
	tarball, blob, z := seededGzipLayer(t, 8)
	want := fileContents(t, tarball)
	for _, withCache := range []bool{false, true} {
		t.Run(fmt.Sprintf("cache=%t", withCache), func(t *testing.T) {
			var opts Options
			if withCache {
				opts.Cache = mustCache(t, t.TempDir(), CacheOptions{})
			}
			r := mustOpen(t, z, bytes.NewReader(blob), opts)
			concurrentReads(t, r, z, tarball, want)
		})
	}
}

// concurrentReads runs 8 readers of random files and ranges of r at once.
func concurrentReads(t *testing.T, r *Layer, z *ztoc.Ztoc, tarball []byte, want map[string][]byte) {
	ctx := context.Background()
	errs := make(chan error, 8)
	for g := range 8 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 50 {
				if rng.IntN(2) == 0 {
					f := &z.Files[rng.IntN(len(z.Files))]
					if f.Type != ztoc.TypeReg {
						continue
					}
					var b bytes.Buffer
					if _, err := r.WriteFile(ctx, &b, f); err != nil || !bytes.Equal(b.Bytes(), want[f.Name]) {
						errs <- fmt.Errorf("concurrent WriteFile(%s): %v", f.Name, err)
						return
					}
					continue
				}
				off := rng.Int64N(z.UncompressedArchiveSize - 5000)
				p := make([]byte, 1+rng.IntN(5000))
				if n, err := r.ReadAt(ctx, p, off); err != nil || !bytes.Equal(p[:n], tarball[off:off+int64(n)]) {
					errs <- fmt.Errorf("concurrent ReadAt(%d): %d, %v", off, n, err)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
