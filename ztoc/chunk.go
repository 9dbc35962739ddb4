package ztoc

import (
	"crypto/sha256"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Chunk is a piece of a span's compressed bytes that can be fetched and
// verified on its own, so that a read near the start of a span does not
// have to fetch the whole span. A span's chunks tile its compressed range
// [CompressedStart, CompressedEnd) in order: chunk k covers the bytes from
// the end of chunk k-1 (the span start for k = 0) to CompressedEnd.
//
// Chunks are not part of SOCI's zTOC format; they come from spanpull's
// pack (a companion artifact of the zTOC) or from Build with a chunk size.
type Chunk struct {
	// CompressedEnd is the blob offset just past the chunk's last byte.
	CompressedEnd int64
	// UncompressedEnd is how far inflation from the span's checkpoint gets
	// once every byte up to CompressedEnd has been consumed: all
	// uncompressed bytes before it can be produced from chunks 0..k.
	UncompressedEnd int64
	// Digest is the SHA-256 of the chunk's compressed bytes.
	Digest digest.Digest
}

// DefaultChunkSize is the compressed size of a chunk when BuildOptions
// leave it unset: small enough that a read near a span's start fetches a
// small part of a 4 MiB span (about 1.4 MB of gzip), large enough that
// the chunk table stays a small fraction of the zTOC (one entry per
// 64 KiB of layer).
const DefaultChunkSize int64 = 64 << 10

// checkChunks checks that chunks is a chunk table of the span table
// spans: nil (no chunks), or one list per span whose chunks are non-empty,
// tile the span's compressed range in order, and have uncompressed ends
// that never decrease, stay inside the span and reach its end with the
// last chunk. A span with no compressed bytes has no chunks.
func checkChunks(spans []Span, chunks [][]Chunk) error {
	if chunks == nil {
		return nil
	}
	if len(chunks) != len(spans) {
		return fmt.Errorf("chunk table has %d spans, the layer %d", len(chunks), len(spans))
	}
	for i, s := range spans {
		cs := chunks[i]
		if len(cs) == 0 {
			if s.Size() > 0 {
				return fmt.Errorf("span %d: no chunks for %d compressed bytes", i, s.Size())
			}
			continue
		}
		in, out := s.CompressedStart, s.UncompressedStart
		for k, c := range cs {
			if c.CompressedEnd <= in || c.CompressedEnd > s.CompressedEnd {
				return fmt.Errorf("span %d chunk %d: compressed end %d is not in (%d, %d]", i, k, c.CompressedEnd, in, s.CompressedEnd)
			}
			if c.UncompressedEnd < out || c.UncompressedEnd > s.UncompressedEnd {
				return fmt.Errorf("span %d chunk %d: uncompressed end %d is not in [%d, %d]", i, k, c.UncompressedEnd, out, s.UncompressedEnd)
			}
			if err := checkSHA256(c.Digest); err != nil {
				return fmt.Errorf("span %d chunk %d: %w", i, k, err)
			}
			in, out = c.CompressedEnd, c.UncompressedEnd
		}
		if in != s.CompressedEnd || out != s.UncompressedEnd {
			return fmt.Errorf("span %d: chunks end at %d/%d, the span at %d/%d", i, in, out, s.CompressedEnd, s.UncompressedEnd)
		}
	}
	return nil
}

// checkSHA256 checks that d is a well-formed SHA-256 digest.
func checkSHA256(d digest.Digest) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("digest %q: %w", d, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("digest %q: algorithm is not sha256", d)
	}
	return nil
}

// ComputeChunks cuts span s's compressed bytes into chunks of size bytes
// (the last one shorter) and records, for each, how far inflation from the
// span's checkpoint gets once the chunk has been consumed. compressed must
// be the span's verified compressed bytes. It is what a builder of chunk
// marks computes; it does no I/O.
func ComputeChunks(algorithm Compression, s Span, compressed []byte, size int64) ([]Chunk, error) {
	if size <= 0 {
		return nil, fmt.Errorf("span %d: chunk size %d is not positive", s.ID, size)
	}
	if int64(len(compressed)) != s.Size() {
		return nil, fmt.Errorf("span %d: got %d compressed bytes, want %d", s.ID, len(compressed), s.Size())
	}
	reach := func(end int) (int64, error) { return s.UncompressedStart + int64(end), nil }
	switch algorithm {
	case Uncompressed:
	case Gzip:
		g, err := openGzipSpan(s, compressedSource{in: compressed})
		if err != nil {
			return nil, err
		}
		defer g.inf.close()
		used := len(compressed) - len(g.in) // the primed byte
		reach = func(end int) (int64, error) {
			g.in = compressed[used:end]
			err := g.drain()
			used = end - len(g.in)
			return g.pos, err
		}
	default:
		return nil, fmt.Errorf("span %d: unknown compression %d", s.ID, algorithm)
	}
	var chunks []Chunk
	for start := 0; start < len(compressed); {
		end := int(min(int64(start)+size, int64(len(compressed))))
		out, err := reach(end)
		if err != nil {
			return nil, err
		}
		if end == len(compressed) {
			out = s.UncompressedEnd // all of the span's bytes produce all of it
		}
		sum := sha256.Sum256(compressed[start:end])
		chunks = append(chunks, Chunk{
			CompressedEnd:   s.CompressedStart + int64(end),
			UncompressedEnd: min(out, s.UncompressedEnd),
			Digest:          digest.NewDigestFromBytes(digest.SHA256, sum[:]),
		})
		start = end
	}
	return chunks, nil
}

// drain inflates (discarding the output) until the compressed bytes in
// g.in run out, moving on to following members as inflateGzipRange does.
// A member trailer that is not whole yet is left in g.in.
func (g *gzipSpan) drain() error {
	var buf [64 << 10]byte
	for {
		if g.memberDone {
			if g.raw && len(g.in) < gzipTrailerSize {
				return nil
			}
			more, err := g.nextMember()
			if err != nil || !more {
				return err
			}
		}
		produced, progress, err := g.inflate(buf[:])
		if err != nil {
			return err
		}
		g.pos += int64(produced)
		if !progress {
			return nil
		}
	}
}
