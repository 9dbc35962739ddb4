package ztoc

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// BuildOptions tunes Build.
type BuildOptions struct {
	// SpanSize is the number of uncompressed bytes after which the next
	// deflate block boundary becomes a checkpoint. Default DefaultSpanSize.
	SpanSize int64
	// BuildToolIdentifier is written into the zTOC. Default
	// DefaultBuildToolIdentifier.
	BuildToolIdentifier string
	// ChunkSize is the number of compressed bytes per chunk (Ztoc.Chunks).
	// Zero means DefaultChunkSize; a negative value builds no chunk table.
	ChunkSize int64
	// Progress, when set, is called from the reading goroutine with the
	// number of layer bytes read so far.
	Progress func(read int64)
}

// Buffer sizes of the build pipeline. They bound its memory: about 3 input
// chunks and 4 output chunks are alive at once, whatever the layer size.
const (
	inputChunkSize  = 256 << 10
	inputChunks     = 8
	outputChunkSize = 1 << 20
	outputChunks    = 4
)

// Magic numbers used to recognise layer compression.
var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// ErrUnsupportedCompression is returned for layers that are neither gzip
// nor plain tar (zstd, for instance).
var ErrUnsupportedCompression = errors.New("unsupported layer compression")

// Build reads a layer blob once, as a stream, and returns its zTOC and the
// digest of the blob. In that single pass it parses the tar stream into the
// TOC, records a checkpoint at the first deflate block boundary after every
// SpanSize uncompressed bytes, hashes every span's compressed bytes, and
// cuts every span into chunks of ChunkSize compressed bytes (Ztoc.Chunks),
// hashing each and noting how far inflation gets with it. Plain tar layers
// get fixed-size spans. Memory use does not depend on the layer size
// (beyond the zTOC itself).
//
// The stages run concurrently, joined by channels of pooled chunks: the
// reader (hashing and counting the blob), the decompressor (recording
// checkpoints), the span hasher and the tar parser.
func Build(ctx context.Context, r io.Reader, opts BuildOptions) (*Ztoc, digest.Digest, error) {
	opts = opts.withDefaults()
	g, ctx := errgroup.WithContext(ctx)
	layer := &layerReader{r: r, progress: opts.Progress, hash: sha256.New()}
	inputs := make(chan chunk, inputChunks-1)
	tarStream := make(chan chunk, outputChunks-1)
	hashed := make(chan hashChunk, inputChunks-2)
	spans := spanRecorder{chunkSize: opts.ChunkSize}
	var toc tocBuilder
	g.Go(func() error { return layer.run(ctx, inputs) })
	g.Go(func() error { return decompress(ctx, inputs, tarStream, hashed, opts.SpanSize, &spans) })
	g.Go(func() error { return hashSpans(ctx, hashed, &spans) })
	g.Go(func() error { return toc.run(ctx, tarStream) })
	if err := g.Wait(); err != nil {
		return nil, "", err
	}
	z, err := newZtoc(opts, layer.total, &toc, &spans)
	if err != nil {
		return nil, "", err
	}
	return z, digest.NewDigestFromBytes(digest.SHA256, layer.hash.Sum(nil)), nil
}

// withDefaults fills in the options left zero.
func (o BuildOptions) withDefaults() BuildOptions {
	if o.SpanSize <= 0 {
		o.SpanSize = DefaultSpanSize
	}
	if o.BuildToolIdentifier == "" {
		o.BuildToolIdentifier = DefaultBuildToolIdentifier
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	return o
}

// layerReader is the first stage of Build: it reads the blob in chunks,
// hashing and counting it.
type layerReader struct {
	r        io.Reader
	progress func(read int64)
	hash     hash.Hash
	total    int64
}

// run sends the blob's chunks to out and closes it at the end of the blob.
func (l *layerReader) run(ctx context.Context, out chan<- chunk) error {
	pool := newBufferPool(inputChunks, inputChunkSize)
	for {
		buf, err := pool.get(ctx)
		if err != nil {
			return err
		}
		n, rerr := io.ReadFull(l.r, buf)
		if n > 0 {
			l.hash.Write(buf[:n])
			l.total += int64(n)
			if l.progress != nil {
				l.progress(l.total)
			}
			if err := send(ctx, out, chunk{data: buf[:n], release: func() { pool.put(buf) }}); err != nil {
				return err
			}
		} else {
			pool.put(buf)
		}
		switch {
		case rerr == io.EOF || rerr == io.ErrUnexpectedEOF:
			close(out)
			return nil
		case rerr != nil:
			return fmt.Errorf("read layer at offset %d: %w", l.total, rerr)
		}
	}
}

// decompress is the second stage of Build: it inflates a gzip layer, or
// passes a plain tar layer through, to tarStream, recording spans, and
// closes tarStream and hashed once the layer is done.
func decompress(ctx context.Context, inputs <-chan chunk, tarStream chan<- chunk, hashed chan<- hashChunk, spanSize int64, spans *spanRecorder) error {
	first, ok, err := recv(ctx, inputs)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("layer is empty")
	}
	switch {
	case bytes.HasPrefix(first.data, gzipMagic):
		spans.algorithm = Gzip
		err = inflateStream(ctx, first, inputs, tarStream, hashed, spanSize, spans)
	case bytes.HasPrefix(first.data, zstdMagic):
		first.release()
		return fmt.Errorf("%w: zstd", ErrUnsupportedCompression)
	default:
		spans.algorithm = Uncompressed
		err = passTar(ctx, first, inputs, tarStream, spanSize, spans)
	}
	if err != nil {
		return err
	}
	close(tarStream)
	close(hashed)
	return nil
}

// newZtoc assembles the zTOC of a layer of compressedSize bytes from what
// the stages recorded, and checks that its spans are consistent.
func newZtoc(opts BuildOptions, compressedSize int64, toc *tocBuilder, spans *spanRecorder) (*Ztoc, error) {
	z := &Ztoc{
		Version:                 Version,
		BuildToolIdentifier:     opts.BuildToolIdentifier,
		CompressedArchiveSize:   compressedSize,
		UncompressedArchiveSize: toc.archiveSize,
		Files:                   toc.files,
	}
	z.Algorithm = spans.algorithm
	z.MaxSpanID = SpanID(len(spans.digests) - 1)
	z.SpanDigests = spans.digests
	switch spans.algorithm {
	case Gzip:
		blob, err := MarshalGzipZinfo(&GzipZinfo{SpanSize: opts.SpanSize, Checkpoints: spans.checkpoints})
		if err != nil {
			return nil, err
		}
		z.Checkpoints = blob
	case Uncompressed:
		z.Checkpoints = MarshalTarZinfo(TarZinfo{SpanSize: opts.SpanSize, Size: compressedSize})
	}
	spanTable, err := z.Spans()
	if err != nil {
		return nil, fmt.Errorf("built an inconsistent zTOC: %w", err)
	}
	if spans.chunkSize > 0 {
		z.Chunks = spans.chunks
		endChunks(spanTable, z.Chunks)
		if err := checkChunks(spanTable, z.Chunks); err != nil {
			return nil, fmt.Errorf("built an inconsistent chunk table: %w", err)
		}
	}
	return z, nil
}

// endChunks settles the uncompressed ends the stream could not know: the
// last chunk of a span reaches the span's end (the last span's last chunk
// was cut at the end of the blob, with no end recorded), and chunks of the
// last span stop at the archive's end, not in the padding inflated past it.
func endChunks(spans []Span, chunks [][]Chunk) {
	for i, cs := range chunks {
		for k := range cs {
			cs[k].UncompressedEnd = min(cs[k].UncompressedEnd, spans[i].UncompressedEnd)
		}
		if len(cs) > 0 {
			cs[len(cs)-1].UncompressedEnd = spans[i].UncompressedEnd
		}
	}
}

// chunk is a slice of a pipeline buffer; release hands the buffer back.
type chunk struct {
	data    []byte
	release func()
}

func send(ctx context.Context, ch chan<- chunk, c chunk) error {
	select {
	case ch <- c:
		return nil
	case <-ctx.Done():
		c.release()
		return ctx.Err()
	}
}

// recv returns the next chunk; ok is false once ch is closed.
func recv(ctx context.Context, ch <-chan chunk) (c chunk, ok bool, err error) {
	select {
	case c, ok = <-ch:
		return c, ok, nil
	case <-ctx.Done():
		return chunk{}, false, ctx.Err()
	}
}

// bufferPool is a fixed set of reusable buffers; get blocks until one is
// free. Buffers are allocated the first time they are needed, so a small
// layer does not pay for the whole set.
type bufferPool struct {
	free chan []byte
	size int
	left atomic.Int32 // buffers not allocated yet
}

func newBufferPool(n, size int) *bufferPool {
	p := &bufferPool{free: make(chan []byte, n), size: size}
	p.left.Store(int32(n))
	return p
}

func (p *bufferPool) get(ctx context.Context) ([]byte, error) {
	select {
	case b := <-p.free:
		return b, nil
	default:
	}
	if p.left.Add(-1) >= 0 {
		return make([]byte, p.size), nil
	}
	select {
	case b := <-p.free:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *bufferPool) put(b []byte) { p.free <- b[:cap(b)] }

// spanRecorder collects checkpoints, the SHA-256 of each span's
// compressed bytes and the chunk table as the stream goes by.
type spanRecorder struct {
	algorithm   Compression
	checkpoints []Checkpoint
	digests     []digest.Digest
	chunkSize   int64     // compressed bytes per chunk; <= 0: no chunks
	chunks      [][]Chunk // one list per span
	h           hash.Hash // hash of the current span; nil before span 0
	ch          hash.Hash // hash of the current chunk
	chunkLen    int64     // bytes hashed into ch
}

// startSpan starts the digests of a new span and of its first chunk, with
// the byte it shares with the previous span, if any.
func (s *spanRecorder) startSpan(shared []byte) {
	s.h = sha256.New()
	s.h.Write(shared)
	if s.chunkSize > 0 {
		s.chunks = append(s.chunks, nil)
		if s.ch == nil {
			s.ch = sha256.New()
		}
		s.ch.Reset()
		s.ch.Write(shared)
		s.chunkLen = int64(len(shared))
	}
}

func (s *spanRecorder) write(b []byte) {
	if s.h != nil {
		s.h.Write(b)
		if s.chunkSize > 0 {
			s.ch.Write(b)
			s.chunkLen += int64(len(b))
		}
	}
}

// endChunk ends the current chunk at compressed offset end, where out
// uncompressed bytes could be produced, and starts the next one. An empty
// chunk is not recorded.
func (s *spanRecorder) endChunk(end, out int64) {
	if s.h == nil || s.chunkSize <= 0 || s.chunkLen == 0 {
		return
	}
	cs := &s.chunks[len(s.chunks)-1]
	*cs = append(*cs, Chunk{CompressedEnd: end, UncompressedEnd: out, Digest: digest.NewDigestFromBytes(digest.SHA256, s.ch.Sum(nil))})
	s.ch.Reset()
	s.chunkLen = 0
}

// finishSpan ends the current span (and its last chunk) at compressed
// offset end, where out uncompressed bytes could be produced.
func (s *spanRecorder) finishSpan(end, out int64) {
	if s.h != nil {
		s.endChunk(end, out)
		s.digests = append(s.digests, digest.NewDigestFromBytes(digest.SHA256, s.h.Sum(nil)))
		s.h = nil
	}
}

// passTar hashes fixed-size spans of an uncompressed tar layer, and the
// chunks they are cut into, and forwards its bytes to the tar parser
// unchanged. A tar chunk inflates to itself: its uncompressed end is its
// compressed end.
func passTar(ctx context.Context, first chunk, in <-chan chunk, out chan<- chunk, spanSize int64, s *spanRecorder) error {
	var pos int64
	c, ok := first, true
	for ok {
		for b := c.data; len(b) > 0; {
			rel := pos % spanSize
			n := min(int64(len(b)), spanSize-rel)
			switch {
			case rel == 0:
				s.finishSpan(pos, pos)
				s.startSpan(nil)
			case s.chunkSize > 0 && rel%s.chunkSize == 0:
				s.endChunk(pos, pos)
			}
			if s.chunkSize > 0 {
				n = min(n, s.chunkSize-rel%s.chunkSize)
			}
			s.write(b[:n])
			b, pos = b[n:], pos+n
		}
		if err := send(ctx, out, c); err != nil {
			return err
		}
		var err error
		if c, ok, err = recv(ctx, in); err != nil {
			return err
		}
	}
	if s.h == nil { // an empty layer still has one (empty) span
		s.startSpan(nil)
	}
	s.finishSpan(pos, pos)
	return nil
}

// inflateStream decompresses a gzip layer (one or more members), recording
// a checkpoint the way SOCI's zinfo builder does: right after the first
// gzip header, then at the first deflate block boundary (outside a final
// block) once more than spanSize bytes were produced since the last one.
// With chunks, zlib is fed at most up to the next chunk boundary, so that
// the output counted there is what the bytes before it inflate to.
//
// Hashing the spans' and chunks' compressed bytes is left to hashSpans:
// each input chunk goes to hashed, with the places where spans and chunks
// start in it, once inflate is done with it.
func inflateStream(ctx context.Context, first chunk, in <-chan chunk, out chan<- chunk, hashed chan<- hashChunk, spanSize int64, s *spanRecorder) error {
	inf, err := newInflater(windowBitsGzip)
	if err != nil {
		return err
	}
	defer inf.close()
	g := &gzipInflater{inf: inf, spanSize: spanSize, s: s, out: out, outPool: newBufferPool(outputChunks, WindowSize+outputChunkSize), nextCut: math.MaxInt64}
	if err := g.run(ctx, first, in, hashed, g.inflateChunk); err != nil {
		return err
	}
	return g.finish(ctx)
}

// run starts g's output with an empty history window, then inflates first
// and each chunk from in with inflateChunk (the builder's walk or the
// verifier's), handing each input chunk to hashed once it is inflated. It
// leaves the end of the stream (finish) to the caller.
func (g *gzipInflater) run(ctx context.Context, first chunk, in <-chan chunk, hashed chan<- hashChunk, inflateChunk func(context.Context, []byte, *hashChunk) error) error {
	var err error
	if g.cur, err = g.outPool.get(ctx); err != nil {
		first.release()
		return err
	}
	clear(g.cur[:WindowSize])
	g.pos = WindowSize
	c, ok := first, true
	for ok {
		hc := hashChunk{c: c, start: g.totIn}
		if err := inflateChunk(ctx, c.data, &hc); err != nil {
			c.release()
			return err
		}
		select {
		case hashed <- hc:
		case <-ctx.Done():
			c.release()
			return ctx.Err()
		}
		if c, ok, err = recv(ctx, in); err != nil {
			return err
		}
	}
	return nil
}

// gzipInflater is the state of inflateStream between input chunks.
type gzipInflater struct {
	inf      *inflater
	spanSize int64
	s        *spanRecorder
	out      chan<- chunk
	outPool  *bufferPool

	cur []byte // output buffer; cur[pos-WindowSize:pos] is always the history window
	pos int

	totIn, totOut int64
	lastOut       int64 // uncompressed offset of the last checkpoint
	nextCut       int64 // compressed offset of the next chunk boundary (MaxInt64: none)
	memberDone    bool  // the previous member's trailer was read
	padded        bool  // zero padding followed the last member
}

// inflateChunk inflates one input chunk, recording in hc where spans and
// chunks start in it.
func (g *gzipInflater) inflateChunk(ctx context.Context, data []byte, hc *hashChunk) error {
	for len(data) > 0 {
		if g.memberDone {
			var err error
			if data, err = g.betweenMembers(data); err != nil {
				return err
			}
			g.cutChunks(hc) // padding inflates to nothing
			if g.memberDone {
				continue
			}
		}
		in := data[:min(int64(len(data)), g.nextCut-g.totIn)]
		consumed, produced, ret, err := g.step(ctx, in, hc)
		if err != nil {
			return err
		}
		if consumed == 0 && produced == 0 && !g.memberDone && ret != zOK {
			return fmt.Errorf("gzip data at compressed offset %d: inflate made no progress", g.totIn)
		}
		data = data[consumed:]
		if g.totIn >= g.nextCut {
			if err := g.drain(ctx, hc); err != nil {
				return err
			}
			g.cutChunks(hc)
		}
	}
	return nil
}

// betweenMembers reads what follows a member: the next member's header,
// or zero padding up to the end of the blob (nothing may follow padding:
// gzip readers stop there). It returns data without the padding it
// skipped; memberDone stays set while only padding was seen.
func (g *gzipInflater) betweenMembers(data []byte) ([]byte, error) {
	if data[0] == 0 {
		n := len(data) - len(bytes.TrimLeft(data, "\x00"))
		g.totIn += int64(n)
		g.padded = true
		return data[n:], nil
	}
	if g.padded {
		return nil, fmt.Errorf("gzip stream has data after zero padding at compressed offset %d", g.totIn)
	}
	if err := g.inf.reset(windowBitsGzip); err != nil {
		return nil, err
	}
	g.memberDone = false
	return data, nil
}

// step runs inflate once on data and returns how much of it was consumed,
// how much came out, and zlib's return code.
func (g *gzipInflater) step(ctx context.Context, data []byte, hc *hashChunk) (consumed, produced, ret int, err error) {
	// A block boundary can only become a checkpoint once more than
	// spanSize bytes came out since the last one. Up to that point inflate
	// runs freely (Z_BLOCK would return, and zlib copy its window, at every
	// block); past it, it stops at each boundary.
	out, flush := g.cur[g.pos:], zBlock
	if len(g.s.checkpoints) > 0 {
		if room := g.lastOut + g.spanSize - g.totOut; room > 0 {
			out, flush = out[:min(int64(len(out)), room)], zNoFlush
		}
	}
	consumed, produced, ret, dt, err := g.inflate(data, out, flush)
	if err != nil {
		return 0, 0, ret, err
	}
	if !g.memberDone && dt&128 != 0 && dt&64 == 0 && (g.totOut == 0 && len(g.s.checkpoints) == 0 || g.totOut-g.lastOut > g.spanSize) {
		g.checkpoint(uint8(dt&7), hc)
	}
	if g.pos == len(g.cur) {
		if err := g.emit(ctx); err != nil {
			return 0, 0, ret, err
		}
	}
	return consumed, produced, ret, nil
}

// inflate runs zlib inflate once from data into out (which starts at
// g.cur[g.pos:]) and counts what it consumed and produced; a member's end
// sets memberDone. It returns zlib's return code and data_type, and an
// error for a corrupt stream.
func (g *gzipInflater) inflate(data, out []byte, flush int) (consumed, produced, ret, dt int, err error) {
	consumed, produced, ret, dt = g.inf.inflate(data, out, flush)
	g.totIn += int64(consumed)
	g.totOut += int64(produced)
	g.pos += produced
	switch ret {
	case zOK, zBufError:
	case zStreamEnd:
		g.memberDone = true
	default:
		return consumed, produced, ret, dt, fmt.Errorf("gzip data at compressed offset %d: %w", g.totIn, g.inf.errInflate(ret))
	}
	return consumed, produced, ret, dt, nil
}

// drain runs inflate without new input until nothing more comes out, so
// that the output counts everything the input so far inflates to (zlib
// holds back what did not fit the output buffer).
func (g *gzipInflater) drain(ctx context.Context, hc *hashChunk) error {
	for !g.memberDone {
		_, produced, _, err := g.step(ctx, nil, hc)
		if err != nil || produced == 0 {
			return err
		}
	}
	return nil
}

// cutChunks ends the chunks whose boundary the input has reached, each
// with the output produced so far.
func (g *gzipInflater) cutChunks(hc *hashChunk) {
	for g.nextCut <= g.totIn {
		hc.cuts = append(hc.cuts, streamCut{in: g.nextCut, out: g.totOut})
		g.nextCut += g.s.chunkSize
	}
}

// checkpoint records a checkpoint at the current block boundary, whose
// first byte holds bits bits of the previous block, and where the span
// starting there begins in the input chunk. The span's first chunk
// starts with it.
func (g *gzipInflater) checkpoint(bits uint8, hc *hashChunk) {
	hc.cuts = append(hc.cuts, streamCut{in: g.totIn, out: g.totOut, bits: bits, span: true})
	g.s.checkpoints = append(g.s.checkpoints, Checkpoint{
		In: g.totIn, Out: g.totOut, Bits: bits,
		Window: bytes.Clone(g.cur[g.pos-WindowSize : g.pos]),
	})
	g.lastOut = g.totOut
	if g.s.chunkSize > 0 {
		start := g.totIn
		if bits > 0 {
			start--
		}
		g.nextCut = start + g.s.chunkSize
	}
}

// emit sends the full output buffer on and continues in a new one that
// starts with the history window.
func (g *gzipInflater) emit(ctx context.Context) error {
	next, err := g.outPool.get(ctx)
	if err != nil {
		return err
	}
	copy(next[:WindowSize], g.cur[g.pos-WindowSize:g.pos])
	if err := g.sendCur(ctx); err != nil {
		return err
	}
	g.cur, g.pos = next, WindowSize
	return nil
}

// sendCur sends the output in cur (after the window) on.
func (g *gzipInflater) sendCur(ctx context.Context) error {
	done := g.cur
	return send(ctx, g.out, chunk{data: done[WindowSize:g.pos], release: func() { g.outPool.put(done) }})
}

// finish checks that the stream ended with a whole member and sends the
// last output on.
func (g *gzipInflater) finish(ctx context.Context) error {
	if !g.memberDone {
		return fmt.Errorf("gzip stream truncated at compressed offset %d (uncompressed %d): %w", g.totIn, g.totOut, io.ErrUnexpectedEOF)
	}
	if len(g.s.checkpoints) == 0 {
		return errors.New("gzip stream has no deflate data")
	}
	if g.pos > WindowSize {
		return g.sendCur(ctx)
	}
	g.outPool.put(g.cur)
	return nil
}

// streamCut is where a span or a chunk starts in the compressed stream:
// at byte in, or, for a span with bits > 0, at the low bits of byte in-1
// (the span's first chunk starts at in-1 then). The chunk before it ends
// at in, where out uncompressed bytes could be produced.
type streamCut struct {
	in, out int64
	bits    uint8
	span    bool // a span starts here, not just a chunk
}

// hashChunk is an input chunk inflate is done with, and the spans and
// chunks that start in it.
type hashChunk struct {
	c     chunk
	start int64 // compressed offset of c.data[0]
	cuts  []streamCut
}

// hashSpans computes the SHA-256 of every span's and every chunk's
// compressed bytes from the input chunks inflateStream hands over, then
// releases them. Bytes before the first span (the gzip header) belong to
// no span; a byte whose bits are split between two spans counts in both.
func hashSpans(ctx context.Context, in <-chan hashChunk, s *spanRecorder) error {
	var lastByte byte
	var end int64
	for {
		var hc hashChunk
		var ok bool
		select {
		case hc, ok = <-in:
		case <-ctx.Done():
			return ctx.Err()
		}
		if !ok {
			s.finishSpan(end, -1) // endChunks settles the last chunk's uncompressed end
			return nil
		}
		data, pos := hc.c.data, 0
		for _, cut := range hc.cuts {
			off := int(cut.in - hc.start)
			s.write(data[pos:off])
			pos = off
			if !cut.span {
				s.endChunk(cut.in, cut.out)
				continue
			}
			var shared []byte
			switch {
			case cut.bits == 0:
			case off > 0:
				shared = data[off-1 : off]
			default:
				shared = []byte{lastByte}
			}
			s.finishSpan(cut.in, cut.out)
			s.startSpan(shared)
		}
		s.write(data[pos:])
		if len(data) > 0 {
			lastByte = data[len(data)-1]
		}
		end = hc.start + int64(len(data))
		hc.c.release()
	}
}

// tocBuilder parses the uncompressed tar stream into FileMetadata entries.
type tocBuilder struct {
	files       []FileMetadata
	archiveSize int64
	// each, when set, takes every entry in archive order instead of
	// files: VerifyLayer compares entries as they come rather than keep a
	// second TOC in memory.
	each func(*FileMetadata)
}

func (t *tocBuilder) run(ctx context.Context, in <-chan chunk) error {
	sr := &streamReader{ctx: ctx, in: in}
	tr := tar.NewReader(sr)
	for {
		// Keep the bytes archive/tar reads for the header: sparse maps
		// are parsed from them.
		sr.tap, sr.tapping, sr.tapOverflow = sr.tap[:0], true, false
		hdr, err := tr.Next()
		sr.tapping = false
		if err == io.EOF {
			// The end-of-archive marker; what follows is padding, still
			// to be inflated (and checked) upstream.
			t.archiveSize = sr.pos
			sr.drain()
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read tar entry at uncompressed offset %d: %w", sr.pos, err)
		}
		fm, ok, err := tocEntry(hdr, sr.tap, sr.tapOverflow, sr.pos)
		if err != nil {
			return err
		}
		switch {
		case ok && t.each != nil:
			t.each(&fm)
		case ok:
			t.files = append(t.files, fm)
		}
	}
}

// tocTypes maps the tar type flags of the entries a TOC holds to their
// types (archive/tar turns TypeRegA into TypeReg).
var tocTypes = map[byte]string{
	tar.TypeReg:       TypeReg,
	tar.TypeCont:      TypeReg,
	tar.TypeGNUSparse: TypeReg,
	tar.TypeDir:       TypeDir,
	tar.TypeSymlink:   TypeSymlink,
	tar.TypeLink:      TypeHardlink,
	tar.TypeChar:      TypeChar,
	tar.TypeBlock:     TypeBlock,
	tar.TypeFifo:      TypeFifo,
}

// fileMetadata converts a tar header whose data starts at dataOffset. It
// reports ok=false for entries that carry no file (PAX global headers).
func fileMetadata(hdr *tar.Header, dataOffset int64) (FileMetadata, bool, error) {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		// PAX global headers describe the archive, not a file. SOCI fails
		// on them; we leave them out of the TOC.
		return FileMetadata{}, false, nil
	}
	typ, ok := tocTypes[hdr.Typeflag]
	if !ok {
		return FileMetadata{}, false, fmt.Errorf("tar entry %q at uncompressed offset %d: unsupported type %q", hdr.Name, dataOffset, hdr.Typeflag)
	}
	// The same rules as the zTOC decoder's (containerd's): a layer that
	// could not be read back is not built.
	if err := checkEntryNames(hdr.Name, typ, hdr.Linkname); err != nil {
		return FileMetadata{}, false, fmt.Errorf("tar entry %q at uncompressed offset %d: %w", hdr.Name, dataOffset, err)
	}
	fm := FileMetadata{
		Name:               hdr.Name,
		Type:               typ,
		UncompressedOffset: dataOffset,
		UncompressedSize:   hdr.Size,
		Linkname:           hdr.Linkname,
		Mode:               hdr.Mode,
		UID:                uint32(hdr.Uid),
		GID:                uint32(hdr.Gid),
		Uname:              hdr.Uname,
		Gname:              hdr.Gname,
		ModTime:            tocTime(hdr.ModTime),
		Devmajor:           hdr.Devmajor,
		Devminor:           hdr.Devminor,
	}
	if len(hdr.PAXRecords) > 0 {
		fm.PAXRecords = hdr.PAXRecords
	}
	return fm, true, nil
}

// tocTime normalises a tar mtime to what the zTOC can carry: UTC, and the
// zero Time when the year does not fit RFC 3339 (SOCI writes "").
func tocTime(t time.Time) time.Time {
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		return time.Time{}
	}
	return t
}

// streamReader presents the chunks of the uncompressed stream as an
// io.Reader for archive/tar, counting the position. Forward Seek lets the
// tar reader skip file contents without copying them.
type streamReader struct {
	ctx  context.Context
	in   <-chan chunk
	cur  chunk
	buf  []byte // unread part of cur
	pos  int64
	done bool
	// While tapping, Read keeps a copy of what it returns in tap (up to
	// maxTap bytes; tapOverflow records that more was read).
	tapping     bool
	tap         []byte
	tapOverflow bool
}

// maxTap bounds the header bytes kept for one entry; archive/tar itself
// refuses PAX and GNU long-name headers over 1 MiB.
const maxTap = 4 << 20

// next makes buf non-empty; it returns io.EOF at the end of the stream.
func (s *streamReader) next() error {
	for len(s.buf) == 0 {
		if s.cur.release != nil {
			s.cur.release()
			s.cur = chunk{}
		}
		if s.done {
			return io.EOF
		}
		c, ok, err := recv(s.ctx, s.in)
		if err != nil {
			return err
		}
		if !ok {
			s.done = true
			return io.EOF
		}
		s.cur, s.buf = c, c.data
	}
	return nil
}

func (s *streamReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := s.next(); err != nil {
		return 0, err
	}
	n := copy(p, s.buf)
	if s.tapping {
		if len(s.tap)+n <= maxTap {
			s.tap = append(s.tap, p[:n]...)
		} else {
			s.tapOverflow = true
		}
	}
	s.buf = s.buf[n:]
	s.pos += int64(n)
	return n, nil
}

// Seek supports only forward moves relative to the current position.
func (s *streamReader) Seek(offset int64, whence int) (int64, error) {
	if whence != io.SeekCurrent || offset < 0 {
		return s.pos, errors.New("streamReader: only forward relative seeks")
	}
	for offset > 0 {
		if err := s.next(); err != nil {
			if err == io.EOF {
				return s.pos, nil
			}
			return s.pos, err
		}
		n := min(int64(len(s.buf)), offset)
		s.buf = s.buf[n:]
		s.pos += n
		offset -= n
	}
	return s.pos, nil
}

// drain releases every remaining chunk so the producer never blocks.
func (s *streamReader) drain() {
	s.buf = nil
	for s.next() == nil {
		s.buf = nil
	}
}
