package span

// Streamed spans: with chunk marks, a read fetches its span in one range
// read and returns once the chunks that cover it arrived and verified; a
// cached prefix of a span is completed by fetching only the chunks it
// lacks. Windows from a WindowSource.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
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

// TestLayerStreamsSpans: a read near a span's start fetches the whole
// span in one range read and returns while the chunks past the one that
// covers it are still held back; the whole span is cached once it came.
// A prefix in the cache is completed with one range read of the chunks it
// lacks; a corrupt chunk is fetched again from that chunk on.
func TestLayerStreamsSpans(t *testing.T) {
	z, blob, tarball := chunkedLayer(t)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	d := digest.FromBytes(blob)
	s := mustSpans(t, z)[2]
	chunks := z.Chunks[2]
	if len(chunks) < 8 {
		t.Fatalf("span 2 has %d chunks, want many", len(chunks))
	}
	k := 0
	for chunks[k].UncompressedEnd < s.UncompressedStart+150 {
		k++
	}
	gb := &gateBlob{data: blob, gate: chunks[k].CompressedEnd, open: make(chan struct{})}
	l := newLayer(t, d, z, gb, Options{Cache: cache})
	readCheck(t, l, tarball, s.UncompressedStart+100, 50) // would hang if it waited for the gate
	if reqs := gb.requests(); len(reqs) != 1 || reqs[0] != [2]int64{s.CompressedStart, s.CompressedEnd} {
		t.Fatalf("range reads %v, want one of span 2 [%d, %d)", reqs, s.CompressedStart, s.CompressedEnd)
	}
	if l.Cached(s.ID) {
		t.Fatal("span 2 cached before its last chunks came")
	}
	close(gb.open)
	waitFor(t, "span 2 cached whole", func() bool { return l.Cached(s.ID) })
	readCheck(t, l, tarball, s.UncompressedStart, s.UncompressedEnd-s.UncompressedStart)
	if n := len(gb.requests()); n != 1 {
		t.Fatalf("%d range reads after reading the whole span, want 1", n)
	}

	// A verified prefix in the cache (left by a fetch cut short) serves
	// reads and is completed with the chunks it lacks.
	s4 := mustSpans(t, z)[4]
	end := z.Chunks[4][2].CompressedEnd
	if err := cache.put(entryKey{d, s4.ID}, blob[s4.CompressedStart:end], ""); err != nil {
		t.Fatal(err)
	}
	readCheck(t, l, tarball, s4.UncompressedEnd-10, 10)
	if reqs := gb.requests(); len(reqs) != 2 || reqs[1] != [2]int64{end, s4.CompressedEnd} {
		t.Fatalf("range reads %v, want a second one of [%d, %d)", reqs, end, s4.CompressedEnd)
	}

	// A chunk that does not match is fetched again, from that chunk on (span 3).
	s3 := mustSpans(t, z)[3]
	bad := z.Chunks[3][3]
	gb.corruptAt.Store(bad.CompressedEnd - 1)
	readCheck(t, l, tarball, s3.UncompressedEnd-10, 10)
	if reqs := gb.requests(); len(reqs) != 4 || reqs[2] != [2]int64{s3.CompressedStart, s3.CompressedEnd} || reqs[3] != [2]int64{z.Chunks[3][2].CompressedEnd, s3.CompressedEnd} {
		t.Fatalf("range reads %v, want span 3 whole, then again from its chunk 3 (at %d)", reqs[2:], z.Chunks[3][2].CompressedEnd)
	}
}

// TestLayerReadAtExact: an exact read fetches its span only through the
// chunk that covers it; a later read of the span's end fetches the chunks
// it lacks, after which the span is cached whole.
func TestLayerReadAtExact(t *testing.T) {
	z, blob, tarball := chunkedLayer(t)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	d := digest.FromBytes(blob)
	rb := newRecBlob(blob)
	l := newLayer(t, d, z, rb, Options{Cache: cache})
	s, chunks := mustSpans(t, z)[1], z.Chunks[1]
	off := s.UncompressedStart + 3000
	k := 0
	for chunks[k].UncompressedEnd < off+512 {
		k++
	}
	p := make([]byte, 512)
	if _, err := l.ReadAtExact(context.Background(), p, off); err != nil || !bytes.Equal(p, tarball[off:off+512]) {
		t.Fatalf("ReadAtExact: %v, or wrong bytes", err)
	}
	reqs := rb.requests()
	if len(reqs) != 1 || reqs[0].off != s.CompressedStart || reqs[0].end != chunks[k].CompressedEnd || k+1 == len(chunks) {
		t.Fatalf("range reads %v, want one of span 1 through chunk %d [%d, %d)", reqs, k, s.CompressedStart, chunks[k].CompressedEnd)
	}
	readCheck(t, l, tarball, s.UncompressedEnd-100, 100)
	reqs = rb.requests()
	if len(reqs) != 2 || reqs[1].off != chunks[k].CompressedEnd || reqs[1].end != s.CompressedEnd {
		t.Fatalf("range reads %v, want a second one of [%d, %d)", reqs, chunks[k].CompressedEnd, s.CompressedEnd)
	}
	waitFor(t, "span 1 cached whole", func() bool { return l.Cached(s.ID) })
	if _, err := l.ReadAtExact(context.Background(), p, off); err != nil || len(rb.requests()) != 2 {
		t.Fatalf("ReadAtExact of a cached span: %v, %d range reads", err, len(rb.requests()))
	}
}

// gateBlob is a BlobReader over a layer in memory that records its range
// reads and holds the bytes from blob offset gate on until open is
// closed. corruptAt, when positive, names a blob offset whose byte the
// next range read through it flips.
type gateBlob struct {
	data      []byte
	gate      int64
	open      chan struct{}
	corruptAt atomic.Int64
	mu        sync.Mutex
	reqs      [][2]int64
}

func (b *gateBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.mu.Lock()
	b.reqs = append(b.reqs, [2]int64{off, off + n})
	b.mu.Unlock()
	p := bytes.Clone(b.data[off : off+n])
	if c := b.corruptAt.Load(); c > off && c < off+n && b.corruptAt.CompareAndSwap(c, 0) {
		p[c-off] ^= 0xff
	}
	if b.gate <= off || b.gate >= off+n {
		return io.NopCloser(bytes.NewReader(p)), nil
	}
	held := io.MultiReader(bytes.NewReader(p[:b.gate-off]), gateReader{ctx, b.open, bytes.NewReader(p[b.gate-off:])})
	return io.NopCloser(held), nil
}

func (b *gateBlob) requests() [][2]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([][2]int64(nil), b.reqs...)
}

// gateReader reads r once open is closed.
type gateReader struct {
	ctx  context.Context
	open <-chan struct{}
	r    io.Reader
}

func (g gateReader) Read(p []byte) (int, error) {
	select {
	case <-g.open:
		return g.r.Read(p)
	case <-g.ctx.Done():
		return 0, g.ctx.Err()
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
// cache; a span read from start to end takes one range read.
func TestLayerPartialSpansRead(t *testing.T) {
	tarball := textTar(t)
	kinds := append(readerLayers[:len(readerLayers):len(readerLayers)],
		layerKind{"gzip-members", func(t testing.TB, b []byte) []byte { return layertest.GzipCommandMembers(t, b, 100003, "-6") }})
	for _, k := range kinds {
		for _, withCache := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/cache=%t", k.name, withCache), func(t *testing.T) {
				blob := k.compress(t, tarball)
				z := build(t, blob, 128<<10)
				addChunks(t, z, blob, 1500)
				var opts Options
				if withCache {
					opts.Cache = mustCache(t, t.TempDir(), CacheOptions{})
				}
				rb := newRecBlob(blob)
				l := newLayer(t, digest.FromBytes(blob), z, rb, opts)
				rng := rand.New(rand.NewPCG(5, 6))
				for range 100 {
					off := rng.Int64N(int64(len(tarball)))
					readCheck(t, l, tarball, off, 1+rng.Int64N(40000))
				}
				l.Close()
				// Sequentially, 16 KiB at a time, on a fresh layer.
				rb = newRecBlob(blob)
				if opts.Cache != nil {
					opts.Cache = mustCache(t, t.TempDir(), CacheOptions{})
				}
				// Closed (by newLayer) before the test removes its cache
				// directory, which the layer's cache writes may still fill.
				l = newLayer(t, digest.FromBytes(blob), z, rb, opts)
				for off := int64(0); off < int64(len(tarball)); off += 16 << 10 {
					readCheck(t, l, tarball, off, 16<<10)
				}
				perSpan := map[ztoc.SpanID]int{}
				for _, r := range rb.requests() {
					perSpan[spanContaining(l.Spans(), r.off)]++
				}
				t.Logf("%d range reads for %d spans", len(rb.requests()), len(l.Spans()))
				for id, n := range perSpan {
					if n != 1 {
						t.Errorf("span %d (%d chunks) read sequentially in %d range reads", id, len(z.Chunks[id]), n)
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

// newWindowSource returns a windowSource holding a copy of the window of
// every span.
func newWindowSource(spans []ztoc.Span) *windowSource {
	ws := &windowSource{windows: map[ztoc.SpanID][]byte{}, calls: map[ztoc.SpanID]int{}}
	for _, s := range spans {
		ws.windows[s.ID] = bytes.Clone(s.Window)
	}
	return ws
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
	tarball, blob, z := seededGzipLayer(t, 10)
	spans := mustSpans(t, z)
	ws := newWindowSource(spans)
	ws.started, ws.blobStarted = map[ztoc.SpanID]chan struct{}{}, map[ztoc.SpanID]chan struct{}{}
	for _, s := range spans {
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
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	l := newLayer(t, digest.FromBytes(blob), z, rb, Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second})
	dropWindows(l)
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

func (b *countingBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	body, err := b.BlobReader.ReadRange(ctx, off, n)
	if err != nil {
		return nil, err
	}
	return countingBody{body, &b.n}, nil
}

// countingBody adds the bytes read through it to n.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
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
	_, blob, z := seededGzipLayer(t, 10)
	spans := mustSpans(t, z)
	ws := newWindowSource(spans)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	l := newLayer(t, digest.FromBytes(blob), z, LocalBlob(bytes.NewReader(blob)), Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second})
	dropWindows(l)
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !l.Complete() || len(ws.calls) != len(spans) {
		t.Fatalf("after Fill: complete %v, windows of %d spans asked for (%v), want all %d", l.Complete(), len(ws.calls), ws.calls, len(spans))
	}
}

// keepingWindows is a windowSource that is also a WindowKeeper: it
// records the spans KeepWindows was asked for.
type keepingWindows struct {
	*windowSource
	kept [][]ztoc.SpanID
}

func (k *keepingWindows) KeepWindows(_ context.Context, ids []ztoc.SpanID) error {
	k.kept = append(k.kept, slices.Clone(ids))
	return nil
}

// TestFillKeepsWindowsAtOnce: a fill that completes a layer whose window
// source is a WindowKeeper asks it once for the windows of every span, and
// does not ask for them one by one.
func TestFillKeepsWindowsAtOnce(t *testing.T) {
	_, blob, z := seededGzipLayer(t, 10)
	spans := mustSpans(t, z)
	ws := &keepingWindows{windowSource: newWindowSource(spans)}
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	l := newLayer(t, digest.FromBytes(blob), z, LocalBlob(bytes.NewReader(blob)), Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second})
	dropWindows(l)
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	var want []ztoc.SpanID
	for _, s := range spans {
		want = append(want, s.ID)
	}
	if len(ws.kept) != 1 || !slices.Equal(ws.kept[0], want) {
		t.Fatalf("KeepWindows calls %v, want one for spans %v", ws.kept, want)
	}
	if len(ws.calls) != 0 {
		t.Errorf("Window asked span by span as well: %v", ws.calls)
	}
}

// TestLayerReadAtExactWindowFails: a read of a span prefix whose window
// cannot be had fails with the window's error, not as a short prefix.
func TestLayerReadAtExactWindowFails(t *testing.T) {
	z, blob, _ := chunkedLayer(t)
	l := newLayer(t, digest.FromBytes(blob), z, LocalBlob(bytes.NewReader(blob)), Options{Windows: downWindows{}})
	dropWindows(l)
	s := l.spans[2]
	_, err := l.ReadAtExact(context.Background(), make([]byte, 100), s.UncompressedStart+10)
	if err == nil || !strings.Contains(err.Error(), "window source down") {
		t.Fatalf("ReadAtExact without a window: %v, want the window source's error", err)
	}
}

// downWindows is a WindowSource that has no window to give.
type downWindows struct{}

func (downWindows) Window(context.Context, ztoc.SpanID) ([]byte, error) {
	return nil, errors.New("window source down")
}
