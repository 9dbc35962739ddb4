package ztoc

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"

	"github.com/opencontainers/go-digest"
)

// The decompressed head, field after field (uvarints unless noted):
//
//	magic "SPZH" (4 bytes), version
//	zTOC digest (length, bytes), zTOC size
//	windows blob digest (length, bytes), windows blob size
//	flags (packFlagV1, packFlagChunks), span size
//	compression algorithm, compressed archive size
//	stub zTOC (length, bytes): version, build tool, uncompressed archive
//	  size and TOC in SOCI's zTOC encoding (headStub)
//	span count n, then n span digests (32 bytes each)
//	gzip layers, per span: checkpoint in, out, bits (1 byte), compressed
//	  window length, and when it is not 0 the window's SHA-256 (32 bytes);
//	  windows lie back to back in the windows blob, in span order
//	with packFlagChunks, per span: chunk count, then per chunk its
//	  compressed length, the uncompressed bytes it adds and its SHA-256
//	  (32 bytes)
//
// Nothing may follow.
var packMagic = []byte("SPZH")

// Head flags.
const (
	packFlagV1     = 1 << 0 // the zTOC's gzip checkpoint blob has the v1 layout
	packFlagChunks = 1 << 1 // a chunk table follows the span table
	packFlagsKnown = packFlagV1 | packFlagChunks
)

// Smallest encodings of the repeated records, to bound counts by the bytes
// left before allocating for them.
const (
	minSpanRecord  = 4               // in, out, bits, window length
	minChunkRecord = 2 + sha256.Size // lengths and digest
)

// headStub returns the zTOC that carries the head's TOC: z's version,
// build tool, uncompressed size and files, as the zTOC of a tar layer of
// that size in one span (the layer's real compression and span table are
// in the head's own fields). Encoding it with Marshal and decoding it with
// Unmarshal gives the TOC SOCI's encoding and Unmarshal's hardening and
// rules.
func headStub(z *Ztoc) *Ztoc {
	u := z.UncompressedArchiveSize
	s := &Ztoc{
		Version:                 z.Version,
		BuildToolIdentifier:     z.BuildToolIdentifier,
		CompressedArchiveSize:   u,
		UncompressedArchiveSize: u,
		Files:                   z.Files,
	}
	s.Algorithm, s.SpanDigests = Uncompressed, []digest.Digest{digest.FromBytes(nil)}
	s.Checkpoints = MarshalTarZinfo(TarZinfo{SpanSize: max(u, 1), Size: u})
	return s
}

// encode returns the decompressed head.
func (h *PackHead) encode() ([]byte, error) {
	z := h.Ztoc
	stub, err := Marshal(headStub(z))
	if err != nil {
		return nil, err
	}
	spanSize, err := z.SpanSize()
	if err != nil {
		return nil, err
	}
	flags := uint64(0)
	if h.v1 {
		flags |= packFlagV1
	}
	if z.Chunks != nil {
		flags |= packFlagChunks
	}
	b := append([]byte(nil), packMagic...)
	b = binary.AppendUvarint(b, PackVersion)
	b = appendString(b, h.ZtocDigest.String())
	b = binary.AppendUvarint(b, uint64(h.ZtocSize))
	b = appendString(b, h.WindowsDigest.String())
	b = binary.AppendUvarint(b, uint64(h.WindowsSize))
	b = binary.AppendUvarint(b, flags)
	b = binary.AppendUvarint(b, uint64(spanSize))
	b = binary.AppendUvarint(b, uint64(z.Algorithm))
	b = binary.AppendUvarint(b, uint64(z.CompressedArchiveSize))
	b = appendString(b, string(stub))
	b = binary.AppendUvarint(b, uint64(len(z.SpanDigests)))
	for _, d := range z.SpanDigests {
		b = appendSum(b, d)
	}
	if z.Algorithm == Gzip {
		zi, err := z.gzipZinfo()
		if err != nil {
			return nil, err
		}
		for i, c := range zi.Checkpoints {
			b = binary.AppendUvarint(b, uint64(c.In))
			b = binary.AppendUvarint(b, uint64(c.Out))
			b = append(b, c.Bits)
			b = binary.AppendUvarint(b, uint64(h.windows[i].n))
			if h.windows[i].n > 0 {
				b = append(b, h.windows[i].sum[:]...)
			}
		}
	}
	if z.Chunks != nil {
		if b, err = appendChunks(b, z); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// appendChunks appends z's chunk table, each chunk as the distance from
// the previous one's ends (the span's start for the first).
func appendChunks(b []byte, z *Ztoc) ([]byte, error) {
	spans, err := z.Spans()
	if err != nil {
		return nil, err
	}
	for i, cs := range z.Chunks {
		b = binary.AppendUvarint(b, uint64(len(cs)))
		in, out := spans[i].CompressedStart, spans[i].UncompressedStart
		for _, c := range cs {
			b = binary.AppendUvarint(b, uint64(c.CompressedEnd-in))
			b = binary.AppendUvarint(b, uint64(c.UncompressedEnd-out))
			b = appendSum(b, c.Digest)
			in, out = c.CompressedEnd, c.UncompressedEnd
		}
	}
	return b, nil
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

// appendSum appends the 32 bytes of a SHA-256 digest (validated before).
func appendSum(b []byte, d digest.Digest) []byte {
	sum, _ := hex.DecodeString(d.Encoded())
	return append(b, sum...)
}

// decodeHead decodes a decompressed head.
func decodeHead(raw []byte, files bool) (*PackHead, error) {
	r := &packReader{b: raw}
	if magic := r.bytes(uint64(len(packMagic)), "magic"); r.err == nil && string(magic) != string(packMagic) {
		return nil, fmt.Errorf("not a pack head (magic %q)", magic)
	}
	if v := r.uvarint("version"); r.err == nil && v != PackVersion {
		return nil, fmt.Errorf("unsupported pack version %d (want %d)", v, PackVersion)
	}
	h := &PackHead{}
	h.ZtocDigest = r.digest("zTOC digest")
	h.ZtocSize = r.int64("zTOC size")
	h.WindowsDigest = r.digest("windows digest")
	h.WindowsSize = r.int64("windows size")
	flags := r.uvarint("flags")
	spanSize := r.int64("span size")
	alg := r.uvarint("algorithm")
	compressedSize := r.int64("compressed archive size")
	stubBytes := r.bytes(r.uvarint("stub length"), "stub")
	n := r.count("span count", sha256.Size)
	if r.err != nil {
		return nil, r.err
	}
	if flags&^packFlagsKnown != 0 {
		return nil, fmt.Errorf("unknown flags %#x", flags)
	}
	if h.ZtocSize <= 0 || spanSize <= 0 || n == 0 {
		return nil, fmt.Errorf("zTOC size %d, span size %d, %d spans", h.ZtocSize, spanSize, n)
	}
	if alg != uint64(Gzip) && alg != uint64(Uncompressed) {
		return nil, fmt.Errorf("unknown compression algorithm %d", alg)
	}
	h.v1 = flags&packFlagV1 != 0
	h.TOC = stubBytes
	unmarshal := Unmarshal
	if !files {
		unmarshal = UnmarshalInfo
	}
	stub, err := unmarshal(stubBytes)
	if err != nil {
		return nil, fmt.Errorf("toc: %w", err)
	}
	stub.CompressedArchiveSize, stub.Algorithm = compressedSize, Compression(alg)
	z, err := h.decodeSpans(r, stub, n, spanSize)
	if err != nil {
		return nil, err
	}
	if flags&packFlagChunks != 0 {
		if z.Chunks, err = decodeChunks(r, z); err != nil {
			return nil, err
		}
	}
	if len(r.b) > 0 {
		return nil, fmt.Errorf("%d bytes follow the head", len(r.b))
	}
	h.Ztoc = z
	if err := h.check(); err != nil {
		return nil, err
	}
	return h, nil
}

// decodeSpans reads the span table of n spans and returns the zTOC made of
// it and the stub's TOC, sizes and algorithm.
func (h *PackHead) decodeSpans(r *packReader, stub *Ztoc, n int, spanSize int64) (*Ztoc, error) {
	z := &Ztoc{
		Version:                 stub.Version,
		BuildToolIdentifier:     stub.BuildToolIdentifier,
		CompressedArchiveSize:   stub.CompressedArchiveSize,
		UncompressedArchiveSize: stub.UncompressedArchiveSize,
		Files:                   stub.Files,
	}
	z.Algorithm, z.MaxSpanID = stub.Algorithm, SpanID(n-1)
	z.SpanDigests = make([]digest.Digest, n)
	for i := range z.SpanDigests {
		z.SpanDigests[i] = r.sum("span digest")
	}
	switch z.Algorithm {
	case Uncompressed:
		z.Checkpoints = MarshalTarZinfo(TarZinfo{SpanSize: spanSize, Size: z.CompressedArchiveSize})
	case Gzip:
		if n > len(r.b)/minSpanRecord {
			return nil, fmt.Errorf("%d spans do not fit the %d bytes left", n, len(r.b))
		}
		zi := &GzipZinfo{SpanSize: spanSize, V1: h.v1, Checkpoints: make([]Checkpoint, n)}
		h.windows = make([]packWindow, n)
		var off int64
		for i := range zi.Checkpoints {
			c := &zi.Checkpoints[i]
			c.In, c.Out, c.Bits = r.int64("checkpoint in"), r.int64("checkpoint out"), r.byte("checkpoint bits")
			w := &h.windows[i]
			w.off, w.n = off, r.int64("window length")
			if w.n > maxWindowStored {
				return nil, fmt.Errorf("span %d: window of %d bytes", i, w.n)
			}
			if w.n > 0 {
				w.sum = r.sha256("window digest")
			}
			off += w.n
		}
		z.windowless = zi
	}
	return z, r.err
}

// decodeChunks reads the chunk table of z.
func decodeChunks(r *packReader, z *Ztoc) ([][]Chunk, error) {
	spans, err := z.Spans()
	if err != nil {
		return nil, err
	}
	chunks := make([][]Chunk, len(spans))
	for i, s := range spans {
		k := r.count("chunk count", minChunkRecord)
		if k > 0 {
			chunks[i] = make([]Chunk, k)
		}
		in, out := s.CompressedStart, s.UncompressedStart
		for j := range chunks[i] {
			c := &chunks[i][j]
			c.CompressedEnd = r.offset(in, "chunk length")
			c.UncompressedEnd = r.offset(out, "chunk uncompressed length")
			c.Digest = r.sum("chunk digest")
			in, out = c.CompressedEnd, c.UncompressedEnd
		}
		if r.err != nil {
			return nil, r.err
		}
	}
	return chunks, nil
}

// check validates a decoded head: the zTOC (TOC rules, span table, span
// digests, chunk table), the windows against the span table, and the
// digests it names.
func (h *PackHead) check() error {
	z := h.Ztoc
	if err := z.Validate(); err != nil {
		return err
	}
	spans, err := z.Spans()
	if err != nil {
		return err
	}
	if err := checkChunks(spans, z.Chunks); err != nil {
		return err
	}
	if err := checkSHA256(h.ZtocDigest); err != nil {
		return fmt.Errorf("zTOC %w", err)
	}
	if err := checkSHA256(h.WindowsDigest); err != nil {
		return fmt.Errorf("windows %w", err)
	}
	var total int64
	for _, w := range h.windows {
		total += w.n
	}
	if total != h.WindowsSize {
		return fmt.Errorf("windows add up to %d bytes, the head says %d", total, h.WindowsSize)
	}
	if h.v1 && (z.Algorithm != Gzip || spans[0].CompressedStart != v1Checkpoint0In || spans[0].UncompressedStart != 0 || spans[0].Bits != 0 || h.windows[0].n != 0) {
		return errors.New("v1 checkpoint layout, but checkpoint 0 is not the implied one")
	}
	return nil
}

// packReader reads the fields of a decompressed head, bounds-checked. The
// first error sticks: later reads return zero values.
type packReader struct {
	b   []byte
	err error
}

func (r *packReader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf(format, args...)
	}
}

func (r *packReader) uvarint(what string) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("%s: bad varint", what)
		return 0
	}
	r.b = r.b[n:]
	return v
}

// int64 reads a non-negative int64.
func (r *packReader) int64(what string) int64 {
	v := r.uvarint(what)
	if v > math.MaxInt64 {
		r.fail("%s: %d is out of range", what, v)
		return 0
	}
	return int64(v)
}

// offset reads a distance and returns prev (>= 0) plus it.
func (r *packReader) offset(prev int64, what string) int64 {
	d := r.uvarint(what)
	if d > uint64(math.MaxInt64-prev) {
		r.fail("%s: %d is out of range", what, d)
		return prev
	}
	return prev + int64(d)
}

// count reads a count of records of at least size bytes each and checks
// that the bytes left can hold them.
func (r *packReader) count(what string, size int) int {
	v := r.uvarint(what)
	if v > uint64(len(r.b)/size) {
		r.fail("%s: %d records do not fit the %d bytes left", what, v, len(r.b))
		return 0
	}
	return int(v)
}

func (r *packReader) bytes(n uint64, what string) []byte {
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail("%s: %d bytes, only %d left", what, n, len(r.b))
		return nil
	}
	b := r.b[:n:n]
	r.b = r.b[n:]
	return b
}

func (r *packReader) byte(what string) byte {
	if b := r.bytes(1, what); b != nil {
		return b[0]
	}
	return 0
}

func (r *packReader) sha256(what string) (sum [sha256.Size]byte) {
	copy(sum[:], r.bytes(sha256.Size, what))
	return sum
}

// sum reads a raw SHA-256 as a digest.
func (r *packReader) sum(what string) digest.Digest {
	s := r.sha256(what)
	return digest.NewDigestFromBytes(digest.SHA256, s[:])
}

// digest reads a digest string.
func (r *packReader) digest(what string) digest.Digest {
	return digest.Digest(r.bytes(r.uvarint(what+" length"), what))
}
