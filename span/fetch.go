package span

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// chunkTable returns the chunks of every span: the zTOC's chunk marks,
// checked against the span table, or for a span without marks one chunk
// that is the whole span (verified by the span digest).
func chunkTable(z *ztoc.Ztoc, spans []ztoc.Span) ([][]ztoc.Chunk, error) {
	if z.Chunks != nil && len(z.Chunks) != len(spans) {
		return nil, fmt.Errorf("chunk marks for %d spans, the layer has %d", len(z.Chunks), len(spans))
	}
	table := make([][]ztoc.Chunk, len(spans))
	for i, s := range spans {
		if z.Chunks == nil || len(z.Chunks[i]) == 0 {
			table[i] = []ztoc.Chunk{{CompressedEnd: s.CompressedEnd, UncompressedEnd: s.UncompressedEnd, Digest: z.SpanDigests[i]}}
			continue
		}
		start, out := s.CompressedStart, s.UncompressedStart
		for k, c := range z.Chunks[i] {
			if c.CompressedEnd <= start || c.UncompressedEnd < out || c.UncompressedEnd > s.UncompressedEnd || c.Digest.Algorithm() != digest.SHA256 || c.Digest.Validate() != nil {
				return nil, fmt.Errorf("span %d: chunk %d (ends %d/%d, digest %q) does not follow the chunk before it", i, k, c.CompressedEnd, c.UncompressedEnd, c.Digest)
			}
			start, out = c.CompressedEnd, c.UncompressedEnd
		}
		if start != s.CompressedEnd {
			return nil, fmt.Errorf("span %d: chunks end at %d, the span at %d", i, start, s.CompressedEnd)
		}
		table[i] = z.Chunks[i]
	}
	return table, nil
}

// chunkStart returns the blob offset of chunk k of span s.
func (l *Layer) chunkStart(s ztoc.Span, k int) int64 {
	if k == 0 {
		return s.CompressedStart
	}
	return l.chunks[s.ID][k-1].CompressedEnd
}

// needsWindow reports whether span s is inflated with a window that the
// zTOC does not hold.
func needsWindow(z *ztoc.Ztoc, s ztoc.Span) bool {
	return z.Algorithm == ztoc.Gzip && s.Window == nil && s.UncompressedStart > 0
}

// fetch fetches chunks [have, ld.target) of span s within FetchTimeout
// and, when ld inflates a span whose window comes from Options.Windows,
// the window at the same time.
func (l *Layer) fetch(ld *load, s ztoc.Span, have int) (more, window []byte, err error) {
	ctx, cancel := context.WithTimeout(l.ctx, l.opts.FetchTimeout)
	defer cancel()
	type result struct {
		w   []byte
		err error
	}
	var windowc chan result
	if ld.inflate && needsWindow(l.z, s) {
		windowc = make(chan result, 1)
		go func() {
			w, err := l.window(ctx, s)
			windowc <- result{w, err}
		}()
	}
	more, err = l.fetchChunks(ctx, ld.class, s, have, ld.target)
	if windowc != nil {
		if err != nil {
			cancel()
		}
		r := <-windowc
		window = r.w
		if err == nil {
			err = r.err
		}
	}
	if errors.Is(err, context.DeadlineExceeded) && l.ctx.Err() == nil {
		err = fmt.Errorf("fetch timed out after %s: %w", l.opts.FetchTimeout, err)
	}
	return more, window, err
}

// fetchChunks returns chunks [from, to) of span s, verified: one range
// read of the blob, repeated (up to VerifyRetries times) while the bytes
// do not match their digests. It is the only reader of span bytes. A
// demand fetch first waits for a demand slot; prefetch and fill hold
// their slot already.
func (l *Layer) fetchChunks(ctx context.Context, class Class, s ztoc.Span, from, to int) ([]byte, error) {
	if class == ClassDemand {
		release, err := l.sched.acquireDemand(ctx, &l.state)
		if err != nil {
			return nil, err
		}
		defer release()
	}
	off, end := l.chunkStart(s, from), l.chunks[s.ID][to-1].CompressedEnd
	var err error
	for attempt := 0; attempt <= l.opts.VerifyRetries; attempt++ {
		start := time.Now()
		var b []byte
		if b, err = l.readCompressed(ctx, off, end); err != nil {
			return nil, err
		}
		if err = l.verifyChunks(s, b, from, to); err != nil {
			l.opts.Metrics.SpanVerifyFailed()
			continue
		}
		l.opts.Metrics.SpanFetched(class, end-off, time.Since(start))
		return b, nil
	}
	return nil, err
}

// readCompressed reads the blob's bytes [off, end).
func (l *Layer) readCompressed(ctx context.Context, off, end int64) ([]byte, error) {
	b := make([]byte, end-off)
	n, err := l.blob.ReadAt(ctx, b, off)
	if n == len(b) {
		return b, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return nil, fmt.Errorf("fetch compressed bytes %d-%d: %w", off, end-1, err)
}

// verifyChunks checks b against the digests of chunks [from, to) of span
// s; a span without marks is checked against its span digest.
func (l *Layer) verifyChunks(s ztoc.Span, b []byte, from, to int) error {
	if from == 0 && to == len(l.chunks[s.ID]) && to == 1 {
		return l.z.VerifySpan(s, b)
	}
	base := l.chunkStart(s, from)
	for k := from; k < to; k++ {
		c := l.chunks[s.ID][k]
		piece := b[l.chunkStart(s, k)-base : c.CompressedEnd-base]
		sum := sha256.Sum256(piece)
		if got := digest.NewDigestFromBytes(digest.SHA256, sum[:]); got != c.Digest {
			return fmt.Errorf("span %d: chunk %d (compressed bytes %d-%d) hashes to %s, want %s: %w",
				s.ID, k, l.chunkStart(s, k), c.CompressedEnd-1, got, c.Digest, ztoc.ErrSpanDigest)
		}
	}
	return nil
}

// verifyPrefix checks cached bytes b, a prefix of span s's compressed
// bytes, and returns how many chunks they hold. The whole span is checked
// against its span digest, a part against its chunks' digests.
func (l *Layer) verifyPrefix(s ztoc.Span, b []byte) (int, error) {
	n := len(l.chunks[s.ID])
	k := l.chunksIn(s, int64(len(b)))
	if k == 0 || l.chunkStart(s, k) != s.CompressedStart+int64(len(b)) {
		return 0, fmt.Errorf("span %d: %d cached bytes do not end on a chunk", s.ID, len(b))
	}
	if k == n {
		return k, l.z.VerifySpan(s, b)
	}
	return k, l.verifyChunks(s, b, 0, k)
}

// window returns span s's window from Options.Windows (once per span).
func (l *Layer) window(ctx context.Context, s ztoc.Span) ([]byte, error) {
	l.mu.Lock()
	w := l.windows[s.ID]
	l.mu.Unlock()
	if w != nil {
		return w, nil
	}
	w, err := l.opts.Windows.Window(ctx, s.ID)
	if err != nil {
		return nil, fmt.Errorf("window of span %d: %w", s.ID, err)
	}
	if len(w) == 0 || len(w) > ztoc.WindowSize {
		return nil, fmt.Errorf("window of span %d has %d bytes, want 1 to %d", s.ID, len(w), ztoc.WindowSize)
	}
	l.mu.Lock()
	l.windows[s.ID] = w
	l.mu.Unlock()
	return w, nil
}
