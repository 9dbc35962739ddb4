package ztoc

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
)

// ErrSpanDigest reports compressed span bytes that do not match the digest
// recorded in the zTOC.
var ErrSpanDigest = errors.New("span digest mismatch")

// gzipTrailerSize is the CRC-32 and ISIZE that end every gzip member.
const gzipTrailerSize = 8

// VerifySpan checks that compressed are exactly the compressed bytes of
// span id, by size and SHA-256.
func (z *Ztoc) VerifySpan(s Span, compressed []byte) error {
	if int(s.ID) < 0 || int(s.ID) >= len(z.SpanDigests) {
		return fmt.Errorf("span %d: no such span (layer has %d)", s.ID, len(z.SpanDigests))
	}
	if int64(len(compressed)) != s.Size() {
		return fmt.Errorf("span %d: got %d compressed bytes, want %d: %w", s.ID, len(compressed), s.Size(), ErrSpanDigest)
	}
	want := z.SpanDigests[s.ID]
	sum := sha256.Sum256(compressed)
	if got := digest.NewDigestFromBytes(digest.SHA256, sum[:]); got != want {
		return fmt.Errorf("span %d: compressed bytes hash to %s, zTOC says %s: %w", s.ID, got, want, ErrSpanDigest)
	}
	return nil
}

// InflateSpan fills dst with the uncompressed bytes at offset off (of the
// layer's tar stream) that lie in span s, decompressing from the span's
// checkpoint and stopping as soon as dst is full. compressed must be the
// span's verified compressed bytes (see VerifySpan). [off, off+len(dst))
// must lie inside the span.
func InflateSpan(algorithm Compression, s Span, compressed []byte, off int64, dst []byte) error {
	end := off + int64(len(dst))
	if off < s.UncompressedStart || end > s.UncompressedEnd {
		return fmt.Errorf("span %d: range [%d, %d) is outside the span [%d, %d)", s.ID, off, end, s.UncompressedStart, s.UncompressedEnd)
	}
	return InflateRange(algorithm, s, compressed, off, end, func(b []byte) error {
		dst = dst[copy(dst, b):]
		return nil
	})
}

// InflateRange passes the uncompressed bytes [from, to) of span s to emit,
// in order and as they are inflated, stopping at to. compressed must be the
// span's verified compressed bytes. emit must not keep the slice.
func InflateRange(algorithm Compression, s Span, compressed []byte, from, to int64, emit func([]byte) error) error {
	return inflateRange(algorithm, s, compressedSource{in: compressed}, from, to, emit)
}

// InflateStream is InflateRange over compressed bytes that arrive while
// they are inflated: src yields span s's compressed bytes from the span
// start, each byte verified before src returns it, and the bytes of the
// range are emitted as soon as the bytes read so far produce them. It
// lets a reader of the start of a span be served while the rest of the
// span is still on its way.
func InflateStream(algorithm Compression, s Span, src io.Reader, from, to int64, emit func([]byte) error) error {
	return inflateRange(algorithm, s, compressedSource{src: src}, from, to, emit)
}

// compressedSource is where a span's compressed bytes come from: a slice
// that holds them all (in), or a reader that yields them (src).
type compressedSource struct {
	in  []byte
	src io.Reader
}

func inflateRange(algorithm Compression, s Span, c compressedSource, from, to int64, emit func([]byte) error) error {
	if from >= to {
		return nil
	}
	switch algorithm {
	case Uncompressed:
		return copyRange(s, c, from, to, emit)
	case Gzip:
		return inflateGzipRange(s, c, from, to, emit)
	}
	return fmt.Errorf("span %d: unknown compression %d", s.ID, algorithm)
}

// copyRange is inflateRange for an uncompressed layer, whose span bytes
// are the stream's bytes.
func copyRange(s Span, c compressedSource, from, to int64, emit func([]byte) error) error {
	if c.src == nil {
		if to-s.UncompressedStart > int64(len(c.in)) {
			return fmt.Errorf("span %d: %d bytes end before uncompressed offset %d: %w", s.ID, len(c.in), to, io.ErrUnexpectedEOF)
		}
		return emit(c.in[from-s.UncompressedStart : to-s.UncompressedStart])
	}
	if _, err := io.CopyN(io.Discard, c.src, from-s.UncompressedStart); err != nil {
		return fmt.Errorf("span %d: skip to uncompressed offset %d: %w", s.ID, from, unexpected(err))
	}
	var buf [64 << 10]byte
	for pos := from; pos < to; {
		n, err := c.src.Read(buf[:min(int64(len(buf)), to-pos)])
		if n > 0 {
			if err := emit(buf[:n]); err != nil {
				return err
			}
			pos += int64(n)
		}
		if err != nil && pos < to {
			return fmt.Errorf("span %d: bytes ended at uncompressed offset %d, before %d: %w", s.ID, pos, to, unexpected(err))
		}
	}
	return nil
}

// unexpected turns the end of the input into io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// inflateGzipRange is inflateRange for a gzip layer: it inflates span s
// from its checkpoint, member after member, and passes on the bytes from
// from on.
func inflateGzipRange(s Span, c compressedSource, from, to int64, emit func([]byte) error) error {
	g, err := openGzipSpan(s, c)
	if err != nil {
		return err
	}
	defer g.inf.close()
	var buf [64 << 10]byte
	for g.pos < to {
		if err := g.fill(1); err != nil {
			return err
		}
		if g.memberDone {
			more, err := g.nextMember()
			if err != nil {
				return err
			}
			if !more {
				break
			}
		}
		out := buf[:min(int64(len(buf)), to-g.pos)]
		produced, progress, err := g.inflate(out)
		if err != nil {
			return err
		}
		if produced > 0 {
			chunk := out[:produced]
			if skip := from - g.pos; skip > 0 {
				chunk = chunk[min(skip, int64(len(chunk))):]
			}
			if len(chunk) > 0 {
				if err := emit(chunk); err != nil {
					return err
				}
			}
			g.pos += int64(produced)
		}
		if !progress && g.src == nil {
			break
		}
	}
	if g.pos < to {
		return fmt.Errorf("span %d: compressed bytes ended at uncompressed offset %d, before %d: %w", s.ID, g.pos, to, io.ErrUnexpectedEOF)
	}
	return nil
}

// gzipSpan inflates one span of a gzip layer. A layer can be several gzip
// members back to back (with zero padding between them), and a span can
// run from one member into the next. The checkpoint's member is inflated
// as raw deflate, so gzipSpan skips its trailer itself; the members after
// it are left to zlib's gzip mode, headers and trailers included.
type gzipSpan struct {
	s          Span
	inf        *inflater
	in         []byte    // compressed bytes not consumed yet
	src        io.Reader // more compressed bytes; nil once they ended (or with all of them in in)
	buf        []byte    // what in points into when bytes come from src
	pos        int64     // uncompressed offset of the next byte out
	raw        bool      // still in the checkpoint's member
	memberDone bool      // the current member's deflate stream has ended
}

// openGzipSpan returns an inflater resumed at span s's checkpoint: the
// bits of the first byte that belong to the span, then the window. The
// caller must close g.inf.
func openGzipSpan(s Span, c compressedSource) (*gzipSpan, error) {
	inf, err := newInflater(windowBitsRaw)
	if err != nil {
		return nil, err
	}
	g := &gzipSpan{s: s, inf: inf, in: c.in, src: c.src, pos: s.UncompressedStart, raw: true}
	if err := g.fill(1); err != nil {
		inf.close()
		return nil, err
	}
	if s.Bits > 0 {
		if len(g.in) == 0 {
			inf.close()
			return nil, fmt.Errorf("span %d: empty compressed bytes", s.ID)
		}
		if err := inf.prime(int(s.Bits), g.in[0]); err != nil {
			inf.close()
			return nil, err
		}
		g.in = g.in[1:]
	}
	if err := inf.setDictionary(s.Window); err != nil {
		inf.close()
		return nil, fmt.Errorf("span %d: %w", s.ID, err)
	}
	return g, nil
}

// nextMember moves from the end of a member to the start of the next one:
// past the raw member's trailer, then past any zero padding; the next
// member's header is zlib's to parse. more is false when the compressed
// bytes end first.
func (g *gzipSpan) nextMember() (more bool, err error) {
	if err := g.fill(gzipTrailerSize + 1); err != nil {
		return false, err
	}
	if g.raw {
		if len(g.in) < gzipTrailerSize {
			return false, fmt.Errorf("span %d: gzip trailer truncated", g.s.ID)
		}
		g.in, g.raw = g.in[gzipTrailerSize:], false
	}
	for len(g.in) > 0 && g.in[0] == 0 {
		if g.in = g.in[1:]; len(g.in) == 0 {
			if err := g.fill(1); err != nil {
				return false, err
			}
		}
	}
	if len(g.in) == 0 {
		return false, nil
	}
	if err := g.inf.reset(windowBitsGzip); err != nil {
		return false, err
	}
	g.memberDone = false
	return true, nil
}

// streamBuffer is how many compressed bytes gzipSpan reads from its
// source at a time.
const streamBuffer = 64 << 10

// fill makes at least n compressed bytes available in g.in, reading them
// from g.src; fewer are there only once the source has ended. An error of
// the source is returned as it is.
func (g *gzipSpan) fill(n int) error {
	for len(g.in) < n && g.src != nil {
		if g.buf == nil {
			g.buf = make([]byte, max(streamBuffer, n))
		}
		k := copy(g.buf, g.in) // what is left moves to the front
		m, err := g.src.Read(g.buf[k:])
		g.in = g.buf[:k+m]
		if err == io.EOF {
			g.src = nil
		} else if err != nil {
			return err // the source's own error, with its own context
		}
	}
	return nil
}

// inflate runs the inflater once into out. It returns how many bytes it
// produced and whether it made any progress (consumed or produced bytes,
// or reached the end of the member).
func (g *gzipSpan) inflate(out []byte) (produced int, progress bool, err error) {
	consumed, produced, ret, _ := g.inf.inflate(g.in, out, zNoFlush)
	g.in = g.in[consumed:]
	switch ret {
	case zOK, zBufError:
	case zStreamEnd:
		g.memberDone = true
	default:
		return 0, false, fmt.Errorf("span %d: inflate at uncompressed offset %d: %w", g.s.ID, g.pos, g.inf.errInflate(ret))
	}
	return produced, consumed > 0 || produced > 0 || g.memberDone, nil
}
