package span

// Layers for the read tests: small tars of pseudo-random files, stored as
// plain tar, as gzip without compression and as gzip -6.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// layerKind is a layer flavour: how a tar is stored as a layer.
type layerKind struct {
	name     string
	compress func(testing.TB, []byte) []byte
}

// readerLayers are the layer flavours of the read tests.
var readerLayers = []layerKind{
	{"tar", func(_ testing.TB, b []byte) []byte { return b }},
	{"gzip-stored", func(t testing.TB, b []byte) []byte { return layertest.Gzip(t, b, gzip.NoCompression) }},
	{"gzip-6", func(t testing.TB, b []byte) []byte { return layertest.GzipCommand(t, b, "-6") }},
}

// eachReaderLayer runs fn as a subtest for every layer flavour of
// readerLayers, with tarball stored that way.
func eachReaderLayer(t *testing.T, tarball []byte, fn func(t *testing.T, blob []byte)) {
	for _, k := range readerLayers {
		t.Run(k.name, func(t *testing.T) { fn(t, k.compress(t, tarball)) })
	}
}

// fileContents reads every regular file of tarball with archive/tar.
func fileContents(t testing.TB, tarball []byte) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(tarball))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return m
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if m[h.Name], err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// build builds blob's zTOC with a deadline, so a hang fails the test.
func build(t testing.TB, blob []byte, spanSize int64) *ztoc.Ztoc {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	z, _, err := ztoc.Build(ctx, bytes.NewReader(blob), ztoc.BuildOptions{SpanSize: spanSize})
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// seededGzipLayer returns layertest.SeededTar(seed), that tar compressed
// with gzip -6 and the zTOC of the latter in 16 KiB spans.
func seededGzipLayer(t testing.TB, seed uint64) (tarball, blob []byte, z *ztoc.Ztoc) {
	t.Helper()
	tarball = layertest.SeededTar(t, seed)
	blob = layertest.GzipCommand(t, tarball, "-6")
	return tarball, blob, build(t, blob, 16<<10)
}

// mustLayer builds blob's zTOC and a Layer with no cache over other, as
// "indexer ztoc get-file" reads.
func mustLayer(t testing.TB, blob []byte, other io.ReaderAt, spanSize int64) (*ztoc.Ztoc, *Layer) {
	t.Helper()
	z := build(t, blob, spanSize)
	return z, mustOpen(t, z, other, Options{})
}

// mustOpen returns a Layer described by z over blob, closed when the test
// ends.
func mustOpen(t testing.TB, z *ztoc.Ztoc, blob io.ReaderAt, opts Options) *Layer {
	t.Helper()
	return newLayer(t, digest.FromString("layer"), z, LocalBlob(blob), opts)
}

// regularFiles returns the regular files of z, in archive order.
func regularFiles(z *ztoc.Ztoc) []*ztoc.FileMetadata {
	var fs []*ztoc.FileMetadata
	for i := range z.Files {
		if f := &z.Files[i]; f.Type == ztoc.TypeReg {
			fs = append(fs, f)
		}
	}
	return fs
}

// mustLookup returns the entry of z named name.
func mustLookup(t testing.TB, z *ztoc.Ztoc, name string) *ztoc.FileMetadata {
	t.Helper()
	f, err := z.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// fileSpans returns the first and last span of a regular file's data.
func fileSpans(spans []ztoc.Span, f *ztoc.FileMetadata) (ztoc.SpanID, ztoc.SpanID) {
	first, _ := ztoc.SpanForOffset(spans, f.UncompressedOffset)
	last, _ := ztoc.SpanForOffset(spans, f.UncompressedOffset+max(f.UncompressedSize-1, 0))
	return first, last
}

// firstDiff returns the first offset where a and b differ.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// debianZtoc opens the Debian layer (closed when the test ends) and builds
// its zTOC with the default options (4 MiB spans).
func debianZtoc(tb testing.TB) (*os.File, *ztoc.Ztoc) {
	tb.Helper()
	f, err := os.Open(layertest.DebianLayer(tb))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	z, _, err := ztoc.Build(tb.Context(), f, ztoc.BuildOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	return f, z
}

// coldReads4K reads a random 4 KiB range of z's stream through a fresh
// Layer over blob per iteration, as a cold read (fetch, verify and inflate
// of the span(s) it falls in, up to the bytes the read needs), and reports
// the median latency of the reads (median-ns) besides the mean time per
// iteration (ns/op), which also counts opening and closing the Layer.
func coldReads4K(b *testing.B, d digest.Digest, z *ztoc.Ztoc, blob BlobReader) {
	rng := rand.New(rand.NewPCG(3, 4))
	p := make([]byte, 4096)
	var lat []time.Duration
	for b.Loop() {
		l, err := NewLayer(d, z, blob, Options{})
		if err != nil {
			b.Fatal(err)
		}
		off := rng.Int64N(z.UncompressedArchiveSize - int64(len(p)))
		start := time.Now()
		if n, err := l.ReadAt(b.Context(), p, off); n != len(p) || err != nil {
			b.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
		}
		lat = append(lat, time.Since(start))
		l.Close()
	}
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "median-ns")
	}
}
