package ztoc

import "github.com/opencontainers/go-digest"

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
