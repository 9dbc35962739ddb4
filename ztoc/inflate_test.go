package ztoc

// Tests of the read primitives: VerifySpan accepts exactly a span's
// compressed bytes and InflateSpan inflates each span from its checkpoint
// alone. Reads through a whole layer (fetching, corrupt and truncated
// blobs) are package span's tests.

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// eachReaderLayer runs test, as a subtest for each layer flavour of the
// reader tests (plain tar, gzip without compression, gzip -6), on the
// seeded tar compressed that way and its zTOC with 16 KiB spans.
func eachReaderLayer(t *testing.T, seed uint64, test func(t *testing.T, tarball, blob []byte, z *Ztoc, spans []Span)) {
	t.Helper()
	tarball := layertest.SeededTar(t, seed)
	for _, l := range cfCompressionsNamed(t, "tar", "gzip-stored", "gzip-6") {
		t.Run(l.name, func(t *testing.T) {
			blob := l.compress(t, tarball)
			z, r := cfMustReader(t, blob, 16<<10)
			test(t, tarball, blob, z, r.spans)
		})
	}
}

// TestSpanPrimitives exercises VerifySpan and InflateSpan: each span's
// compressed bytes verify, and inflate to its part of the stream from its
// checkpoint alone.
func TestSpanPrimitives(t *testing.T) {
	eachReaderLayer(t, 6, func(t *testing.T, tarball, blob []byte, z *Ztoc, spans []Span) {
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

// TestInflateStream checks that InflateStream emits what InflateRange
// does however its source splits the compressed bytes, that it emits the
// bytes the source gave before the source ends (what lets a span engine
// serve a read while the rest of the span is on its way), and that a
// source that ends early or fails is an error, not short output.
func TestInflateStream(t *testing.T) {
	eachReaderLayer(t, 7, func(t *testing.T, tarball, blob []byte, z *Ztoc, spans []Span) {
		early := 0
		for _, s := range spans {
			comp := blob[s.CompressedStart:s.CompressedEnd]
			end := min(s.UncompressedEnd, z.UncompressedArchiveSize)
			if end <= s.UncompressedStart {
				continue
			}
			want := tarball[s.UncompressedStart:end]
			mid := s.UncompressedStart + (end-s.UncompressedStart)/3
			for name, src := range map[string]io.Reader{
				"one byte": iotest.OneByteReader(bytes.NewReader(comp)),
				"halves":   iotest.HalfReader(bytes.NewReader(comp)),
			} {
				if got := streamed(t, z.Algorithm, s, src, mid, end); !bytes.Equal(got, want[mid-s.UncompressedStart:]) {
					t.Fatalf("span %d, %s reads: %d bytes differ from the tar stream", s.ID, name, len(got))
				}
			}
			half := len(comp) / 2
			gate := &gatedReader{r: bytes.NewReader(comp), open: half}
			var out int
			err := InflateStream(z.Algorithm, s, gate, s.UncompressedStart, end, func(b []byte) error {
				if !gate.passed {
					out += len(b)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("span %d: %v", s.ID, err)
			}
			if out > 0 {
				early++
			} else if z.Algorithm == Uncompressed {
				t.Errorf("span %d: nothing emitted from the first %d bytes", s.ID, half)
			}
			short := io.LimitReader(bytes.NewReader(comp), int64(half))
			if err := InflateStream(z.Algorithm, s, short, s.UncompressedStart, end, func([]byte) error { return nil }); !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("span %d, source ends at half: %v, want io.ErrUnexpectedEOF", s.ID, err)
			}
			boom := errors.New("connection reset")
			failing := io.MultiReader(io.LimitReader(bytes.NewReader(comp), int64(half)), iotest.ErrReader(boom))
			if err := InflateStream(z.Algorithm, s, failing, s.UncompressedStart, end, func([]byte) error { return nil }); !errors.Is(err, boom) {
				t.Errorf("span %d, source fails at half: %v, want %v", s.ID, err, boom)
			}
		}
		if early == 0 {
			t.Errorf("no span emitted bytes before its source ended")
		}
	})
}

// streamed returns the bytes [from, to) InflateStream emits from src.
func streamed(t *testing.T, alg Compression, s Span, src io.Reader, from, to int64) []byte {
	t.Helper()
	var got []byte
	if err := InflateStream(alg, s, src, from, to, func(b []byte) error {
		got = append(got, b...)
		return nil
	}); err != nil {
		t.Fatalf("InflateStream(span %d): %v", s.ID, err)
	}
	return got
}

// gatedReader yields its first open bytes, then records that a read went
// past them (passed) and yields the rest.
type gatedReader struct {
	r      io.Reader
	open   int
	passed bool
}

func (g *gatedReader) Read(p []byte) (int, error) {
	if g.open == 0 {
		g.passed = true
		return g.r.Read(p)
	}
	n, err := g.r.Read(p[:min(len(p), g.open)])
	g.open -= n
	return n, err
}
