package span

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// Prefetch fetches the spans ids (whole, in this order of priority) that
// are not held yet, a few at a time (SchedulerOptions.PrefetchFetches),
// beside the demand fetches of every layer and ahead of any fill, each
// with its window (Options.Windows) when the zTOC lacks it. It
// returns when each was fetched or failed, or ctx ended, or the layer was
// closed. A failed prefetch is not an error (the span is left to demand
// reads; Metrics.FetchFailed counts it): Prefetch fails only for an id
// the layer does not have or when ctx ends.
func (l *Layer) Prefetch(ctx context.Context, ids []ztoc.SpanID) error {
	var todo []ztoc.SpanID
	for _, id := range ids {
		if int(id) < 0 || int(id) >= len(l.spans) {
			return fmt.Errorf("%sno span %d", l.prefix, id)
		}
		if !l.haveWhole(id, false) {
			todo = append(todo, id)
		}
	}
	ctx, cancel := l.bind(ctx)
	defer cancel()
	l.sched.queuePrefetch(len(todo))
	queued := len(todo)
	defer func() { l.sched.unqueuePrefetch(queued) }()
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, id := range todo {
		release, err := l.sched.acquirePrefetch(ctx)
		if err != nil {
			return err
		}
		queued--
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer release()
			l.prefetchSpan(ctx, id)
		}()
	}
	return nil
}

// prefetchSpan loads span id whole and, beside it, its window when the
// zTOC does not hold it: a read of a prefetched span must not wait on the
// registry for its window.
func (l *Layer) prefetchSpan(ctx context.Context, id ztoc.SpanID) {
	s := l.spans[id]
	var wg sync.WaitGroup
	if needsWindow(l.z, s) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wctx, cancel := context.WithTimeout(ctx, l.opts.FetchTimeout)
			defer cancel()
			_, _ = l.window(wctx, s) // a failure is left to the read
		}()
	}
	_, _ = l.loadWhole(ctx, ClassPrefetch, id)
	wg.Wait()
}

// bind returns a context that also ends when the layer is closed.
func (l *Layer) bind(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(l.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// haveWhole reports whether all of span id's compressed bytes are on disk
// or (unless onDisk) in memory, compressed or inflated.
func (l *Layer) haveWhole(id ztoc.SpanID, onDisk bool) bool {
	if l.Cached(id) || l.spans[id].Size() == 0 {
		return true
	}
	if onDisk {
		return false
	}
	v, ok := l.mem.get(l, id)
	return ok && v.chunks == len(l.chunks[id]) && (v.comp != nil || int64(len(v.out)) == l.spans[id].UncompressedEnd-l.spans[id].UncompressedStart)
}

// loadWhole makes sure all of span id's compressed bytes are held (on
// disk for fill), loading them with class if needed. putErr says why the
// disk cache did not take them.
func (l *Layer) loadWhole(ctx context.Context, class Class, id ztoc.SpanID) (putErr, err error) {
	for {
		if l.haveWhole(id, class == ClassFill) {
			return nil, nil
		}
		l.mu.Lock()
		ld := l.loads[id]
		own := ld == nil
		if own {
			ld = l.startLoad(id, class, len(l.chunks[id]), false)
		}
		l.mu.Unlock()
		_, err := ld.wait(ctx, -1)
		if own {
			if err != nil {
				return nil, err
			}
			return ld.putErr, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// Another load of the span ended: look again.
	}
}

// Fill fetches every part of the layer's blob that the disk cache does
// not hold, span after span, as the Scheduler lets fill go on (after the
// demand and prefetch fetches of every layer, once the layer has been
// quiet). It returns nil once the layer is Complete, or an error when the
// cache cannot hold the layer, or when ctx ends or the layer is closed.
// Spans whose fetch fails are tried again after a pause.
func (l *Layer) Fill(ctx context.Context) error {
	if l.cache == nil {
		return fmt.Errorf("%sfill: no span cache", l.prefix)
	}
	ctx, cancel := l.bind(ctx)
	defer cancel()
	pause := time.Second
	for {
		if err := l.fillPass(ctx); err != nil {
			return err
		}
		if l.Complete() {
			l.fillWindows(ctx)
			return nil
		}
		if err := waitChange(ctx, nil, pause); err != nil {
			return err
		}
		pause = min(2*pause, time.Minute)
	}
}

// fillWindows gets the window of every span whose window is not in the
// span table from Options.Windows, so that a source that keeps what it
// fetches (soci.Windows.KeepIn) has every window of a complete layer,
// which then reads without the registry: in one call when the source is a
// WindowKeeper, else one Window call per span. Failures are left to the
// reads that need the window.
func (l *Layer) fillWindows(ctx context.Context) {
	if l.opts.Windows == nil {
		return
	}
	var ids []ztoc.SpanID
	for _, s := range l.spans {
		if s.Window == nil {
			ids = append(ids, s.ID)
		}
	}
	if k, ok := l.opts.Windows.(WindowKeeper); ok {
		_ = k.KeepWindows(ctx, ids)
		return
	}
	for _, id := range ids {
		if ctx.Err() != nil {
			return
		}
		_, _ = l.opts.Windows.Window(ctx, id)
	}
}

// fillGiveUp is how many fetches in a row may fail before a fill pass
// ends: a registry that is down costs a fetch timeout per span.
const fillGiveUp = 3

// fillPass fetches, once each, the parts of the blob that are not cached.
// Failed fetches (counted by Metrics.FetchFailed) are left for the next
// pass, which starts after a pause; fillGiveUp failures in a row end this
// one. A failed cache write ends the fill.
func (l *Layer) fillPass(ctx context.Context) error {
	if err := l.fillHeader(ctx); err != nil {
		return err
	}
	failed := 0
	for _, s := range l.spans {
		if failed == fillGiveUp {
			return nil
		}
		if l.haveWhole(s.ID, true) {
			continue
		}
		release, err := l.sched.acquireFill(ctx, &l.state, s.Size())
		if err != nil {
			return err
		}
		putErr, err := l.loadWhole(ctx, ClassFill, s.ID)
		release()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case putErr != nil:
			return fmt.Errorf("%sfill: %w", l.prefix, putErr)
		case err != nil:
			failed++
		default:
			failed = 0
		}
	}
	return nil
}

// fillHeader caches the blob's bytes before the first span (the gzip
// header), which no span covers; they are verified with the whole blob.
func (l *Layer) fillHeader(ctx context.Context) error {
	n := l.spans[0].CompressedStart
	if size, ok := l.cache.size(l.digest, headerID); n == 0 || ok && size == n {
		return nil
	}
	release, err := l.sched.acquireFill(ctx, &l.state, n)
	if err != nil {
		return err
	}
	defer release()
	fctx, cancel := context.WithTimeout(ctx, l.opts.FetchTimeout)
	defer cancel()
	start := time.Now()
	b, err := l.readBlob(fctx, 0, n)
	if err != nil {
		l.opts.Metrics.FetchFailed(ClassFill)
		return ctx.Err() // tried again next pass
	}
	l.opts.Metrics.SpanFetched(ClassFill, n, time.Since(start))
	if err := l.cache.put(entryKey{l.digest, headerID}, b, l.digest); err != nil {
		l.opts.Metrics.CacheWriteFailed()
		return fmt.Errorf("%sfill: %w", l.prefix, err)
	}
	return nil
}

// ForgetMemory drops the layer's spans from the MemoryCache. A layer that
// is complete on disk is about to be verified and unpacked, and then read
// by passthrough: its inflated spans would only take memory that the
// verification needs.
func (l *Layer) ForgetMemory() {
	l.mem.dropLayer(l)
}

// Complete reports whether the disk cache holds every byte of the layer's
// compressed blob, so that OpenBlob can stream it.
func (l *Layer) Complete() bool {
	if l.cache == nil {
		return false
	}
	if n := l.spans[0].CompressedStart; n > 0 {
		if size, ok := l.cache.size(l.digest, headerID); !ok || size != n {
			return false
		}
	}
	for _, s := range l.spans {
		if !l.haveWhole(s.ID, true) {
			return false
		}
	}
	return true
}
