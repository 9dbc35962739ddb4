package ztoc

import (
	"encoding/binary"
	"errors"
	"fmt"

	flatbuffers "github.com/google/flatbuffers/go"
)

// Layout of the gzip checkpoint blob (SOCI's gzip_zinfo.c): a 12-byte
// header (int32 count, int64 span size) and count packed records of
// in(int64) out(int64) bits(uint8) window(32 KiB), all little-endian.
const (
	zinfoHeaderSize = 12
	checkpointSize  = 8 + 8 + 1 + WindowSize
	// v1Checkpoint0In is the implied first checkpoint of a v1 blob: just
	// past a bare 10-byte gzip header.
	v1Checkpoint0In = 10
	// tarZinfoVersion is the version written into TarZinfo.
	tarZinfoVersion = 2
)

// Checkpoint is the state needed to restart inflation at a deflate block
// boundary.
type Checkpoint struct {
	// In is the compressed offset of the first full byte after the boundary.
	In int64
	// Out is the uncompressed offset of the boundary.
	Out int64
	// Bits is the number of unused high bits of byte In-1 that belong to
	// the next block.
	Bits uint8
	// Window is the 32 KiB of uncompressed data preceding Out.
	Window []byte
}

// GzipZinfo is a decoded gzip checkpoint blob.
type GzipZinfo struct {
	SpanSize    int64
	Checkpoints []Checkpoint
	// V1 records that the blob was in the v1 layout (checkpoint 0 implied,
	// not stored); MarshalGzipZinfo keeps that layout so digests survive.
	V1 bool
}

// MarshalGzipZinfo encodes a gzip checkpoint blob (v2 layout unless z.V1).
func MarshalGzipZinfo(z *GzipZinfo) ([]byte, error) {
	cps := z.Checkpoints
	if z.V1 {
		if len(cps) == 0 || cps[0].In != v1Checkpoint0In || cps[0].Out != 0 || cps[0].Bits != 0 {
			return nil, errors.New("encode zinfo v1: checkpoint 0 is not the implied one (in=10, out=0)")
		}
		cps = cps[1:]
	}
	n := len(z.Checkpoints)
	buf := make([]byte, zinfoHeaderSize+len(cps)*checkpointSize)
	binary.LittleEndian.PutUint32(buf[0:], uint32(n))
	binary.LittleEndian.PutUint64(buf[4:], uint64(z.SpanSize))
	p := buf[zinfoHeaderSize:]
	for i, c := range cps {
		if len(c.Window) > WindowSize {
			return nil, fmt.Errorf("encode zinfo: checkpoint %d window is %d bytes, want at most %d", i, len(c.Window), WindowSize)
		}
		binary.LittleEndian.PutUint64(p[0:], uint64(c.In))
		binary.LittleEndian.PutUint64(p[8:], uint64(c.Out))
		p[16] = c.Bits
		// A short window is right-aligned: zeros stand for the history
		// that does not exist before the start of the stream.
		copy(p[17+WindowSize-len(c.Window):17+WindowSize], c.Window)
		p = p[checkpointSize:]
	}
	return buf, nil
}

// UnmarshalGzipZinfo decodes a gzip checkpoint blob, v1 or v2 (told apart
// by length). Windows alias b.
func UnmarshalGzipZinfo(b []byte) (*GzipZinfo, error) {
	if len(b) < zinfoHeaderSize {
		return nil, fmt.Errorf("decode zinfo: %d bytes is shorter than the %d-byte header", len(b), zinfoHeaderSize)
	}
	n := int64(int32(binary.LittleEndian.Uint32(b[0:])))
	spanSize := int64(binary.LittleEndian.Uint64(b[4:]))
	if n <= 0 {
		return nil, fmt.Errorf("decode zinfo: checkpoint count %d is not positive", n)
	}
	if spanSize <= 0 {
		return nil, fmt.Errorf("decode zinfo: span size %d is not positive", spanSize)
	}
	body := int64(len(b) - zinfoHeaderSize)
	z := &GzipZinfo{SpanSize: spanSize}
	stored := n
	switch {
	case body == n*checkpointSize:
	case body == (n-1)*checkpointSize:
		z.V1 = true
		stored = n - 1
	default:
		return nil, fmt.Errorf("decode zinfo: %d bytes do not hold %d checkpoints (want %d or %d)",
			len(b), n, zinfoHeaderSize+n*checkpointSize, zinfoHeaderSize+(n-1)*checkpointSize)
	}
	z.Checkpoints = make([]Checkpoint, 0, n)
	if z.V1 {
		z.Checkpoints = append(z.Checkpoints, Checkpoint{In: v1Checkpoint0In, Window: make([]byte, WindowSize)})
	}
	p := b[zinfoHeaderSize:]
	for i := int64(0); i < stored; i++ {
		c := Checkpoint{
			In:     int64(binary.LittleEndian.Uint64(p[0:])),
			Out:    int64(binary.LittleEndian.Uint64(p[8:])),
			Bits:   p[16],
			Window: p[17 : 17+WindowSize : 17+WindowSize],
		}
		z.Checkpoints = append(z.Checkpoints, c)
		p = p[checkpointSize:]
	}
	return z, nil
}

// TarZinfo describes the fixed-size spans of an uncompressed tar layer.
type TarZinfo struct {
	SpanSize int64
	// Size is the byte size of the tar blob.
	Size int64
}

// MarshalTarZinfo encodes a TarZinfo flatbuffer exactly as SOCI does.
func MarshalTarZinfo(t TarZinfo) []byte {
	b := flatbuffers.NewBuilder(0)
	// Field order as SOCI's encoder adds them (it shows in the byte layout).
	b.StartObject(3)
	b.PrependInt32Slot(0, tarZinfoVersion, 0)
	b.PrependInt64Slot(1, t.SpanSize, 0)
	b.PrependInt64Slot(2, t.Size, 0)
	b.Finish(b.EndObject())
	return b.FinishedBytes()
}

// UnmarshalTarZinfo decodes a TarZinfo flatbuffer.
func UnmarshalTarZinfo(buf []byte) (t TarZinfo, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("decode tar zinfo: malformed flatbuffer: %v", r)
		}
	}()
	tab, err := rootTable(buf)
	if err != nil {
		return TarZinfo{}, fmt.Errorf("decode tar zinfo: %w", err)
	}
	version := int32(0)
	if o := tab.Offset(4); o != 0 {
		version = tab.GetInt32(flatbuffers.UOffsetT(o) + tab.Pos)
	}
	if version != tarZinfoVersion {
		return TarZinfo{}, fmt.Errorf("decode tar zinfo: unsupported version %d", version)
	}
	if o := tab.Offset(6); o != 0 {
		t.SpanSize = tab.GetInt64(flatbuffers.UOffsetT(o) + tab.Pos)
	}
	if o := tab.Offset(8); o != 0 {
		t.Size = tab.GetInt64(flatbuffers.UOffsetT(o) + tab.Pos)
	}
	if t.SpanSize <= 0 || t.Size < 0 {
		return TarZinfo{}, fmt.Errorf("decode tar zinfo: span size %d, size %d", t.SpanSize, t.Size)
	}
	return t, nil
}

// rootTable checks the bounds of a flatbuffer's root and vtable and
// returns the root table. Field accesses must still be bounds-checked.
func rootTable(buf []byte) (flatbuffers.Table, error) {
	if len(buf) < 8 {
		return flatbuffers.Table{}, fmt.Errorf("%d bytes is too short for a flatbuffer", len(buf))
	}
	pos := flatbuffers.GetUOffsetT(buf)
	if int64(pos)+4 > int64(len(buf)) {
		return flatbuffers.Table{}, fmt.Errorf("root offset %d is past the end (%d bytes)", pos, len(buf))
	}
	tab := flatbuffers.Table{Bytes: buf, Pos: pos}
	vt := int64(pos) - int64(flatbuffers.GetSOffsetT(buf[pos:]))
	if vt < 0 || vt+4 > int64(len(buf)) {
		return flatbuffers.Table{}, fmt.Errorf("vtable offset %d is out of range", vt)
	}
	vlen := int64(flatbuffers.GetVOffsetT(buf[vt:]))
	if vlen < 4 || vt+vlen > int64(len(buf)) {
		return flatbuffers.Table{}, fmt.Errorf("vtable length %d is out of range", vlen)
	}
	return tab, nil
}

// Spans returns the span table of the layer, decoded from the checkpoint
// blob and checked against the rest of the zTOC: every span is non-empty,
// in order, and inside the archive.
func (z *Ztoc) Spans() ([]Span, error) {
	n := z.NumSpans()
	if n <= 0 || len(z.SpanDigests) != n {
		return nil, fmt.Errorf("zTOC has max span id %d but %d span digests", z.MaxSpanID, len(z.SpanDigests))
	}
	spans := make([]Span, n)
	switch z.Algorithm {
	case Gzip:
		zi, err := z.gzipZinfo()
		if err != nil {
			return nil, err
		}
		if len(zi.Checkpoints) != n {
			return nil, fmt.Errorf("zTOC has %d spans but %d checkpoints", n, len(zi.Checkpoints))
		}
		for i, c := range zi.Checkpoints {
			start := c.In
			if c.Bits > 0 {
				start--
			}
			if c.Bits > 7 {
				return nil, fmt.Errorf("checkpoint %d: %d leftover bits", i, c.Bits)
			}
			s := Span{ID: SpanID(i), CompressedStart: start, UncompressedStart: c.Out, Bits: c.Bits, Window: c.Window}
			if i+1 < n {
				s.CompressedEnd = zi.Checkpoints[i+1].In
				s.UncompressedEnd = zi.Checkpoints[i+1].Out
			} else {
				s.CompressedEnd = z.CompressedArchiveSize
				// A checkpoint can sit in the tar padding past the
				// end-of-archive marker; its span is then empty.
				s.UncompressedEnd = max(z.UncompressedArchiveSize, c.Out)
			}
			spans[i] = s
		}
	case Uncompressed:
		t, err := UnmarshalTarZinfo(z.Checkpoints)
		if err != nil {
			return nil, err
		}
		if t.Size != z.CompressedArchiveSize {
			return nil, fmt.Errorf("tar zinfo size %d differs from archive size %d", t.Size, z.CompressedArchiveSize)
		}
		if want := (t.Size + t.SpanSize - 1) / t.SpanSize; int64(n) != want && !(t.Size == 0 && n == 1) {
			return nil, fmt.Errorf("tar layer of %d bytes in %d-byte spans has %d spans, zTOC says %d", t.Size, t.SpanSize, want, n)
		}
		for i := range spans {
			start := int64(i) * t.SpanSize
			end := min(start+t.SpanSize, t.Size)
			spans[i] = Span{ID: SpanID(i), CompressedStart: start, CompressedEnd: end, UncompressedStart: start, UncompressedEnd: end}
		}
	default:
		return nil, fmt.Errorf("unknown compression algorithm %d", z.Algorithm)
	}
	for i, s := range spans {
		if s.CompressedStart < 0 || s.CompressedEnd < s.CompressedStart || s.CompressedEnd > z.CompressedArchiveSize {
			return nil, fmt.Errorf("span %d: compressed range [%d, %d) is outside the %d-byte layer", i, s.CompressedStart, s.CompressedEnd, z.CompressedArchiveSize)
		}
		if s.UncompressedStart < 0 || s.UncompressedEnd < s.UncompressedStart {
			return nil, fmt.Errorf("span %d: uncompressed range [%d, %d) is not ordered", i, s.UncompressedStart, s.UncompressedEnd)
		}
		if i > 0 && (s.UncompressedStart != spans[i-1].UncompressedEnd || s.CompressedStart < spans[i-1].CompressedStart) {
			return nil, fmt.Errorf("span %d: checkpoints are not sorted", i)
		}
	}
	return spans, nil
}

// gzipZinfo returns the gzip checkpoints: decoded from the checkpoint
// blob, or, for a zTOC from a pack head, its windowless checkpoints.
func (z *Ztoc) gzipZinfo() (*GzipZinfo, error) {
	if z.windowless != nil {
		return z.windowless, nil
	}
	return UnmarshalGzipZinfo(z.Checkpoints)
}

// SpanSize returns the span size the zTOC was built with, as recorded in
// its checkpoint blob.
func (z *Ztoc) SpanSize() (int64, error) {
	switch z.Algorithm {
	case Gzip:
		if z.windowless != nil {
			return z.windowless.SpanSize, nil
		}
		if len(z.Checkpoints) < zinfoHeaderSize {
			return 0, errors.New("checkpoint blob is shorter than its header")
		}
		return int64(binary.LittleEndian.Uint64(z.Checkpoints[4:])), nil
	case Uncompressed:
		t, err := UnmarshalTarZinfo(z.Checkpoints)
		return t.SpanSize, err
	}
	return 0, fmt.Errorf("unknown compression algorithm %d", z.Algorithm)
}
