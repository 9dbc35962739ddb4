package ztoc

// Reader-side tests: reads through a zTOC return exactly the layer's bytes,
// and a layer that does not match the zTOC (other contents, a corrupt span,
// a truncated file) yields an error and never wrong bytes.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"testing"
	"time"
)

// cfReaderTar is a tar whose files all differ with seed but whose layout
// does not: two seeds give tars of the same size.
func cfReaderTar(t testing.TB, seed uint64) []byte {
	t.Helper()
	reg := func(name string, data []byte) cfEntry {
		return cfEntry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: cfTimeBase, Format: tar.FormatUSTAR}, data}
	}
	return cfWriteTar(t, []cfEntry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "r/", Mode: 0o755, ModTime: cfTimeBase, Format: tar.FormatUSTAR}},
		reg("r/a", cfRandom(seed*10+1, 100000)),
		reg("r/b", cfRandom(seed*10+2, 300000)),
		reg("r/empty", []byte{}),
		reg("r/c", cfRandom(seed*10+3, 50000)),
		reg("r/d", cfRandom(seed*10+4, 200000)),
		reg("r/tiny", cfRandom(seed*10+5, 10)),
	})
}

// cfStoredGzip gzips without compression: the blob's size depends only on
// the tar's size.
func cfStoredGzip(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.NoCompression)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// cfFileContents reads every regular file of tarball with archive/tar.
func cfFileContents(t testing.TB, tarball []byte) map[string][]byte {
	t.Helper()
	entries, _, err := cfReadTar(t, tarball)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, e := range entries {
		if e.data != nil {
			m[e.hdr.Name] = e.data
		}
	}
	return m
}

// cfReaderLayers are the layer flavours of the reader tests.
var cfReaderLayers = []struct {
	name     string
	compress func(testing.TB, []byte) []byte
}{
	{"tar", func(_ testing.TB, b []byte) []byte { return b }},
	{"gzip-stored", cfStoredGzip},
	{"gzip-6", func(t testing.TB, b []byte) []byte { return cfGzipCLI("-6")(t, b) }},
}

// cfMustReader builds blob's zTOC and a Reader over other.
func cfMustReader(t testing.TB, blob []byte, other io.ReaderAt, spanSize int64) (*Ztoc, *Reader) {
	t.Helper()
	z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize})
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewReader(z, other)
	if err != nil {
		t.Fatal(err)
	}
	return z, r
}

// cfFileSpans returns the first and last span of a regular file's data.
func cfFileSpans(spans []Span, f *FileMetadata) (SpanID, SpanID) {
	first, _ := SpanForOffset(spans, f.UncompressedOffset)
	last, _ := SpanForOffset(spans, f.UncompressedOffset+max(f.UncompressedSize-1, 0))
	return first, last
}

// TestReaderMismatchedLayer: a zTOC used on another layer of the same size
// fails with ErrSpanDigest and never passes on the other layer's bytes.
func TestReaderMismatchedLayer(t *testing.T) {
	tarA, tarB := cfReaderTar(t, 1), cfReaderTar(t, 2)
	want := cfFileContents(t, tarA)
	for _, l := range cfReaderLayers[:2] {
		t.Run(l.name, func(t *testing.T) {
			blobA, blobB := l.compress(t, tarA), l.compress(t, tarB)
			if len(blobA) != len(blobB) {
				t.Fatalf("layers of %d and %d bytes; the test needs equal sizes", len(blobA), len(blobB))
			}
			z, r := cfMustReader(t, blobA, bytes.NewReader(blobB), 16<<10)
			for i := range z.Files {
				f := &z.Files[i]
				if f.Type != TypeReg || f.UncompressedSize == 0 {
					continue
				}
				var got bytes.Buffer
				n, err := r.WriteFile(&got, f)
				if !errors.Is(err, ErrSpanDigest) {
					t.Errorf("WriteFile(%s) on the wrong layer: %d, %v; want ErrSpanDigest", f.Name, n, err)
				}
				if !bytes.HasPrefix(want[f.Name], got.Bytes()) || n != int64(got.Len()) {
					t.Errorf("WriteFile(%s) on the wrong layer wrote %d bytes (returned %d) that are not the file's", f.Name, got.Len(), n)
				}
			}
			p := make([]byte, z.UncompressedArchiveSize)
			n, err := r.ReadAt(p, 0)
			if !errors.Is(err, ErrSpanDigest) {
				t.Errorf("ReadAt on the wrong layer: %d, %v; want ErrSpanDigest", n, err)
			}
			if !bytes.Equal(p[:n], tarA[:n]) {
				t.Errorf("ReadAt on the wrong layer returned %d bytes that are not the layer's", n)
			}
		})
	}
}

// TestReaderCorruptSpan: one corrupt byte in a span makes the reads that
// need that span fail with ErrSpanDigest, after passing on only correct
// bytes; reads of other spans are unaffected.
func TestReaderCorruptSpan(t *testing.T) {
	tarball := cfReaderTar(t, 3)
	want := cfFileContents(t, tarball)
	for _, l := range cfReaderLayers {
		t.Run(l.name, func(t *testing.T) {
			blob := l.compress(t, tarball)
			z, _ := cfMustReader(t, blob, bytes.NewReader(blob), 16<<10)
			spans, err := z.Spans()
			if err != nil {
				t.Fatal(err)
			}
			// Corrupt the middle of the span holding the middle of r/b.
			b, err := z.Lookup("r/b")
			if err != nil {
				t.Fatal(err)
			}
			bad, _ := SpanForOffset(spans, b.UncompressedOffset+b.UncompressedSize/2)
			s := spans[bad]
			corrupt := bytes.Clone(blob)
			corrupt[(s.CompressedStart+s.CompressedEnd)/2] ^= 0xff
			r, err := NewReader(z, bytes.NewReader(corrupt))
			if err != nil {
				t.Fatal(err)
			}
			sawBad := false
			for i := range z.Files {
				f := &z.Files[i]
				if f.Type != TypeReg {
					continue
				}
				first, last := cfFileSpans(spans, f)
				var got bytes.Buffer
				n, err := r.WriteFile(&got, f)
				if f.UncompressedSize > 0 && first <= bad && bad <= last {
					sawBad = true
					if !errors.Is(err, ErrSpanDigest) || !strings.Contains(err.Error(), fmt.Sprintf("span %d", bad)) {
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
}

// TestReaderTruncatedLayer: reads that need bytes past the end of a
// truncated layer fail with a clear error; earlier spans still read.
func TestReaderTruncatedLayer(t *testing.T) {
	tarball := cfReaderTar(t, 4)
	want := cfFileContents(t, tarball)
	for _, l := range cfReaderLayers {
		t.Run(l.name, func(t *testing.T) {
			blob := l.compress(t, tarball)
			cut := int64(len(blob) / 2)
			z, r := cfMustReader(t, blob, bytes.NewReader(blob[:cut]), 16<<10)
			spans, err := z.Spans()
			if err != nil {
				t.Fatal(err)
			}
			for i := range z.Files {
				f := &z.Files[i]
				if f.Type != TypeReg {
					continue
				}
				_, last := cfFileSpans(spans, f)
				var got bytes.Buffer
				_, err := r.WriteFile(&got, f)
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
			_, r = cfMustReader(t, blob, bytes.NewReader(nil), 16<<10)
			if _, err := r.ReadAt(make([]byte, 10), 0); err == nil {
				t.Error("ReadAt from an empty blob succeeded")
			}
		})
	}
}

// TestReaderReadAt compares random ranges read through the zTOC with the
// tar stream, including ranges across spans and at the end.
func TestReaderReadAt(t *testing.T) {
	tarball := cfReaderTar(t, 5)
	for _, l := range cfReaderLayers {
		for _, spanSize := range []int64{16 << 10, 100000} {
			t.Run(fmt.Sprintf("%s/%d", l.name, spanSize), func(t *testing.T) {
				blob := l.compress(t, tarball)
				z, r := cfMustReader(t, blob, bytes.NewReader(blob), spanSize)
				size := z.UncompressedArchiveSize
				rng := rand.New(rand.NewPCG(1, 2))
				spans := r.Spans()
				check := func(off, n int64) {
					t.Helper()
					p := make([]byte, n)
					got, err := r.ReadAt(p, off)
					wantN := max(min(n, size-off), 0)
					if int64(got) != wantN || (wantN < n) != (err == io.EOF) || (err != nil && err != io.EOF) {
						t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d bytes (archive %d)", n, off, got, err, wantN, size)
						return
					}
					if !bytes.Equal(p[:got], tarball[off:off+int64(got)]) {
						t.Errorf("ReadAt(%d bytes at %d) differs at byte %d", n, off, cfFirstDiff(p[:got], tarball[off:]))
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
				if n, err := r.ReadAt(make([]byte, 0), 5); n != 0 || err != nil {
					t.Errorf("empty ReadAt = %d, %v", n, err)
				}
				if _, err := r.ReadAt(make([]byte, 1), -1); err == nil {
					t.Error("ReadAt at offset -1 succeeded")
				}
			})
		}
	}
}

// TestSpanPrimitives exercises FetchSpan, VerifySpan and InflateSpan: each
// span inflates to its part of the stream from its checkpoint alone.
func TestSpanPrimitives(t *testing.T) {
	tarball := cfReaderTar(t, 6)
	for _, l := range cfReaderLayers {
		t.Run(l.name, func(t *testing.T) {
			blob := l.compress(t, tarball)
			z, r := cfMustReader(t, blob, bytes.NewReader(blob), 16<<10)
			for _, s := range r.Spans() {
				got, comp, err := r.FetchSpan(s.ID)
				if err != nil {
					t.Fatalf("FetchSpan(%d): %v", s.ID, err)
				}
				if got.ID != s.ID || !bytes.Equal(comp, blob[s.CompressedStart:s.CompressedEnd]) {
					t.Fatalf("FetchSpan(%d) returned other bytes", s.ID)
				}
				if err := z.VerifySpan(s, comp); err != nil {
					t.Errorf("VerifySpan(%d): %v", s.ID, err)
				}
				if len(comp) > 0 {
					bad := bytes.Clone(comp)
					bad[len(bad)/2] ^= 1
					if err := z.VerifySpan(s, bad); !errors.Is(err, ErrSpanDigest) {
						t.Errorf("VerifySpan(%d, flipped byte) = %v", s.ID, err)
					}
					if err := z.VerifySpan(s, comp[:len(comp)-1]); !errors.Is(err, ErrSpanDigest) {
						t.Errorf("VerifySpan(%d, short) = %v", s.ID, err)
					}
				}
				end := min(s.UncompressedEnd, z.UncompressedArchiveSize)
				if end <= s.UncompressedStart {
					continue
				}
				whole := make([]byte, end-s.UncompressedStart)
				if err := InflateSpan(z.Algorithm, s, comp, s.UncompressedStart, whole); err != nil {
					t.Fatalf("InflateSpan(%d): %v", s.ID, err)
				}
				if !bytes.Equal(whole, tarball[s.UncompressedStart:end]) {
					t.Errorf("span %d inflates to other bytes", s.ID)
				}
				mid := s.UncompressedStart + (end-s.UncompressedStart)/2
				part := make([]byte, min(100, end-mid))
				if err := InflateSpan(z.Algorithm, s, comp, mid, part); err != nil || !bytes.Equal(part, tarball[mid:mid+int64(len(part))]) {
					t.Errorf("InflateSpan(%d, middle) = %v", s.ID, err)
				}
				if err := InflateSpan(z.Algorithm, s, comp, end-1, make([]byte, 2)); err == nil && end == s.UncompressedEnd {
					t.Errorf("InflateSpan(%d) past the span's end succeeded", s.ID)
				}
			}
			if _, _, err := r.FetchSpan(SpanID(z.NumSpans())); err == nil {
				t.Error("FetchSpan past the last span succeeded")
			}
			if _, _, err := r.FetchSpan(-1); err == nil {
				t.Error("FetchSpan(-1) succeeded")
			}
		})
	}
}

// cfFailWriter fails every write.
type cfFailWriter struct{ err error }

func (w cfFailWriter) Write([]byte) (int, error) { return 0, w.err }

// TestWriteFileErrors: WriteFile refuses non-regular entries and passes on
// the writer's error.
func TestWriteFileErrors(t *testing.T) {
	blob := cfReaderTar(t, 7)
	z, r := cfMustReader(t, blob, bytes.NewReader(blob), 16<<10)
	dir, err := z.Lookup("r")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.WriteFile(io.Discard, dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("WriteFile(directory) = %v", err)
	}
	f, err := z.Lookup("r/b")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("pipe closed")
	if _, err := r.WriteFile(cfFailWriter{boom}, f); !errors.Is(err, boom) {
		t.Errorf("WriteFile to a failing writer = %v", err)
	}
	if _, err := z.Lookup("r/missing"); err == nil || !strings.Contains(err.Error(), "r/missing") {
		t.Errorf("Lookup(missing) = %v", err)
	}
	// Lookup cleans paths.
	for _, p := range []string{"/r/b", "./r/b", "r//b", "r/./b"} {
		if g, err := z.Lookup(p); err != nil || g.Name != "r/b" {
			t.Errorf("Lookup(%q) = %v, %v", p, g, err)
		}
	}
}

// BenchmarkReadRandom4K measures reading a random 4 KiB range of the real
// Debian layer through its zTOC (default span size) from the local file:
// fetch, verify and partial inflate of the span(s) it falls in. It reports
// the median latency besides the mean (ns/op).
func BenchmarkReadRandom4K(b *testing.B) {
	path := cfDebianLayer(b)
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	z, _, err := Build(b.Context(), f, BuildOptions{})
	if err != nil {
		b.Fatal(err)
	}
	r, err := NewReader(z, f)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	p := make([]byte, 4096)
	var lat []time.Duration
	b.ResetTimer()
	for b.Loop() {
		off := rng.Int64N(z.UncompressedArchiveSize - int64(len(p)))
		start := time.Now()
		if n, err := r.ReadAt(p, off); n != len(p) || err != nil {
			b.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
		}
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "median-ns")
	}
}

// TestLookupHardlinkToReplacedFile: a hardlink refers to the entry of its
// target that precedes it in the archive. When that path is written again
// later, the link keeps the earlier contents (GNU tar and containerd unlink
// and recreate the path), so Lookup must not follow the link to the later
// entry.
func TestLookupHardlinkToReplacedFile(t *testing.T) {
	reg := func(name, data string) cfEntry {
		return cfEntry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: cfTimeBase}, []byte(data)}
	}
	tarball := cfWriteTar(t, []cfEntry{
		reg("a", "first version of a\n"),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "b", Linkname: "a", ModTime: cfTimeBase}},
		reg("a", "second version of a\n"),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "c", Linkname: "a", ModTime: cfTimeBase}},
	})
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6") {
		t.Run(c.name, func(t *testing.T) {
			blob := c.compress(t, tarball)
			z, r := cfMustReader(t, blob, bytes.NewReader(blob), 16<<10)
			for name, want := range map[string]string{"a": "second version of a\n", "b": "first version of a\n", "c": "second version of a\n"} {
				f, err := z.Lookup(name)
				if err != nil {
					t.Fatal(err)
				}
				var got bytes.Buffer
				if _, err := r.WriteFile(&got, f); err != nil || got.String() != want {
					t.Errorf("Lookup(%q) + WriteFile = %q, %v; GNU tar extracts %q", name, got.String(), err, want)
				}
			}
			cfCompareExtraction(t, z, r, cfExtract(t, cfWriteLayer(t, blob)))
		})
	}
}

// TestReaderConcurrent: one Reader serves concurrent reads (as the FUSE
// file system does); run with -race.
func TestReaderConcurrent(t *testing.T) {
	tarball := cfReaderTar(t, 8)
	blob := cfGzipCLI("-6")(t, tarball)
	z, r := cfMustReader(t, blob, bytes.NewReader(blob), 16<<10)
	want := cfFileContents(t, tarball)
	errs := make(chan error, 8)
	for g := range 8 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 50 {
				if rng.IntN(2) == 0 {
					f := &z.Files[rng.IntN(len(z.Files))]
					if f.Type != TypeReg {
						continue
					}
					var b bytes.Buffer
					if _, err := r.WriteFile(&b, f); err != nil || !bytes.Equal(b.Bytes(), want[f.Name]) {
						errs <- fmt.Errorf("concurrent WriteFile(%s): %v", f.Name, err)
						return
					}
					continue
				}
				off := rng.Int64N(z.UncompressedArchiveSize - 5000)
				p := make([]byte, 1+rng.IntN(5000))
				if n, err := r.ReadAt(p, off); err != nil || !bytes.Equal(p[:n], tarball[off:off+int64(n)]) {
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
