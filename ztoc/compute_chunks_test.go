package ztoc

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestComputeChunks: chunks tile each span, their digests are those of
// their bytes, and inflating a span's bytes up to the end of chunk k
// yields the stream up to chunk k's UncompressedEnd (and no less), for
// every way a layer is compressed.
func TestComputeChunks(t *testing.T) {
	var tarball []byte
	for _, g := range cfGeneratedTars(t) {
		if g.name == "edge16k" {
			tarball = g.tar
		}
	}
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6", "gzip-stored", "gzip-multi-tiny", "pigz") {
		t.Run(c.name, func(t *testing.T) {
			blob := c.compress(t, tarball)
			z, r := cfMustReader(t, blob, 16<<10)
			spans := r.spans
			stream := cfUncompressed(t, blob)
			for _, s := range spans {
				comp := blob[s.CompressedStart:s.CompressedEnd]
				chunks, err := ComputeChunks(z.Algorithm, s, comp, 1000)
				if err != nil {
					t.Fatalf("span %d: %v", s.ID, err)
				}
				if err := verifyComputedChunks(z.Algorithm, s, comp, chunks, stream); err != nil {
					t.Fatalf("span %d: %v", s.ID, err)
				}
			}
		})
	}
	if _, err := ComputeChunks(Gzip, Span{CompressedEnd: 10}, make([]byte, 10), 0); err == nil {
		t.Error("chunk size 0 accepted")
	}
	if _, err := ComputeChunks(Gzip, Span{CompressedEnd: 10}, make([]byte, 9), 4); err == nil {
		t.Error("short span bytes accepted")
	}
}

func verifyComputedChunks(alg Compression, s Span, comp []byte, chunks []Chunk, stream []byte) error {
	start, out := s.CompressedStart, s.UncompressedStart
	for k, c := range chunks {
		if c.CompressedEnd <= start || c.CompressedEnd-start > 1000 || c.UncompressedEnd < out || c.UncompressedEnd > s.UncompressedEnd {
			return fmt.Errorf("chunk %d: [%d, %d) reaching %d after %d", k, start, c.CompressedEnd, c.UncompressedEnd, out)
		}
		sum := sha256.Sum256(comp[start-s.CompressedStart : c.CompressedEnd-s.CompressedStart])
		if c.Digest != digest.NewDigestFromBytes(digest.SHA256, sum[:]) {
			return fmt.Errorf("chunk %d: wrong digest", k)
		}
		var got bytes.Buffer
		prefix := comp[:c.CompressedEnd-s.CompressedStart]
		err := InflateRange(alg, s, prefix, s.UncompressedStart, c.UncompressedEnd, func(b []byte) error {
			got.Write(b)
			return nil
		})
		if err != nil || !bytes.Equal(got.Bytes(), stream[s.UncompressedStart:c.UncompressedEnd]) {
			return fmt.Errorf("chunk %d: inflating through it to %d: %v", k, c.UncompressedEnd, err)
		}
		// UncompressedEnd is as far as the prefix goes, not a guess.
		if alg == Gzip && c.UncompressedEnd < s.UncompressedEnd && InflateRange(alg, s, prefix, s.UncompressedStart, c.UncompressedEnd+1, func([]byte) error { return nil }) == nil {
			return fmt.Errorf("chunk %d: its prefix inflates past %d", k, c.UncompressedEnd)
		}
		start, out = c.CompressedEnd, c.UncompressedEnd
	}
	if start != s.CompressedEnd || out != s.UncompressedEnd {
		return fmt.Errorf("chunks end at %d/%d, span at %d/%d", start, out, s.CompressedEnd, s.UncompressedEnd)
	}
	return nil
}
