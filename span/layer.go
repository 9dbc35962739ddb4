package span

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

// Metrics observes the read path of a Layer. All methods must be safe for
// concurrent use.
type Metrics interface {
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

// Options tune a Layer.
type Options struct {
	// Cache keeps the layer's inflated spans, so that each is fetched
	// once. Nil keeps none: every read fetches the spans it covers (right
	// for a one-off read such as extracting a file).
	Cache *Cache
	// FetchTimeout bounds one span fetch (the range request and its body).
	// Reads waiting on a span fail after it. Default DefaultFetchTimeout.
	FetchTimeout time.Duration
	// VerifyRetries is how many times a span whose bytes do not match its
	// digest is fetched again before reads of it fail. Default 1.
	VerifyRetries int
	// Metrics observes the read path; nil means none.
	Metrics Metrics
}

// DefaultFetchTimeout bounds a span fetch when Options leave it unset.
const DefaultFetchTimeout = 30 * time.Second

// Layer serves the uncompressed tar stream of one layer from its zTOC:
// spans come from the cache, or are fetched from the blob with one range
// read each, verified against their digest, inflated from their
// checkpoint and cached. Concurrent reads of a span share one fetch, and a
// read returns as soon as its own bytes are inflated. Reads, file
// extraction, prefetch and background fill all go through the same fetch
// path. A Layer is safe for concurrent use; Close it to stop its fetches.
type Layer struct {
	digest digest.Digest
	prefix string // starts errors: "layer <digest>: ", or "" with no digest
	z      *ztoc.Ztoc
	spans  []ztoc.Span
	blob   BlobReader
	cache  *Cache // nil: none
	opts   Options

	ctx    context.Context // lives as long as the layer; ends fetches on Close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	inflight map[ztoc.SpanID]*spanFetch
}

// NewLayer returns the Layer of blob layerDigest described by z, reading
// compressed bytes from blob. The digest keys the layer's spans in the
// cache and names the layer in errors; a Layer without a cache may have
// none (a local layer file whose digest nobody computed).
func NewLayer(layerDigest digest.Digest, z *ztoc.Ztoc, blob BlobReader, opts Options) (*Layer, error) {
	prefix := ""
	if layerDigest != "" {
		prefix = fmt.Sprintf("layer %s: ", layerDigest)
	}
	if opts.Cache != nil {
		if err := layerDigest.Validate(); err != nil {
			return nil, fmt.Errorf("%sspans are cached by layer digest: %w", prefix, err)
		}
	}
	spans, err := z.Spans()
	if err != nil {
		return nil, fmt.Errorf("%s%w", prefix, err)
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
		digest: layerDigest, prefix: prefix, z: z, spans: spans, blob: blob, cache: opts.Cache, opts: opts,
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
// stream (it implements fusefs.StreamReader). Like io.ReaderAt, it returns
// io.EOF with a short read at the end of the stream.
func (l *Layer) ReadAt(ctx context.Context, p []byte, off int64) (n int, err error) {
	start := time.Now()
	defer func() { l.opts.Metrics.Read(n, time.Since(start), err) }()
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	end := min(off+int64(len(p)), l.z.UncompressedArchiveSize)
	for pos := off; pos < end; {
		s, err := l.spanAt(pos)
		if err != nil {
			return n, err
		}
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

// spanAt returns the span holding uncompressed offset off.
func (l *Layer) spanAt(off int64) (ztoc.Span, error) {
	id, ok := ztoc.SpanForOffset(l.spans, off)
	if !ok {
		return ztoc.Span{}, fmt.Errorf("%soffset %d is in no span", l.prefix, off)
	}
	return l.spans[id], nil
}

// readSpan fills dst with span s's bytes from relative offset rel.
func (l *Layer) readSpan(ctx context.Context, s ztoc.Span, dst []byte, rel int64) error {
	for {
		if l.cache != nil {
			if r, err := l.cache.Open(ctx, l.digest, s.ID); err == nil {
				_, err := r.ReadAt(dst, rel)
				r.Close()
				if err != nil && !errors.Is(err, io.EOF) {
					return fmt.Errorf("%sread cached span %d: %w", l.prefix, s.ID, err)
				}
				l.opts.Metrics.SpanCacheHit()
				return nil
			}
		}
		f, cached := l.startFetch(s.ID)
		if cached {
			continue // the fetch finished between the cache check and now
		}
		if err := f.wait(ctx, rel+int64(len(dst))); err != nil {
			return fmt.Errorf("%sspan %d: %w", l.prefix, s.ID, err)
		}
		copy(dst, f.buf[rel:])
		return nil
	}
}

// FetchSpan makes sure span id is in the cache, fetching it if needed.
// Background fill and prefetch use it. Without a cache it fetches and
// verifies the span and keeps nothing.
func (l *Layer) FetchSpan(ctx context.Context, id ztoc.SpanID) error {
	if int(id) < 0 || int(id) >= len(l.spans) {
		return fmt.Errorf("%sno span %d", l.prefix, id)
	}
	for !l.Cached(id) {
		f, cached := l.startFetch(id)
		if cached {
			return nil
		}
		if err := f.wait(ctx, -1); err != nil {
			return fmt.Errorf("%sspan %d: %w", l.prefix, id, err)
		}
		if l.cache == nil {
			return nil
		}
	}
	return nil
}

// Cached reports whether span id is in the cache.
func (l *Layer) Cached(id ztoc.SpanID) bool {
	return l.cache != nil && l.cache.Has(l.digest, id)
}

// Fill fetches every span that is not cached yet, in order, keeping the
// compressed bytes fetched per second under bytesPerSecond (<= 0: no
// limit). It returns when all spans are cached or ctx ends.
func (l *Layer) Fill(ctx context.Context, bytesPerSecond int64) error {
	start := time.Now()
	var fetched int64
	for _, s := range l.spans {
		if l.Cached(s.ID) {
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
