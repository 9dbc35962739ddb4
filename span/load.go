package span

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// A load brings the verified compressed bytes of one span, from its start
// through chunk target (the whole span but for ReadAtExact), into memory
// (from memory, the disk cache or a fetch of the chunks neither holds),
// stores fetched bytes in the caches and, for reads, inflates them as they
// arrive. At most one load of a span is in flight; the reads of the span
// wait on it and return as soon as their bytes are inflated. Every fetch
// of a layer is started by a load (startLoad).
type load struct {
	id      ztoc.SpanID
	class   Class
	target  int  // chunks [0, target) are wanted
	inflate bool // reads wait on the inflated bytes
	readers int  // demand reads waiting on it and not served yet; guarded by Layer.mu

	mu      sync.Mutex
	out     []byte // inflated bytes from the span start, growing
	done    bool
	err     error
	putErr  error         // why the disk cache did not take fetched bytes
	changed chan struct{} // closed (and replaced) on every change
}

// failure is a failed demand load that reads of its span are told about
// at once (Options.FailureMemory).
type failure struct {
	err     error
	until   time.Time
	retries int // reads that may still be failed at once
}

// demandLoad returns the load a read of span s needing its first need
// uncompressed bytes waits on: the one in flight, or a new one (of the
// whole span, or with exact of the chunks that cover the read), or the
// failure of a recent one.
func (l *Layer) demandLoad(s ztoc.Span, need int64, exact bool) (*load, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ld := l.loads[s.ID]
	if ld == nil {
		if f := l.failures[s.ID]; f != nil {
			if f.retries > 0 && time.Now().Before(f.until) {
				f.retries--
				return nil, f.err
			}
			delete(l.failures, s.ID)
		}
		target := len(l.chunks[s.ID])
		if exact {
			target = l.exactTarget(s, need)
		}
		ld = l.startLoad(s.ID, ClassDemand, target, true)
	}
	if ld.class == ClassDemand {
		ld.readers++
	}
	return ld, nil
}

// exactTarget returns how many chunks of span s a read of its first need
// bytes loads with ReadAtExact: through the first chunk whose mark covers
// need, or one more than memory holds when those fell short (marks are
// hints). l.mu must be held.
func (l *Layer) exactTarget(s ztoc.Span, need int64) int {
	chunks := l.chunks[s.ID]
	n := len(chunks)
	end := s.UncompressedStart + need
	want := min(n, 1+sort.Search(n, func(k int) bool { return chunks[k].UncompressedEnd >= end }))
	if v, ok := l.mem.get(l, s.ID); ok && v.out != nil && int64(len(v.out)) < need {
		want = max(want, v.chunks+1)
	}
	return min(n, want)
}

// chunksIn returns how many chunks of span s end within its first size
// compressed bytes.
func (l *Layer) chunksIn(s ztoc.Span, size int64) int {
	chunks := l.chunks[s.ID]
	return sort.Search(len(chunks), func(k int) bool { return chunks[k].CompressedEnd-s.CompressedStart > size })
}

// startLoad starts a load of span id's first target chunks. l.mu must be
// held.
func (l *Layer) startLoad(id ztoc.SpanID, class Class, target int, inflate bool) *load {
	ld := &load{id: id, class: class, target: target, inflate: inflate, changed: make(chan struct{})}
	if l.closed {
		ld.finish(errClosed)
		return ld
	}
	l.loads[id] = ld
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		fetched, err := l.runLoad(ld)
		l.mu.Lock()
		delete(l.loads, id)
		switch {
		case err != nil && class == ClassDemand && l.opts.FailureMemory > 0 && l.ctx.Err() == nil:
			l.failures[id] = &failure{err: err, until: time.Now().Add(l.opts.FailureMemory), retries: ld.readers}
		case err == nil && fetched && class == ClassPrefetch:
			l.prefetched[id] = struct{}{}
		}
		l.mu.Unlock()
		if err != nil && l.ctx.Err() == nil {
			l.opts.Metrics.FetchFailed(class)
		}
		ld.finish(err)
	}()
	return ld
}

// runLoad does the work of a load (see load). fetched reports whether
// bytes came from the blob.
func (l *Layer) runLoad(ld *load) (fetched bool, err error) {
	s := l.spans[ld.id]
	ctx, cancel := context.WithTimeout(l.ctx, l.opts.FetchTimeout)
	defer cancel()
	defer func() { err = l.timedOut(err) }()
	var window func() ([]byte, error)
	if ld.inflate {
		window = l.windowFor(ctx, s) // beside the fetch
	}
	comp, have, onDisk := l.localPrefix(s)
	var src io.Reader = bytes.NewReader(comp)
	var fetch *chunkStream
	if have < ld.target {
		if fetch, err = l.openChunks(ctx, ld.class, s, have, ld.target); err != nil {
			return false, err
		}
		defer fetch.Close()
		src, fetched = io.MultiReader(src, fetch), true
		have = ld.target
	} else if ld.class == ClassDemand {
		l.opts.Metrics.SpanCacheHit()
	}
	var out []byte
	if ld.inflate {
		w, err := window()
		if err != nil {
			return fetched, err
		}
		if w != nil {
			s.Window = w
		}
		if out, err = l.inflate(ld, s, src, have); err != nil && !l.prefixEnded(s, have, fetch, err) {
			return fetched, err
		}
	}
	if fetch != nil {
		if comp, err = l.completeFetch(s, comp, fetch); err != nil {
			return fetched, err
		}
		onDisk = false
	}
	keep := comp // memory keeps the compressed bytes the disk does not have
	if onDisk || len(comp) == 0 {
		keep = nil
	} else if ld.putErr = l.store(s, comp, ld.class == ClassFill); ld.putErr == nil {
		keep = nil
	}
	l.mem.put(l, s.ID, inflated{out: out, comp: keep, chunks: have})
	return fetched, nil
}

// prefixEnded reports whether inflation error err only says that the
// prefix of span s being inflated (its first have chunks, the last of
// them fetched by fetch if not nil) ended before the span: a load of a
// prefix inflates as far as its chunks go.
func (l *Layer) prefixEnded(s ztoc.Span, have int, fetch *chunkStream, err error) bool {
	return have < len(l.chunks[s.ID]) && errors.Is(err, io.ErrUnexpectedEOF) &&
		(fetch == nil || fetch.failed == nil) && l.ctx.Err() == nil
}

// completeFetch reads the rest of fetch and returns the span's compressed
// bytes it completes, local prefix included; a whole span is checked
// against the span digest: chunk by chunk verified, the span digest binds
// them to the zTOC.
func (l *Layer) completeFetch(s ztoc.Span, prefix []byte, fetch *chunkStream) ([]byte, error) {
	more, err := fetch.rest()
	if err != nil {
		return nil, err
	}
	comp := append(prefix[:len(prefix):len(prefix)], more...)
	if n := len(l.chunks[s.ID]); fetch.to == n && n > 1 {
		if err := l.z.VerifySpan(s, comp); err != nil {
			l.opts.Metrics.SpanVerifyFailed()
			return nil, err
		}
	}
	return comp, nil
}

// timedOut names the fetch timeout in an error that it caused.
func (l *Layer) timedOut(err error) error {
	if errors.Is(err, context.DeadlineExceeded) && l.ctx.Err() == nil {
		return fmt.Errorf("fetch timed out after %s: %w", l.opts.FetchTimeout, err)
	}
	return err
}

// localPrefix returns the longest verified prefix of span s's compressed
// bytes that memory or the disk cache holds, how many chunks it covers and
// whether it came from disk. A disk entry that does not verify is removed.
func (l *Layer) localPrefix(s ztoc.Span) (comp []byte, chunks int, onDisk bool) {
	if v, ok := l.mem.get(l, s.ID); ok && v.comp != nil {
		comp, chunks = v.comp, v.chunks
	}
	if l.cache == nil {
		return comp, chunks, false
	}
	if size, ok := l.cache.size(l.digest, s.ID); !ok || size <= int64(len(comp)) {
		return comp, chunks, false
	}
	b, err := l.cache.read(l.digest, s.ID)
	if err != nil {
		return comp, chunks, false
	}
	n, err := l.verifyPrefix(s, b)
	if err != nil {
		l.cache.remove(l.digest, s.ID)
		return comp, chunks, false
	}
	return b, n, true
}

// store writes span s's verified compressed prefix to the disk cache. A
// fill (protect) does not evict the layer's own spans for it.
func (l *Layer) store(s ztoc.Span, comp []byte, protect bool) error {
	if l.cache == nil {
		return fmt.Errorf("%sno span cache", l.prefix)
	}
	p := l.digest
	if !protect {
		p = ""
	}
	err := l.cache.put(entryKey{l.digest, s.ID}, comp, p)
	if err != nil {
		l.opts.Metrics.CacheWriteFailed()
	}
	return err
}

// inflate inflates span s from its checkpoint (s holds its window), its
// compressed bytes (its first have chunks) read from src as they come,
// into ld, waking ld's readers as the bytes come. Inflating a prefix of
// the span ends in an error when the prefix does; the bytes inflated so
// far are returned with it.
func (l *Layer) inflate(ld *load, s ztoc.Span, src io.Reader, have int) ([]byte, error) {
	size := s.UncompressedEnd - s.UncompressedStart
	if have < len(l.chunks[s.ID]) {
		size = min(size, l.chunks[s.ID][have-1].UncompressedEnd-s.UncompressedStart+64<<10)
	}
	ld.mu.Lock()
	ld.out = make([]byte, 0, size)
	ld.mu.Unlock()
	l.inflations.Add(1)
	err := ztoc.InflateStream(l.z.Algorithm, s, src, s.UncompressedStart, s.UncompressedEnd, func(b []byte) error {
		if err := l.ctx.Err(); err != nil {
			return err
		}
		ld.append(b)
		return nil
	})
	return ld.bytes(), err
}

// append adds inflated bytes and wakes the reads waiting on the load.
func (ld *load) append(b []byte) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	ld.out = append(ld.out, b...)
	close(ld.changed)
	ld.changed = make(chan struct{})
}

// bytes returns the bytes inflated so far.
func (ld *load) bytes() []byte {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	return ld.out
}

// finish ends the load with err (nil: done).
func (ld *load) finish(err error) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	ld.done, ld.err = true, err
	close(ld.changed)
}

// wait returns the inflated bytes once at least need of them are there
// (need < 0: once the load is done), also when the load failed after
// inflating them (they came from verified chunks), or once the load is
// done, or failed, or ctx ended.
func (ld *load) wait(ctx context.Context, need int64) ([]byte, error) {
	for {
		ld.mu.Lock()
		switch {
		case need >= 0 && int64(len(ld.out)) >= need:
			out := ld.out
			ld.mu.Unlock()
			return out, nil
		case ld.err != nil:
			err := ld.err
			ld.mu.Unlock()
			return nil, err
		case ld.done:
			out := ld.out
			ld.mu.Unlock()
			return out, nil
		}
		ch := ld.changed
		ld.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
