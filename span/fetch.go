package span

import (
	"context"
	"crypto/sha256"
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

// chunkStream is the fetch of chunks [from, to) of span s: one
// range read of the blob, whose bytes it passes on (Read) a chunk at a
// time, each only once it matched its digest, so that inflation (and the
// reads waiting on it) can start on the first chunks while the rest are
// on their way. A chunk that does not match is fetched again, from that
// chunk on, up to VerifyRetries times. It is the only reader of span
// bytes. A demand fetch holds a demand slot until the stream is closed;
// prefetch and fill hold their slot already.
type chunkStream struct {
	l       *Layer
	ctx     context.Context
	class   Class
	s       ztoc.Span
	from    int           // first chunk fetched
	to      int           // chunks [from, to) are fetched
	next    int           // next chunk to read from body
	body    io.ReadCloser // the open range read; nil after a chunk that did not match
	got     []byte        // chunks [from, next), verified
	unread  []byte        // the part of got that Read has not passed on
	retries int
	start   time.Time
	release func() // gives back the demand slot; nil without one
	failed  error  // why a chunk could not be read, if one could not
}

// openChunks starts the fetch of chunks [from, to) of span s: it waits for
// a demand slot (class demand) and sends the range request.
func (l *Layer) openChunks(ctx context.Context, class Class, s ztoc.Span, from, to int) (*chunkStream, error) {
	c := &chunkStream{l: l, ctx: ctx, class: class, s: s, from: from, to: to, next: from, start: time.Now()}
	if class == ClassDemand {
		release, err := l.sched.acquireDemand(ctx, &l.state)
		if err != nil {
			return nil, err
		}
		c.release = release
	}
	c.got = make([]byte, 0, c.end()-l.chunkStart(s, from))
	if err := c.open(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// end is the blob offset where the fetched chunks end.
func (c *chunkStream) end() int64 { return c.l.chunks[c.s.ID][c.to-1].CompressedEnd }

// open sends the range request for chunks [next, to).
func (c *chunkStream) open() error {
	off, end := c.l.chunkStart(c.s, c.next), c.end()
	body, err := c.l.blob.ReadRange(c.ctx, off, end-off)
	if err != nil {
		return fmt.Errorf("fetch compressed bytes %d-%d: %w", off, end-1, err)
	}
	c.body = body
	return nil
}

// Read passes on verified bytes of the span, reading and verifying the
// next chunk when those read so far are used up.
func (c *chunkStream) Read(p []byte) (int, error) {
	for len(c.unread) == 0 {
		if c.next == c.to {
			return 0, io.EOF
		}
		if err := c.readChunk(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.unread)
	c.unread = c.unread[n:]
	return n, nil
}

// readChunk reads chunk next from the range read and verifies it, fetching
// it again (with what follows it) when it does not match.
func (c *chunkStream) readChunk() error {
	if c.failed != nil {
		return c.failed
	}
	if c.failed = c.readNext(); c.failed != nil {
		return c.failed
	}
	return nil
}

// readNext does the work of readChunk.
func (c *chunkStream) readNext() error {
	k := c.next
	lo, hi := c.l.chunkStart(c.s, k), c.l.chunks[c.s.ID][k].CompressedEnd
	buf := c.got[len(c.got) : len(c.got)+int(hi-lo)]
	for {
		if c.body == nil {
			if err := c.open(); err != nil {
				return err
			}
		}
		if _, err := io.ReadFull(c.body, buf); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("fetch compressed bytes %d-%d: %w", lo, hi-1, err)
		}
		err := c.l.verifyChunks(c.s, buf, k, k+1)
		if err == nil {
			break
		}
		c.l.opts.Metrics.SpanVerifyFailed()
		c.body.Close()
		c.body = nil
		if c.retries == c.l.opts.VerifyRetries {
			return err
		}
		c.retries++
	}
	c.got = c.got[:len(c.got)+len(buf)]
	c.unread = buf
	c.next++
	return nil
}

// rest reads the chunks that Read did not reach and returns the verified
// compressed bytes of chunks [from, to).
func (c *chunkStream) rest() ([]byte, error) {
	for c.next < c.to {
		if err := c.readChunk(); err != nil {
			return nil, err
		}
	}
	c.unread = nil
	c.l.opts.Metrics.SpanFetched(c.class, int64(len(c.got)), time.Since(c.start))
	return c.got, nil
}

// Close ends the range read and gives back the demand slot.
func (c *chunkStream) Close() error {
	if c.body != nil {
		c.body.Close()
		c.body = nil
	}
	if c.release != nil {
		c.release()
		c.release = nil
	}
	return nil
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

// windowFor starts fetching span s's window, when the zTOC does not hold
// it, beside the span's own fetch, and returns what waits for it.
func (l *Layer) windowFor(ctx context.Context, s ztoc.Span) func() ([]byte, error) {
	if !needsWindow(l.z, s) {
		return func() ([]byte, error) { return nil, nil }
	}
	type result struct {
		w   []byte
		err error
	}
	done := make(chan result, 1)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		w, err := l.window(ctx, s)
		done <- result{w, err}
	}()
	return func() ([]byte, error) {
		r := <-done
		return r.w, r.err
	}
}
