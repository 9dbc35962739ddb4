package span

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// startFetch returns the fetch of span id, starting it if none is under
// way. cached is true if the span turned out to be in the cache already.
// It is where every fetch starts: a scheduler ordering demand reads,
// prefetch and fill goes here.
func (l *Layer) startFetch(id ztoc.SpanID) (f *spanFetch, cached bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.inflight[id]; f != nil {
		return f, false
	}
	if l.Cached(id) {
		return nil, true
	}
	s := l.spans[id]
	f = &spanFetch{buf: make([]byte, s.UncompressedEnd-s.UncompressedStart), changed: make(chan struct{})}
	l.inflight[id] = f
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		err := l.fetchInto(s, f)
		l.mu.Lock()
		delete(l.inflight, id)
		l.mu.Unlock()
		f.finish(err)
	}()
	return f, false
}

// fetchInto fetches span s, inflates it into f and caches it. Close stops
// it between two chunks of inflated bytes.
func (l *Layer) fetchInto(s ztoc.Span, f *spanFetch) error {
	comp, err := l.fetchSpan(s)
	if err != nil {
		return err
	}
	emit := func(b []byte) error {
		if err := l.ctx.Err(); err != nil {
			return err
		}
		f.append(b)
		return nil
	}
	if err := ztoc.InflateRange(l.z.Algorithm, s, comp, s.UncompressedStart, s.UncompressedEnd, emit); err != nil {
		return err
	}
	if l.cache == nil {
		return nil
	}
	return l.cache.Put(l.ctx, l.digest, s.ID, f.buf)
}

// fetchSpan returns span s's verified compressed bytes: one range read of
// the blob, repeated (up to VerifyRetries times) while the bytes do not
// match the span digest. It is the only reader of the blob.
func (l *Layer) fetchSpan(s ztoc.Span) ([]byte, error) {
	var err error
	for attempt := 0; attempt <= l.opts.VerifyRetries; attempt++ {
		start := time.Now()
		var comp []byte
		if comp, err = l.readCompressed(s); err != nil {
			return nil, err
		}
		if err = l.z.VerifySpan(s, comp); err != nil {
			l.opts.Metrics.SpanVerifyFailed()
			continue
		}
		l.opts.Metrics.SpanFetched(s.Size(), time.Since(start))
		return comp, nil
	}
	return nil, err
}

// readCompressed reads span s's compressed bytes from the blob, within
// FetchTimeout.
func (l *Layer) readCompressed(s ztoc.Span) ([]byte, error) {
	ctx, cancel := context.WithTimeout(l.ctx, l.opts.FetchTimeout)
	defer cancel()
	comp := make([]byte, s.Size())
	n, err := l.blob.ReadAt(ctx, comp, s.CompressedStart)
	if n == len(comp) {
		return comp, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	if ctx.Err() == context.DeadlineExceeded {
		err = fmt.Errorf("fetch timed out after %s: %w", l.opts.FetchTimeout, err)
	}
	return nil, fmt.Errorf("fetch compressed bytes %d-%d: %w", s.CompressedStart, s.CompressedEnd-1, err)
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

// append adds inflated bytes, waking the waiting reads every
// publishEvery bytes and at the end of the span.
func (f *spanFetch) append(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	before := f.avail
	f.avail += int64(copy(f.buf[f.avail:], b))
	if f.avail/publishEvery != before/publishEvery || f.avail == int64(len(f.buf)) {
		close(f.changed)
		f.changed = make(chan struct{})
	}
}

// finish ends the fetch with err (nil: the span is complete).
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
