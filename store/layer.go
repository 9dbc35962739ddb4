package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// BlobReader reads byte ranges of a layer blob, typically with one HTTP
// range request per call.
type BlobReader interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// LayerMetrics observes the read path of lazily pulled layers. All methods
// must be safe for concurrent use.
type LayerMetrics interface {
	// SpanFetched is called after a span's compressed bytes arrived and
	// were verified.
	SpanFetched(compressedBytes int64, d time.Duration)
	// SpanVerifyFailed is called when fetched bytes did not match the
	// span digest.
	SpanVerifyFailed()
	// SpanCacheHit is called when a read was served from the span cache.
	SpanCacheHit()
	// Read is called after every ReadAt.
	Read(n int, d time.Duration, err error)
}

type noMetrics struct{}

func (noMetrics) SpanFetched(int64, time.Duration) {}
func (noMetrics) SpanVerifyFailed()                {}
func (noMetrics) SpanCacheHit()                    {}
func (noMetrics) Read(int, time.Duration, error)   {}

// LayerOptions tune a Layer.
type LayerOptions struct {
	// FetchTimeout bounds one span fetch (the range request and its body).
	// Reads waiting on a span fail after it. Default 30 s.
	FetchTimeout time.Duration
	// VerifyRetries is how many times a span whose bytes do not match its
	// digest is fetched again before reads of it fail. Default 1.
	VerifyRetries int
	// Metrics observes the read path; nil means none.
	Metrics LayerMetrics
}

// DefaultFetchTimeout bounds a span fetch when LayerOptions leave it unset.
const DefaultFetchTimeout = 30 * time.Second

// Layer serves the uncompressed tar stream of one lazily pulled layer from
// its zTOC: spans come from the span cache, or are fetched from the blob
// with one range request each, verified against their digest, inflated
// from their checkpoint and cached. Concurrent reads of a span share one
// fetch, and a read returns as soon as its own bytes are inflated. Reads,
// prefetch and background fill all go through the same fetch path.
type Layer struct {
	digest digest.Digest
	z      *ztoc.Ztoc
	spans  []ztoc.Span
	blob   BlobReader
	cache  *SpanCache
	opts   LayerOptions

	ctx    context.Context // lives as long as the layer; ends fetches on Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	inflight map[ztoc.SpanID]*spanFetch
}

// NewLayer returns the Layer of blob layerDigest described by z.
func NewLayer(layerDigest digest.Digest, z *ztoc.Ztoc, blob BlobReader, cache *SpanCache, opts LayerOptions) (*Layer, error) {
	spans, err := z.Spans()
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", layerDigest, err)
	}
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = DefaultFetchTimeout
	}
	if opts.VerifyRetries == 0 {
		opts.VerifyRetries = 1
	}
	if opts.Metrics == nil {
		opts.Metrics = noMetrics{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Layer{
		digest: layerDigest, z: z, spans: spans, blob: blob, cache: cache, opts: opts,
		ctx: ctx, cancel: cancel, inflight: make(map[ztoc.SpanID]*spanFetch),
	}, nil
}

// Close stops the layer's fetches and waits for them.
func (l *Layer) Close() {
	l.cancel()
	l.wg.Wait()
}

// Spans returns the layer's span table.
func (l *Layer) Spans() []ztoc.Span { return l.spans }

// ReadAt fills p with the uncompressed bytes at off of the layer's tar
// stream (it implements fusefs.SpanSource).
func (l *Layer) ReadAt(ctx context.Context, p []byte, off int64) (n int, err error) {
	start := time.Now()
	defer func() { l.opts.Metrics.Read(n, time.Since(start), err) }()
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	end := min(off+int64(len(p)), l.z.UncompressedArchiveSize)
	for pos := off; pos < end; {
		id, ok := ztoc.SpanForOffset(l.spans, pos)
		if !ok {
			return n, fmt.Errorf("layer %s: offset %d is in no span", l.digest, pos)
		}
		s := l.spans[id]
		stop := min(end, s.UncompressedEnd)
		dst := p[pos-off : stop-off]
		if err := l.readSpan(ctx, s, dst, pos-s.UncompressedStart); err != nil {
			return n, err
		}
		n += len(dst)
		pos = stop
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readSpan fills dst with span s's bytes from relative offset rel.
func (l *Layer) readSpan(ctx context.Context, s ztoc.Span, dst []byte, rel int64) error {
	for {
		if r, err := l.cache.Open(ctx, l.digest, s.ID); err == nil {
			_, err := r.ReadAt(dst, rel)
			r.Close()
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("layer %s: read cached span %d: %w", l.digest, s.ID, err)
			}
			l.opts.Metrics.SpanCacheHit()
			return nil
		}
		f, cached := l.startFetch(s.ID)
		if cached {
			continue // the fetch finished between the cache check and now
		}
		if err := f.wait(ctx, rel+int64(len(dst))); err != nil {
			return fmt.Errorf("layer %s: span %d: %w", l.digest, s.ID, err)
		}
		copy(dst, f.buf[rel:])
		return nil
	}
}

// FetchSpan makes sure span id is in the cache, fetching it if needed.
// Background fill and prefetch use it.
func (l *Layer) FetchSpan(ctx context.Context, id ztoc.SpanID) error {
	if int(id) < 0 || int(id) >= len(l.spans) {
		return fmt.Errorf("layer %s: no span %d", l.digest, id)
	}
	for !l.cache.Has(l.digest, id) {
		f, cached := l.startFetch(id)
		if cached {
			return nil
		}
		if err := f.wait(ctx, -1); err != nil {
			return fmt.Errorf("layer %s: span %d: %w", l.digest, id, err)
		}
	}
	return nil
}

// Cached reports whether span id is in the cache.
func (l *Layer) Cached(id ztoc.SpanID) bool { return l.cache.Has(l.digest, id) }

// startFetch returns the fetch of span id, starting it if none is under
// way. cached is true if the span turned out to be in the cache already.
func (l *Layer) startFetch(id ztoc.SpanID) (f *spanFetch, cached bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.inflight[id]; f != nil {
		return f, false
	}
	if l.cache.Has(l.digest, id) {
		return nil, true
	}
	s := l.spans[id]
	f = &spanFetch{buf: make([]byte, s.UncompressedEnd-s.UncompressedStart), changed: make(chan struct{})}
	l.inflight[id] = f
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		err := l.fetch(s, f)
		if err == nil {
			err = l.cache.Put(l.ctx, l.digest, s.ID, f.buf)
		}
		l.mu.Lock()
		delete(l.inflight, id)
		l.mu.Unlock()
		f.finish(err)
	}()
	return f, false
}

// fetch gets span s's compressed bytes, verifies them (fetching again on a
// mismatch, up to VerifyRetries times) and inflates them into f.
func (l *Layer) fetch(s ztoc.Span, f *spanFetch) error {
	var err error
	for attempt := 0; attempt <= l.opts.VerifyRetries; attempt++ {
		ctx, cancel := context.WithTimeout(l.ctx, l.opts.FetchTimeout)
		start := time.Now()
		comp := make([]byte, s.Size())
		var n int
		n, err = l.blob.ReadAt(ctx, comp, s.CompressedStart)
		cancel()
		if n < len(comp) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			if ctx.Err() == context.DeadlineExceeded {
				err = fmt.Errorf("fetch timed out after %s: %w", l.opts.FetchTimeout, err)
			}
			return fmt.Errorf("fetch compressed bytes %d-%d: %w", s.CompressedStart, s.CompressedEnd-1, err)
		}
		if err = l.z.VerifySpan(s, comp); err != nil {
			l.opts.Metrics.SpanVerifyFailed()
			continue
		}
		l.opts.Metrics.SpanFetched(s.Size(), time.Since(start))
		return ztoc.InflateRange(l.z.Algorithm, s, comp, s.UncompressedStart, s.UncompressedEnd, f.append)
	}
	return err
}

// spanFetch is a span being fetched: buf fills up as inflation goes on.
type spanFetch struct {
	mu      sync.Mutex
	buf     []byte
	avail   int64
	done    bool
	err     error
	changed chan struct{} // closed (and replaced) on every change
}

// publishEvery is how much inflated data a fetch accumulates before it
// wakes the reads waiting on it.
const publishEvery = 64 << 10

func (f *spanFetch) append(b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	before := f.avail
	f.avail += int64(copy(f.buf[f.avail:], b))
	if f.avail/publishEvery != before/publishEvery || f.avail == int64(len(f.buf)) {
		close(f.changed)
		f.changed = make(chan struct{})
	}
	return nil
}

func (f *spanFetch) finish(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.done, f.err = true, err
	close(f.changed)
}

// wait returns once the first need bytes are available (need < 0: the
// whole span fetched and cached), or the fetch failed, or ctx ended.
func (f *spanFetch) wait(ctx context.Context, need int64) error {
	for {
		f.mu.Lock()
		switch {
		case f.err != nil:
			err := f.err
			f.mu.Unlock()
			return err
		case need >= 0 && f.avail >= need, f.done:
			f.mu.Unlock()
			return nil
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Fill fetches every span that is not cached yet, in order, keeping the
// compressed bytes fetched per second under bytesPerSecond (<= 0: no
// limit). It returns when all spans are cached or ctx ends.
func (l *Layer) Fill(ctx context.Context, bytesPerSecond int64) error {
	start := time.Now()
	var fetched int64
	for _, s := range l.spans {
		if l.cache.Has(l.digest, s.ID) {
			continue
		}
		if bytesPerSecond > 0 {
			due := start.Add(time.Duration(float64(fetched) / float64(bytesPerSecond) * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return ctx.Err()
				}
			}
		}
		if err := l.FetchSpan(ctx, s.ID); err != nil {
			return err
		}
		fetched += s.Size()
	}
	return nil
}
