package span

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/spanpull/spanpull/ztoc"
)

// A load brings the verified compressed bytes of one span, from its start
// through chunk target, into memory (from memory, the disk cache or a
// fetch), stores fetched bytes in the caches and, for reads, inflates
// them. At most one load of a span is in flight; the reads of the span
// wait on it. Every fetch of a layer is started by a load (startLoad).
type load struct {
	id      ztoc.SpanID
	class   Class
	target  int  // chunks [0, target) are wanted
	inflate bool // reads wait on the inflated bytes
	readers int  // demand reads that waited on it; guarded by Layer.mu

	mu      sync.Mutex
	out     []byte // inflated bytes from the span start, growing
	done    bool
	err     error
	putErr  error         // why the disk cache did not take fetched bytes
	changed chan struct{} // closed (and replaced) on every change
}

// publishEvery is how much inflated data a load accumulates before it
// wakes the reads waiting on it.
const publishEvery = 64 << 10

// failure is a failed demand load that reads of its span are told about
// at once (Options.FailureMemory).
type failure struct {
	err     error
	until   time.Time
	retries int // reads that may still be failed at once
}

// demandLoad returns the load a read of span s needing its first need
// uncompressed bytes waits on: the one in flight, or a new one, or the
// failure of a recent one.
func (l *Layer) demandLoad(s ztoc.Span, need int64) (*load, error) {
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
		ld = l.startLoad(s.ID, ClassDemand, l.readTarget(s, need), true)
	}
	if ld.class == ClassDemand {
		ld.readers++
	}
	return ld, nil
}

// prefixGrowth is how many times at least a span loaded in parts grows
// its prefix each time: a span read from start to end is then fetched in
// a few range reads (1 + log4 of its chunks) and inflated about 1.3 times,
// not once per chunk.
const prefixGrowth = 4

// readTarget returns how many chunks of span s a read of its first need
// bytes loads: through the first chunk whose mark covers need (or one
// more than the last load when that stopped short), and when the span is
// partly here already at least prefixGrowth times that. l.mu must be held.
func (l *Layer) readTarget(s ztoc.Span, need int64) int {
	chunks := l.chunks[s.ID]
	n := len(chunks)
	end := s.UncompressedStart + need
	want := min(n, 1+sort.Search(n, func(k int) bool { return chunks[k].UncompressedEnd >= end }))
	have := l.localChunks(s)
	if v, ok := l.mem.get(l, s.ID); ok && v.out != nil && v.chunks >= have && int64(len(v.out)) < need {
		want = max(want, v.chunks+1) // the marks promised more than inflation gave
	}
	if want <= have {
		return have
	}
	return min(n, max(want, prefixGrowth*have))
}

// localChunks returns how many chunks of span s memory or the disk cache
// hold (compressed). l.mu may be held.
func (l *Layer) localChunks(s ztoc.Span) int {
	have := 0
	if v, ok := l.mem.get(l, s.ID); ok && v.comp != nil {
		have = v.chunks
	}
	if l.cache != nil {
		if size, ok := l.cache.size(l.digest, s.ID); ok {
			have = max(have, l.chunksIn(s, size))
		}
	}
	return have
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
	comp, have, onDisk := l.localPrefix(s)
	var window []byte
	if have < ld.target {
		more, w, err := l.fetch(ld, s, have)
		if err != nil {
			return false, err
		}
		comp = append(comp[:len(comp):len(comp)], more...)
		have, onDisk, window, fetched = ld.target, false, w, true
		if have == len(l.chunks[s.ID]) && have > 1 {
			// Chunk by chunk verified; the span digest binds them to the zTOC.
			if err := l.z.VerifySpan(s, comp); err != nil {
				l.opts.Metrics.SpanVerifyFailed()
				return false, err
			}
		}
	} else if ld.class == ClassDemand {
		l.opts.Metrics.SpanCacheHit()
	}
	var out []byte
	if ld.inflate {
		if out, err = l.inflate(ld, s, window, comp, have); err != nil {
			return fetched, err
		}
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

// inflate inflates span s from its checkpoint through the compressed
// prefix comp (its first have chunks) into ld, waking ld's readers as the
// bytes come. A prefix inflates as far as it goes.
func (l *Layer) inflate(ld *load, s ztoc.Span, window, comp []byte, have int) ([]byte, error) {
	if needsWindow(l.z, s) {
		if window == nil {
			ctx, cancel := context.WithTimeout(l.ctx, l.opts.FetchTimeout)
			var err error
			window, err = l.window(ctx, s)
			cancel()
			if err != nil {
				return nil, err
			}
		}
		s.Window = window
	}
	whole := have == len(l.chunks[s.ID])
	to := s.UncompressedEnd
	size := to - s.UncompressedStart
	if !whole {
		size = min(size, l.chunks[s.ID][have-1].UncompressedEnd-s.UncompressedStart+publishEvery)
	}
	if l.z.Algorithm == ztoc.Uncompressed {
		to = min(to, s.UncompressedStart+int64(len(comp)))
	}
	ld.mu.Lock()
	ld.out = make([]byte, 0, size)
	ld.mu.Unlock()
	l.inflations.Add(1)
	err := ztoc.InflateRange(l.z.Algorithm, s, comp, s.UncompressedStart, to, func(b []byte) error {
		if err := l.ctx.Err(); err != nil {
			return err
		}
		ld.append(b)
		return nil
	})
	if err != nil && (whole || l.ctx.Err() != nil) {
		return nil, err
	}
	return ld.bytes(), nil
}

// append adds inflated bytes, waking the waiting reads every
// publishEvery bytes.
func (ld *load) append(b []byte) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	before := len(ld.out)
	ld.out = append(ld.out, b...)
	if len(ld.out)/publishEvery != before/publishEvery {
		close(ld.changed)
		ld.changed = make(chan struct{})
	}
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
// (need < 0: once the load is done), or the load is done, or failed, or
// ctx ended.
func (ld *load) wait(ctx context.Context, need int64) ([]byte, error) {
	for {
		ld.mu.Lock()
		switch {
		case ld.err != nil:
			err := ld.err
			ld.mu.Unlock()
			return nil, err
		case need >= 0 && int64(len(ld.out)) >= need, ld.done:
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
