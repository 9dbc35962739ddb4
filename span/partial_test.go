package span

// Partial spans: with chunk marks, a read fetches a span only through the
// chunk that covers it, and a later read fetches only the missing chunks.
// Windows from a WindowSource.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// chunkedLayer returns a gzip -6 layer of text in 256 KiB spans with
// chunk marks every 2 KiB of compressed bytes, and its tar stream.
func chunkedLayer(t *testing.T) (*ztoc.Ztoc, []byte, []byte) {
	t.Helper()
	tarball := textTar(t)
	blob := layertest.GzipCommand(t, tarball, "-6")
	z := build(t, blob, 256<<10)
	addChunks(t, z, blob, 2048)
	return z, blob, tarball
}

func readCheck(t *testing.T, l *Layer, tarball []byte, off, n int64) {
	t.Helper()
	p := make([]byte, n)
	got, err := l.ReadAt(context.Background(), p, off)
	if err != nil && !(err == io.EOF && off+int64(got) == int64(len(tarball))) {
		t.Fatalf("ReadAt(%d bytes at %d): %v", n, off, err)
	}
	if !bytes.Equal(p[:got], tarball[off:off+int64(got)]) {
		t.Fatalf("ReadAt(%d bytes at %d): wrong bytes", n, off)
	}
}

func TestLayerPartialSpans(t *testing.T) {
	z, blob, tarball := chunkedLayer(t)
	rb := newRecBlob(blob)
	cache, err := OpenCache(t.TempDir(), CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromBytes(blob)
	l, err := NewLayer(d, z, rb, Options{Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s := l.Spans()[2]
	chunks := z.Chunks[2]
	if len(chunks) < 8 {
		t.Fatalf("span 2 has %d chunks, want many", len(chunks))
	}
	// A small read near the span start fetches through the chunk covering it.
	readCheck(t, l, tarball, s.UncompressedStart+100, 50)
	reqs := rb.requests()
	k := 0
	for chunks[k].UncompressedEnd < s.UncompressedStart+150 {
		k++
	}
	if len(reqs) != 1 || reqs[0].off != s.CompressedStart || reqs[0].end != chunks[k].CompressedEnd {
		t.Fatalf("range reads %v, want one of [%d, %d) (span 2 through chunk %d)", reqs, s.CompressedStart, chunks[k].CompressedEnd, k)
	}
	waitFor(t, "span 2's prefix in the cache", func() bool {
		cached, _ := cache.size(d, s.ID)
		return cached == reqs[0].end-reqs[0].off
	})
	// A read at the span end fetches only what is missing.
	readCheck(t, l, tarball, s.UncompressedEnd-100, 100)
	reqs = rb.requests()
	if len(reqs) != 2 || reqs[1].off != reqs[0].end || reqs[1].end != s.CompressedEnd {
		t.Fatalf("range reads %v, want a second one of [%d, %d)", reqs, reqs[0].end, s.CompressedEnd)
	}
	waitFor(t, "span 2 cached whole", func() bool { return l.Cached(s.ID) })
	readCheck(t, l, tarball, s.UncompressedStart, s.UncompressedEnd-s.UncompressedStart)
	if n := len(rb.requests()); n != 2 {
		t.Fatalf("%d range reads after reading the whole span, want 2", n)
	}

	// A prefix cached by one Layer serves the next.
	s4 := l.Spans()[4]
	readCheck(t, l, tarball, s4.UncompressedStart, 10)
	prefix := rb.requests()[2]
	l.Close() // waits for the cache write
	l2, err := NewLayer(d, z, rb, Options{Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	defer l2.Close()
	readCheck(t, l2, tarball, s4.UncompressedStart+5, 5)
	readCheck(t, l2, tarball, s4.UncompressedEnd-10, 10)
	reqs = rb.requests()
	if len(reqs) != 4 || reqs[3].off != prefix.end || reqs[3].end != s4.CompressedEnd {
		t.Fatalf("range reads %v, want one more of [%d, %d)", reqs[2:], prefix.end, s4.CompressedEnd)
	}
}

// TestLayerPartialSpanCorruptChunk: a corrupt chunk fails the reads that
// need it, naming it; the chunks before it still serve reads.
func TestLayerPartialSpanCorruptChunk(t *testing.T) {
	z, blob, tarball := chunkedLayer(t)
	s := mustSpans(t, z)[1]
	c := z.Chunks[1][5]
	bad := bytes.Clone(blob)
	bad[c.CompressedEnd-10] ^= 0xff
	l := mustOpen(t, z, bytes.NewReader(bad), Options{})
	readCheck(t, l, tarball, s.UncompressedStart, 100)
	_, err := l.ReadAt(context.Background(), make([]byte, 10), c.UncompressedEnd-5)
	if !errors.Is(err, ztoc.ErrSpanDigest) || !strings.Contains(err.Error(), "chunk 5") {
		t.Fatalf("read needing corrupt chunk 5: %v, want ErrSpanDigest naming the chunk", err)
	}
}

// waitFor waits until cond holds: the caches are written after the reads
// that needed the bytes returned.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s after 10s", what)
		}
	}
}

func mustSpans(t *testing.T, z *ztoc.Ztoc) []ztoc.Span {
	t.Helper()
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	return spans
}

// TestLayerPartialSpansRead: with chunk marks, random and sequential
// reads return the stream, for every kind of layer, with and without a
// cache; a span read from start to end takes a few range reads.
func TestLayerPartialSpansRead(t *testing.T) {
	tarball := textTar(t)
	kinds := append(readerLayers[:len(readerLayers):len(readerLayers)], struct {
		name     string
		compress func(testing.TB, []byte) []byte
	}{"gzip-members", func(t testing.TB, b []byte) []byte { return layertest.GzipCommandMembers(t, b, 100003, "-6") }})
	for _, k := range kinds {
		for _, withCache := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/cache=%t", k.name, withCache), func(t *testing.T) {
				blob := k.compress(t, tarball)
				z := build(t, blob, 128<<10)
				addChunks(t, z, blob, 1500)
				var opts Options
				if withCache {
					c, err := OpenCache(t.TempDir(), CacheOptions{})
					if err != nil {
						t.Fatal(err)
					}
					opts.Cache = c
				}
				rb := newRecBlob(blob)
				l, err := NewLayer(digest.FromBytes(blob), z, rb, opts)
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				rng := rand.New(rand.NewPCG(5, 6))
				for range 100 {
					off := rng.Int64N(int64(len(tarball)))
					readCheck(t, l, tarball, off, 1+rng.Int64N(40000))
				}
				l.Close()
				// Sequentially, 16 KiB at a time, on a fresh layer.
				rb = newRecBlob(blob)
				if opts.Cache != nil {
					c, err := OpenCache(t.TempDir(), CacheOptions{})
					if err != nil {
						t.Fatal(err)
					}
					opts.Cache = c
				}
				l, err = NewLayer(digest.FromBytes(blob), z, rb, opts)
				if err != nil {
					t.Fatal(err)
				}
				for off := int64(0); off < int64(len(tarball)); off += 16 << 10 {
					readCheck(t, l, tarball, off, 16<<10)
				}
				perSpan := map[ztoc.SpanID]int{}
				for _, r := range rb.requests() {
					perSpan[spanContaining(l.Spans(), r.off)]++
				}
				t.Logf("%d range reads for %d spans", len(rb.requests()), len(l.Spans()))
				for id, n := range perSpan {
					if chunks := len(z.Chunks[id]); n > 2+log4(chunks) {
						t.Errorf("span %d (%d chunks) read sequentially in %d range reads", id, chunks, n)
					}
				}
			})
		}
	}
}

// spanContaining returns the last span whose compressed bytes hold off
// (a span's first byte may be the previous span's last).
func spanContaining(spans []ztoc.Span, off int64) ztoc.SpanID {
	id := ztoc.SpanID(-1)
	for _, s := range spans {
		if off >= s.CompressedStart && off < s.CompressedEnd {
			id = s.ID
		}
	}
	return id
}

func log4(n int) int {
	k := 0
	for 1<<(2*k) < n {
		k++
	}
	return k
}

// windowSource hands out the windows a test took out of the span table,
// counting calls.
type windowSource struct {
	windows map[ztoc.SpanID][]byte
	mu      sync.Mutex
	calls   map[ztoc.SpanID]int
	// started, when set, is closed per span as its window is asked for;
	// blobStarted is closed per span as its range read starts. The window
	// waits for the range read, so a window asked for after (or before,
	// see the blob's hold) the span's bytes never comes.
	started, blobStarted map[ztoc.SpanID]chan struct{}
}

func (w *windowSource) Window(ctx context.Context, id ztoc.SpanID) ([]byte, error) {
	w.mu.Lock()
	w.calls[id]++
	w.mu.Unlock()
	if w.started != nil {
		close(w.started[id])
		select {
		case <-w.blobStarted[id]:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return w.windows[id], nil
}

// TestLayerWindowsFromSource: spans without a window get it from
// Options.Windows, once per span, in parallel with the span's bytes.
func TestLayerWindowsFromSource(t *testing.T) {
	tarball := layertest.SeededTar(t, 10)
	blob := layertest.GzipCommand(t, tarball, "-6")
	z := build(t, blob, 16<<10)
	spans := mustSpans(t, z)
	ws := &windowSource{windows: map[ztoc.SpanID][]byte{}, calls: map[ztoc.SpanID]int{},
		started: map[ztoc.SpanID]chan struct{}{}, blobStarted: map[ztoc.SpanID]chan struct{}{}}
	for _, s := range spans {
		ws.windows[s.ID] = bytes.Clone(s.Window)
		ws.started[s.ID], ws.blobStarted[s.ID] = make(chan struct{}), make(chan struct{})
	}
	rb := newRecBlob(blob)
	rb.hold = func(off, _ int64) <-chan struct{} {
		id := spanOf(spans, off)
		close(ws.blobStarted[id])
		if id == 0 {
			return nil // the stream's start needs no window
		}
		return ws.started[id]
	}
	cache, err := OpenCache(t.TempDir(), CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLayer(digest.FromBytes(blob), z, rb, Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range l.spans {
		l.spans[i].Window = nil // as a layer loaded without its windows
	}
	want := fileContents(t, tarball)
	readEveryFile(t, l, z, want, nil)
	readEveryFile(t, l, z, want, nil)
	if len(ws.calls) != len(spans)-1 || ws.calls[0] != 0 {
		t.Fatalf("windows of %d spans asked for (%v), want all %d but span 0", len(ws.calls), ws.calls, len(spans)-1)
	}
	for id, n := range ws.calls {
		if n != 1 {
			t.Errorf("window of span %d asked for %d times", id, n)
		}
	}
}

// countingBlob counts the bytes read through it.
type countingBlob struct {
	BlobReader
	n atomic.Int64
}

func (b *countingBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := b.BlobReader.ReadAt(ctx, p, off)
	b.n.Add(int64(n))
	return n, err
}

// BenchmarkLayerColdRead4KChunks reads a random 4 KiB range of the Debian
// layer (default 4 MiB spans) through a fresh Layer, with whole spans and
// with 64 KiB chunk marks: the median latency of the read (fetch from the
// local file, verify, inflate up to the read) and the compressed bytes it
// fetched.
func BenchmarkLayerColdRead4KChunks(b *testing.B) {
	f, z := debianZtoc(b)
	blob, err := io.ReadAll(io.NewSectionReader(f, 0, z.CompressedArchiveSize))
	if err != nil {
		b.Fatal(err)
	}
	for _, chunkSize := range []int64{0, 64 << 10} {
		b.Run(fmt.Sprintf("chunks=%d", chunkSize), func(b *testing.B) {
			z.Chunks = nil
			if chunkSize > 0 {
				addChunks(b, z, blob, chunkSize)
			}
			cb := &countingBlob{BlobReader: LocalBlob(bytes.NewReader(blob))}
			coldReads4K(b, "", z, cb)
			b.ReportMetric(float64(cb.n.Load())/float64(b.N), "fetched-B/op")
		})
	}
}

// TestFillFetchesWindows: a fill that completes a layer loaded without
// its windows also asks the window source for the window of every span, so
// that a source keeping what it fetches lets the layer read offline.
func TestFillFetchesWindows(t *testing.T) {
	tarball := layertest.SeededTar(t, 10)
	blob := layertest.GzipCommand(t, tarball, "-6")
	z := build(t, blob, 16<<10)
	spans := mustSpans(t, z)
	ws := &windowSource{windows: map[ztoc.SpanID][]byte{}, calls: map[ztoc.SpanID]int{}}
	for _, s := range spans {
		ws.windows[s.ID] = bytes.Clone(s.Window)
	}
	cache, err := OpenCache(t.TempDir(), CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := NewLayer(digest.FromBytes(blob), z, LocalBlob(bytes.NewReader(blob)), Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range l.spans {
		l.spans[i].Window = nil
	}
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !l.Complete() || len(ws.calls) != len(spans) {
		t.Fatalf("after Fill: complete %v, windows of %d spans asked for (%v), want all %d", l.Complete(), len(ws.calls), ws.calls, len(spans))
	}
}
