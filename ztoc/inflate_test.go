package ztoc

// Tests of the read primitives: VerifySpan accepts exactly a span's
// compressed bytes and InflateSpan inflates each span from its checkpoint
// alone. Reads through a whole layer (fetching, corrupt and truncated
// blobs) are package span's tests.

import (
	"bytes"
	"compress/gzip"
	"errors"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// cfReaderLayers are the layer flavours of the reader tests.
var cfReaderLayers = []struct {
	name     string
	compress func(testing.TB, []byte) []byte
}{
	{"tar", func(_ testing.TB, b []byte) []byte { return b }},
	{"gzip-stored", func(t testing.TB, b []byte) []byte { return layertest.Gzip(t, b, gzip.NoCompression) }},
	{"gzip-6", cfGzipCLI("-6")},
}

// TestSpanPrimitives exercises VerifySpan and InflateSpan: each span's
// compressed bytes verify, and inflate to its part of the stream from its
// checkpoint alone.
func TestSpanPrimitives(t *testing.T) {
	tarball := layertest.SeededTar(t, 6)
	for _, l := range cfReaderLayers {
		t.Run(l.name, func(t *testing.T) {
			blob := l.compress(t, tarball)
			z, r := cfMustReader(t, blob, 16<<10)
			spans := r.spans
			for _, s := range spans {
				comp := blob[s.CompressedStart:s.CompressedEnd]
				if err := z.VerifySpan(s, comp); err != nil {
					t.Errorf("VerifySpan(%d): %v", s.ID, err)
				}
				if len(comp) > 0 {
					bad := bytes.Clone(comp)
					bad[len(bad)/2] ^= 1
					if err := z.VerifySpan(s, bad); !errors.Is(err, ErrSpanDigest) {
						t.Errorf("VerifySpan(%d, flipped byte) = %v", s.ID, err)
					}
					if err := z.VerifySpan(s, comp[:len(comp)-1]); !errors.Is(err, ErrSpanDigest) {
						t.Errorf("VerifySpan(%d, short) = %v", s.ID, err)
					}
				}
				end := min(s.UncompressedEnd, z.UncompressedArchiveSize)
				if end <= s.UncompressedStart {
					continue
				}
				whole := make([]byte, end-s.UncompressedStart)
				if err := InflateSpan(z.Algorithm, s, comp, s.UncompressedStart, whole); err != nil {
					t.Fatalf("InflateSpan(%d): %v", s.ID, err)
				}
				if !bytes.Equal(whole, tarball[s.UncompressedStart:end]) {
					t.Errorf("span %d inflates to other bytes", s.ID)
				}
				mid := s.UncompressedStart + (end-s.UncompressedStart)/2
				part := make([]byte, min(100, end-mid))
				if err := InflateSpan(z.Algorithm, s, comp, mid, part); err != nil || !bytes.Equal(part, tarball[mid:mid+int64(len(part))]) {
					t.Errorf("InflateSpan(%d, middle) = %v", s.ID, err)
				}
				if err := InflateSpan(z.Algorithm, s, comp, end-1, make([]byte, 2)); err == nil && end == s.UncompressedEnd {
					t.Errorf("InflateSpan(%d) past the span's end succeeded", s.ID)
				}
			}
		})
	}
}
