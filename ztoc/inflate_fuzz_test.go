package ztoc

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"io"
	"testing"
)

// FuzzInflateStream checks InflateStream against InflateRange on arbitrary
// span bytes (raw deflate from a checkpoint, then gzip members), with an
// arbitrary window, bit offset and split of the bytes into reads: both
// succeed or both fail, and when they succeed they emit the same bytes.
// Seeds: a raw deflate stream with its trailer followed by a gzip member,
// split in a few ways.
func FuzzInflateStream(f *testing.F) {
	var raw bytes.Buffer
	w, _ := flate.NewWriter(&raw, 6)
	w.Write(bytes.Repeat([]byte("spanpull streams spans. "), 300))
	w.Close()
	raw.Write(make([]byte, gzipTrailerSize))
	zw := gzip.NewWriter(&raw)
	zw.Write([]byte("the next member"))
	zw.Close()
	f.Add(raw.Bytes(), uint8(0), []byte(nil), []byte{1, 7, 200})
	f.Add(raw.Bytes(), uint8(0), []byte("window"), []byte{0})
	f.Add(raw.Bytes()[:raw.Len()/2], uint8(3), []byte(nil), []byte{9})
	f.Fuzz(func(t *testing.T, comp []byte, bits uint8, window, splits []byte) {
		if len(window) > WindowSize {
			window = window[:WindowSize]
		}
		s := Span{UncompressedStart: 1000, UncompressedEnd: 1000 + 256<<10, Bits: bits % 8, Window: window}
		var want, got []byte
		errRange := InflateRange(Gzip, s, comp, s.UncompressedStart, s.UncompressedEnd, func(b []byte) error {
			want = append(want, b...)
			return nil
		})
		errStream := InflateStream(Gzip, s, &splitReader{b: comp, splits: splits}, s.UncompressedStart, s.UncompressedEnd, func(b []byte) error {
			got = append(got, b...)
			return nil
		})
		if (errRange == nil) != (errStream == nil) {
			t.Fatalf("InflateRange: %v; InflateStream: %v", errRange, errStream)
		}
		if errRange == nil && !bytes.Equal(got, want) {
			t.Fatalf("InflateStream emitted %d bytes, InflateRange %d, not the same", len(got), len(want))
		}
	})
}

// splitReader reads b in pieces whose sizes (plus one) are the bytes of
// splits, over and over.
type splitReader struct {
	b      []byte
	splits []byte
	k      int
}

func (r *splitReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := len(p)
	if len(r.splits) > 0 {
		n = min(n, int(r.splits[r.k%len(r.splits)])+1)
		r.k++
	}
	n = copy(p, r.b[:min(n, len(r.b))])
	r.b = r.b[n:]
	return n, nil
}
