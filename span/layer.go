package span

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// WindowSource supplies the inflate windows that a layer's zTOC does not
// hold (spans whose Window is nil), such as those of a compact artifact
// that fetches each window when its span is first read. It must return
// the window it verified: a wrong window inflates to wrong bytes.
type WindowSource interface {
	Window(ctx context.Context, id ztoc.SpanID) ([]byte, error)
}

// WindowKeeper is a WindowSource that keeps the windows it fetches (on
// disk) and can fetch many at once. Fill asks it, once a layer is
// complete, for the windows of every span that lacks one, so the layer
// reads without the registry after one request instead of one per span.
type WindowKeeper interface {
	WindowSource
	KeepWindows(ctx context.Context, ids []ztoc.SpanID) error
}

// Options tune a Layer.
type Options struct {
	// Cache keeps the layer's verified compressed bytes on disk, so that
	// each span is fetched once while it stays there. Nil keeps none:
	// reads fetch the spans they cover unless memory holds them (right
	// for a one-off read such as extracting a file).
	Cache *Cache
	// Memory keeps recently inflated spans. Nil gives the layer a
	// MemoryCache of its own of DefaultMemoryBytes.
	Memory *MemoryCache
	// Scheduler orders the layer's fetches with those of the other layers
	// of the daemon. Nil gives the layer a Scheduler of its own whose fill
	// does not wait for a quiet period.
	Scheduler *Scheduler
	// Windows supplies the windows of spans whose zTOC entry has none.
	// Required when some span that does not start the stream has none.
	Windows WindowSource
	// FetchTimeout bounds one load of a span: waiting for a demand slot,
	// the range request, its body (read as it is inflated) and the span's
	// window. Reads waiting on a span fail after it.
	// Default DefaultFetchTimeout.
	FetchTimeout time.Duration
	// VerifyRetries is how many times bytes that do not match their digest
	// are fetched again before reads of them fail. Default 1.
	VerifyRetries int
	// FailureMemory is how long a failed demand fetch of a span is
	// remembered: each read that failed on it may be retried (as the
	// kernel retries a failed read once) within FailureMemory and fails at
	// once instead of waiting for another fetch. Default
	// DefaultFailureMemory; negative: not remembered.
	FailureMemory time.Duration
	// Metrics observes the read path; nil means none.
	Metrics Metrics
}

// Defaults of Options.
const (
	// DefaultFetchTimeout bounds a fetch when Options leave it unset.
	DefaultFetchTimeout = 30 * time.Second
	// DefaultFailureMemory covers the kernel's retry of a failed read,
	// which follows the failure at once (0.1 ms later, measured over FUSE).
	// It is kept short because the kernel does not always retry: a longer
	// memory fails the reads of a container started right after the
	// registry came back (about 100 ms later in TestLazyFaults).
	DefaultFailureMemory = 20 * time.Millisecond
)

// Layer serves the uncompressed tar stream of one layer from its zTOC.
// A read takes the span's inflated bytes from memory, or inflates the
// span's compressed bytes from the disk cache, or fetches them: one range
// read per span, from the first chunk neither cache holds to the span's
// end, each chunk verified against its digest as it arrives and inflated
// from the span's checkpoint as it is verified, so that the read returns
// once its own bytes are inflated while the rest of the span is still
// coming. The whole span is then checked against its span digest and
// cached on disk (compressed) and in memory (inflated). Concurrent reads
// of a span share one load. Reads, prefetch and background fill all go
// through the same verified fetch path. A Layer is safe for concurrent
// use; Close it to stop its fetches.
type Layer struct {
	digest digest.Digest
	prefix string // starts errors: "layer <digest>: ", or "" with no digest
	z      *ztoc.Ztoc
	spans  []ztoc.Span
	chunks [][]ztoc.Chunk // per span; without marks, one chunk: the span
	blob   BlobReader
	cache  *Cache // nil: none
	mem    *MemoryCache
	sched  *Scheduler
	opts   Options
	state  layerState // the layer's part of the scheduler's state, guarded by sched.mu

	ctx    context.Context // lives as long as the layer; ends fetches on Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // loads in flight

	mu         sync.Mutex
	loads      map[ztoc.SpanID]*load
	failures   map[ztoc.SpanID]*failure
	windows    map[ztoc.SpanID][]byte   // from Options.Windows
	prefetched map[ztoc.SpanID]struct{} // fetched by prefetch, not read yet
	closed     bool                     // no load starts any more
	inflations atomic.Int64             // spans inflated (tests count them)
	closeOnce  sync.Once
}

// errClosed fails the reads of a closed Layer.
var errClosed = errors.New("layer closed")

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
	chunks, err := chunkTable(z, spans)
	if err != nil {
		return nil, fmt.Errorf("%s%w", prefix, err)
	}
	for _, s := range spans {
		if needsWindow(z, s) && opts.Windows == nil {
			return nil, fmt.Errorf("%sspan %d has no window and no window source is given", prefix, s.ID)
		}
	}
	opts = withDefaults(opts)
	l := &Layer{
		digest: layerDigest, prefix: prefix, z: z, spans: spans, chunks: chunks, blob: blob,
		cache: opts.Cache, mem: opts.Memory, sched: opts.Scheduler, opts: opts,
		state:    layerState{opened: time.Now()},
		loads:    make(map[ztoc.SpanID]*load),
		failures: make(map[ztoc.SpanID]*failure), windows: make(map[ztoc.SpanID][]byte),
		prefetched: make(map[ztoc.SpanID]struct{}),
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	return l, nil
}

// withDefaults fills in the Options left unset.
func withDefaults(opts Options) Options {
	if opts.Memory == nil {
		opts.Memory = NewMemoryCache(DefaultMemoryBytes)
	}
	if opts.Scheduler == nil {
		opts.Scheduler = NewScheduler(SchedulerOptions{FillQuiet: -1})
	}
	if opts.FetchTimeout <= 0 {
		opts.FetchTimeout = DefaultFetchTimeout
	}
	if opts.VerifyRetries == 0 {
		opts.VerifyRetries = 1
	}
	if opts.FailureMemory == 0 {
		opts.FailureMemory = DefaultFailureMemory
	}
	if opts.Metrics == nil {
		opts.Metrics = noMetrics{}
	}
	return opts
}

// Close stops the layer's fetches, waits for them and forgets the layer's
// spans in memory. Spans that prefetch fetched and no read used count as
// wasted (Metrics.PrefetchUsed).
func (l *Layer) Close() {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		l.mu.Unlock()
		l.cancel()
		l.wg.Wait()
		l.mem.dropLayer(l)
		l.mu.Lock()
		wasted := len(l.prefetched)
		clear(l.prefetched)
		l.mu.Unlock()
		for range wasted {
			l.opts.Metrics.PrefetchUsed(false)
		}
	})
}

// Spans returns the layer's span table.
func (l *Layer) Spans() []ztoc.Span { return l.spans }

// ReadAt fills p with the uncompressed bytes at off of the layer's tar
// stream (it implements fusefs.StreamReader). Like io.ReaderAt, it returns
// io.EOF with a short read at the end of the stream.
func (l *Layer) ReadAt(ctx context.Context, p []byte, off int64) (n int, err error) {
	return l.readAt(ctx, p, off, false)
}

// ReadAtExact reads like ReadAt, but fetches of a span it needs bring only
// the span's chunks through the one that covers the read, not the rest of
// the span: for reads that no read of the rest of the span is likely to
// follow, such as the check of a symlink's tar header, whose span the
// container may never read.
func (l *Layer) ReadAtExact(ctx context.Context, p []byte, off int64) (n int, err error) {
	return l.readAt(ctx, p, off, true)
}

func (l *Layer) readAt(ctx context.Context, p []byte, off int64, exact bool) (n int, err error) {
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
		if err := l.readSpan(ctx, s, dst, pos-s.UncompressedStart, exact); err != nil {
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

// readSpan fills dst with span s's bytes from relative offset rel: from
// memory, else from a load of the span (shared with concurrent reads;
// exact: see ReadAtExact). A load of a prefix of the span may stop short
// of dst's end (chunk marks are hints, or the load was another read's
// exact one); the next load then takes more chunks.
func (l *Layer) readSpan(ctx context.Context, s ztoc.Span, dst []byte, rel int64, exact bool) error {
	need := rel + int64(len(dst))
	defer l.notePrefetchHit(s.ID)
	for attempt := 0; ; attempt++ {
		if v, ok := l.mem.get(l, s.ID); ok && int64(len(v.out)) >= need {
			copy(dst, v.out[rel:need])
			l.opts.Metrics.SpanCacheHit()
			return nil
		}
		if attempt > len(l.chunks[s.ID])+2 {
			return fmt.Errorf("%sspan %d: inflation does not reach offset %d", l.prefix, s.ID, s.UncompressedStart+need)
		}
		ld, err := l.demandLoad(s, need, exact)
		if err != nil {
			return fmt.Errorf("%sspan %d: %w", l.prefix, s.ID, err)
		}
		out, err := ld.wait(ctx, need)
		if err != nil && (ld.class == ClassDemand || ctx.Err() != nil) {
			return fmt.Errorf("%sspan %d: %w", l.prefix, s.ID, err)
		}
		if int64(len(out)) >= need {
			l.served(ld)
			copy(dst, out[rel:need])
			return nil
		}
		// A prefetch or fill load (which does not inflate) finished or
		// failed, or a load of fewer chunks ended: look again.
	}
}

// served notes that a demand read waiting on ld got its bytes: should the
// load fail later (in the rest of its span), only the reads it failed may
// be failed again at once (Options.FailureMemory).
func (l *Layer) served(ld *load) {
	if ld.class != ClassDemand {
		return
	}
	l.mu.Lock()
	ld.readers--
	l.mu.Unlock()
}

// notePrefetchHit counts a read of a span that prefetch fetched.
func (l *Layer) notePrefetchHit(id ztoc.SpanID) {
	l.mu.Lock()
	_, hit := l.prefetched[id]
	delete(l.prefetched, id)
	l.mu.Unlock()
	if hit {
		l.opts.Metrics.PrefetchUsed(true)
	}
}

// Cached reports whether all of span id's compressed bytes are in the
// disk cache.
func (l *Layer) Cached(id ztoc.SpanID) bool {
	if l.cache == nil || int(id) < 0 || int(id) >= len(l.spans) {
		return false
	}
	n, ok := l.cache.size(l.digest, id)
	return ok && n == l.spans[id].Size()
}
