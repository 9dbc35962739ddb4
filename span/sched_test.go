package span

// The Scheduler: demand fetches never wait for prefetch, prefetch goes in
// priority order a few at a time, fill waits for quiet; and a failed
// demand fetch is remembered for the kernel's retry.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// holds holds the range reads of chosen spans until released.
type holds struct {
	spans []ztoc.Span
	mu    sync.Mutex
	m     map[ztoc.SpanID]chan struct{}
}

func newHolds(spans []ztoc.Span, ids ...ztoc.SpanID) *holds {
	h := &holds{spans: spans, m: map[ztoc.SpanID]chan struct{}{}}
	for _, id := range ids {
		h.m[id] = make(chan struct{})
	}
	return h
}

func (h *holds) hold(off, end int64) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.m[spanOf(h.spans, off)] // nil: not held
}

func (h *holds) release(id ztoc.SpanID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	close(h.m[id])
	delete(h.m, id)
}

// schedLayer returns a gzip layer of many 16 KiB spans, a recording blob
// over it and a Layer with a cache, sched and metrics.
func schedLayer(t *testing.T, sched *Scheduler, opts Options) (*Layer, *recBlob, *recMetrics, []byte) {
	t.Helper()
	tarball, blob, z := seededGzipLayer(t, 9)
	rb := newRecBlob(blob)
	m := newRecMetrics()
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	opts.Cache, opts.Scheduler, opts.Metrics = cache, sched, m
	l := newLayer(t, digest.FromString("sched layer"), z, rb, opts)
	if len(l.Spans()) < 15 {
		t.Fatalf("layer has %d spans, want more", len(l.Spans()))
	}
	return l, rb, m, tarball
}

// readSpanStart reads 100 bytes at the start of span id and checks them.
func readSpanStart(t *testing.T, l *Layer, tarball []byte, id ztoc.SpanID) {
	t.Helper()
	off := l.Spans()[id].UncompressedStart
	p := make([]byte, 100)
	if _, err := l.ReadAt(context.Background(), p, off); err != nil || !bytes.Equal(p, tarball[off:off+100]) {
		t.Fatalf("read of span %d: %v (bytes right: %v)", id, err, bytes.Equal(p, tarball[off:off+100]))
	}
}

func TestPrefetchNeverDelaysDemand(t *testing.T) {
	sched := NewScheduler(SchedulerOptions{PrefetchFetches: 1, FillQuiet: -1})
	l, rb, m, tarball := schedLayer(t, sched, Options{FetchTimeout: 20 * time.Second})
	order := []ztoc.SpanID{5, 2, 9, 7}
	h := newHolds(l.Spans(), order...)
	rb.hold = h.hold
	done := make(chan error, 1)
	go func() { done <- l.Prefetch(context.Background(), order) }()
	if r := rb.waitRequests(t, 1)[0]; spanOf(l.Spans(), r.off) != 5 {
		t.Fatalf("first prefetch fetched span %d, want 5", spanOf(l.Spans(), r.off))
	}
	// Span 5 is held: a demand read does not wait for it.
	start := time.Now()
	readSpanStart(t, l, tarball, 12)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("demand read took %v behind a held prefetch", d)
	}
	if reqs := rb.requests(); len(reqs) != 2 {
		t.Fatalf("%d range reads with one prefetch slot held, want 2 (prefetch 5, demand 12)", len(reqs))
	}
	for _, id := range order {
		h.release(id)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var got []ztoc.SpanID
	for _, r := range rb.requests() {
		if id := spanOf(l.Spans(), r.off); id != 12 {
			got = append(got, id)
		}
	}
	if len(got) != len(order) || got[0] != 5 || got[1] != 2 || got[2] != 9 || got[3] != 7 {
		t.Fatalf("prefetch fetched spans %v, want %v in that order", got, order)
	}
	if n, _, _ := m.count(ClassPrefetch); n != 4 {
		t.Errorf("%d prefetch fetches counted, want 4", n)
	}
	if n, _, _ := m.count(ClassDemand); n != 1 {
		t.Errorf("%d demand fetches counted, want 1", n)
	}
	// A read of a prefetched span is a hit and fetches nothing; the rest
	// is waste once the layer closes.
	readSpanStart(t, l, tarball, 2)
	if reqs := rb.requests(); len(reqs) != 5 {
		t.Fatalf("reading a prefetched span made %d range reads in all, want 5", len(reqs))
	}
	l.Close()
	if m.get(&m.prefetchHit) != 1 || m.get(&m.waste) != 3 {
		t.Fatalf("prefetch hits %d, waste %d; want 1 and 3", m.prefetchHit, m.waste)
	}
}

func TestFillYieldsToDemand(t *testing.T) {
	const quiet, delay = 300 * time.Millisecond, 200 * time.Millisecond
	sched := NewScheduler(SchedulerOptions{FillQuiet: quiet, FillDelay: delay})
	opened := time.Now()
	l, rb, m, tarball := schedLayer(t, sched, Options{})
	h := newHolds(l.Spans(), 3, 1)
	rb.hold = h.hold
	readDone := make(chan struct{})
	go func() { readSpanStart(t, l, tarball, 3); close(readDone) }()
	rb.waitRequests(t, 1)
	fillDone := make(chan error, 1)
	go func() { fillDone <- l.Fill(context.Background()) }()

	// No fill fetch while a demand fetch is in flight.
	time.Sleep(2 * (quiet + delay))
	if reqs := rb.requests(); len(reqs) != 1 {
		t.Fatalf("%d range reads while a demand fetch was in flight, want 1", len(reqs))
	}
	released := time.Now()
	h.release(3)
	<-readDone
	// The first fill fetch (the header) waits for the layer to be quiet.
	first := rb.waitRequests(t, 2)[1]
	if first.at.Sub(released) < quiet || first.at.Sub(opened) < delay {
		t.Fatalf("first fill fetch %v after the demand fetch, %v after open; want >= %v and %v",
			first.at.Sub(released), first.at.Sub(opened), quiet, delay)
	}
	// Fill holds on span 1 (span 0 went first); a demand read meanwhile
	// lets the held fetch finish but starts no other until quiet again.
	reqs := rb.waitRequests(t, 4)
	if id := spanOf(l.Spans(), reqs[3].off); id != 1 {
		t.Fatalf("fill fetched span %d after span 0, want 1", id)
	}
	last := ztoc.SpanID(len(l.Spans()) - 1)
	readSpanStart(t, l, tarball, last)
	h.release(1)
	reqs = rb.waitRequests(t, 6)
	if id := spanOf(l.Spans(), reqs[4].off); id != last {
		t.Fatalf("range read 4 is of span %d, want the demand read of span %d", id, last)
	}
	if reqs[5].at.Sub(reqs[4].at) < quiet {
		t.Fatalf("fill fetched again %v after a demand fetch started, want >= %v", reqs[5].at.Sub(reqs[4].at), quiet)
	}
	if err := <-fillDone; err != nil {
		t.Fatal(err)
	}
	if !l.Complete() {
		t.Fatal("layer not complete after Fill")
	}
	fills, _, _ := m.count(ClassFill)
	demands, _, _ := m.count(ClassDemand)
	if demands != 2 || fills != len(l.Spans())-2+1 {
		t.Fatalf("%d demand and %d fill fetches for %d spans, want 2 and %d (spans and header)", demands, fills, len(l.Spans()), len(l.Spans())-1)
	}
}

func TestFillWaitsForPrefetch(t *testing.T) {
	sched := NewScheduler(SchedulerOptions{FillQuiet: -1})
	l, rb, _, _ := schedLayer(t, sched, Options{})
	h := newHolds(l.Spans(), 4)
	rb.hold = h.hold
	prefetched := make(chan error, 1)
	go func() { prefetched <- l.Prefetch(context.Background(), []ztoc.SpanID{4, 6}) }()
	rb.waitRequests(t, 2) // spans 4 and 6
	fillDone := make(chan error, 1)
	go func() { fillDone <- l.Fill(context.Background()) }()
	time.Sleep(300 * time.Millisecond)
	if reqs := rb.requests(); len(reqs) != 2 {
		t.Fatalf("%d range reads while a prefetch was in flight, want 2", len(reqs))
	}
	h.release(4)
	if err := <-prefetched; err != nil {
		t.Fatal(err)
	}
	if err := <-fillDone; err != nil {
		t.Fatal(err)
	}
	if reqs := rb.requests(); len(reqs) != len(l.Spans())+1 {
		t.Fatalf("%d range reads in all for %d spans and the header", len(reqs), len(l.Spans()))
	}
}

// TestLayerRemembersFailures: a read against a hung registry fails after
// the fetch timeout; the kernel's retry of that read fails at once instead
// of waiting as long again; later reads fetch again.
func TestLayerRemembersFailures(t *testing.T) {
	const timeout, memory = 300 * time.Millisecond, time.Second
	z, data, _ := testLayer(t)
	rb := newRecBlob(data)
	never := make(chan struct{})
	rb.hold = func(int64, int64) <-chan struct{} { return never }
	l := newTestLayer(t, rb, z, Options{FetchTimeout: timeout, FailureMemory: memory})
	read := func() (time.Duration, error) {
		start := time.Now()
		_, err := l.ReadAt(context.Background(), make([]byte, 10), 5000)
		return time.Since(start), err
	}
	d1, err1 := read()
	if err1 == nil || d1 < timeout {
		t.Fatalf("first read: %v after %v, want a failure after %v", err1, d1, timeout)
	}
	d2, err2 := read()
	if err2 == nil || err2.Error() != err1.Error() || d2 > timeout/3 {
		t.Fatalf("retry: %v after %v, want %q at once", err2, d2, err1)
	}
	if n := len(rb.requests()); n != 1 {
		t.Fatalf("%d range reads, want 1", n)
	}
	// The retry was answered: the next read fetches again.
	if d3, err3 := read(); err3 == nil || d3 < timeout || len(rb.requests()) != 2 {
		t.Fatalf("third read: %v after %v with %d range reads, want a new fetch", err3, d3, len(rb.requests()))
	}
	// Once FailureMemory passed, a read fetches again even if unanswered.
	time.Sleep(memory + 100*time.Millisecond)
	if d4, err4 := read(); err4 == nil || d4 < timeout || len(rb.requests()) != 3 {
		t.Fatalf("read after the window: %v after %v with %d range reads, want a new fetch", err4, d4, len(rb.requests()))
	}
	// Three reads failing together: each one's retry fails at once.
	time.Sleep(memory + 100*time.Millisecond)
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() { defer wg.Done(); read() }()
	}
	wg.Wait()
	for i := range 3 {
		if d, err := read(); err == nil || d > timeout/3 {
			t.Fatalf("retry %d of three failed reads: %v after %v, want a failure at once", i, err, d)
		}
	}
	if n := len(rb.requests()); n != 4 {
		t.Fatalf("%d range reads, want 4", n)
	}
}

// flakyBlob fails its first fails range reads.
type flakyBlob struct {
	BlobReader
	mu    sync.Mutex
	fails int
}

func (b *flakyBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.mu.Lock()
	fail := b.fails > 0
	b.fails--
	b.mu.Unlock()
	if fail {
		return nil, errors.New("registry unavailable")
	}
	return b.BlobReader.ReadRange(ctx, off, n)
}

// TestFillRetriesFailedFetches: fetches that fail end a fill pass after a
// few in a row; the next pass, after a pause, completes the layer.
func TestFillRetriesFailedFetches(t *testing.T) {
	_, blob, z := seededGzipLayer(t, 14)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	m := newRecMetrics()
	fb := &flakyBlob{BlobReader: LocalBlob(bytes.NewReader(blob)), fails: 1 + fillGiveUp}
	l := newLayer(t, digest.FromBytes(blob), z, fb, Options{Cache: cache, Metrics: m})
	start := time.Now()
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !l.Complete() || time.Since(start) < time.Second {
		t.Fatalf("Fill returned after %v, complete %v; want a pause, then a complete layer", time.Since(start), l.Complete())
	}
	if _, _, failed := m.count(ClassFill); failed != 1+fillGiveUp {
		t.Fatalf("%d failed fill fetches, want %d (the header, then %d spans in a row)", failed, 1+fillGiveUp, fillGiveUp)
	}
}
