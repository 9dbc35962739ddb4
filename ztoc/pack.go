package ztoc

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// A pack is spanpull's compact companion of a zTOC, in two blobs, so that
// a layer can be mounted without fetching the whole zTOC first: most of a
// zTOC is one raw 32 KiB window per checkpoint, needed only when the span
// is first read.
//
//   - The head holds everything else, zstd-compressed: the TOC (in SOCI's
//     own flatbuffer encoding), the span table and span digests, where each
//     checkpoint's window lies in the windows blob with its SHA-256, and
//     the chunk table (Ztoc.Chunks). It is fetched whole at mount.
//   - The windows blob holds every window, each zstd-compressed on its own
//     (an all-zero window, checkpoint 0's, is stored as nothing), so that
//     one range read fetches one window.
//
// From the head and the windows blob, Restore rebuilds the zTOC byte for
// byte; its digest is recorded in the head.

// PackVersion is the version of the pack format MarshalPack writes and
// UnmarshalPackHead reads.
const PackVersion = 1

// Limits of UnmarshalPackHead, which reads heads from registries: the
// decompressed head is at most maxHeadExpansion times its compressed size
// (with a floor of minHeadLimit for tiny heads) and never more than
// MaxPackHeadSize. Real heads expand about 3 to 6 times.
const (
	MaxPackHeadSize  = 1 << 30
	maxHeadExpansion = 256
	minHeadLimit     = 1 << 20
	// maxWindowStored bounds a compressed window: zstd never grows 32 KiB
	// of input by more than a few hundred bytes.
	maxWindowStored = 2 * WindowSize
)

// ErrWindowDigest reports window bytes that do not match the SHA-256 the
// pack head records for them.
var ErrWindowDigest = errors.New("window digest mismatch")

// PackHead is a decoded pack head: a layer's zTOC without its windows, and
// where to find each window in the pack's windows blob.
type PackHead struct {
	// ZtocDigest and ZtocSize name the zTOC the pack was made from (and
	// that Restore rebuilds).
	ZtocDigest digest.Digest
	ZtocSize   int64
	// WindowsDigest and WindowsSize name the windows blob of the pack.
	WindowsDigest digest.Digest
	WindowsSize   int64
	// Ztoc is the layer's zTOC: TOC, span table, span digests and chunk
	// table (nil when the pack has none). Its spans have no Window: a
	// reader gets a span's window with WindowRange and DecodeWindow. It
	// passes Validate; Marshal refuses it (use Restore).
	Ztoc *Ztoc
	// TOC is a zTOC flatbuffer holding the layer's TOC (and no usable span
	// table): what DecodeFiles and NewTOCReader read when Ztoc.Files is
	// left out (UnmarshalPackHeadInfo).
	TOC []byte

	windows []packWindow // per span, gzip layers only
	v1      bool         // the zTOC's checkpoint blob has the v1 layout
}

// packWindow is where a span's compressed window lies in the windows blob,
// and its SHA-256. n = 0 stands for an all-zero window.
type packWindow struct {
	off, n int64
	sum    [sha256.Size]byte
}

// MarshalPack encodes the pack of zTOC z, whose encoding (Marshal) has
// digest ztocDigest and size ztocSize: the caller vouches for those, and
// the head records them. z must be a complete zTOC (built, or decoded from
// a zTOC blob); its chunk table, when it has one, goes into the head.
func MarshalPack(z *Ztoc, ztocDigest digest.Digest, ztocSize int64) (head, windows []byte, err error) {
	if z == nil {
		return nil, nil, errors.New("encode pack: nil zTOC")
	}
	if z.windowless != nil {
		return nil, nil, errors.New("encode pack: the zTOC has no windows (it comes from a pack head)")
	}
	if err := checkSHA256(ztocDigest); err != nil {
		return nil, nil, fmt.Errorf("encode pack: zTOC %w", err)
	}
	if ztocSize <= 0 {
		return nil, nil, fmt.Errorf("encode pack: zTOC size %d", ztocSize)
	}
	if err := z.Validate(); err != nil {
		return nil, nil, fmt.Errorf("encode pack: %w", err)
	}
	spans, err := z.Spans()
	if err != nil {
		return nil, nil, fmt.Errorf("encode pack: %w", err)
	}
	if err := checkChunks(spans, z.Chunks); err != nil {
		return nil, nil, fmt.Errorf("encode pack: %w", err)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, nil, fmt.Errorf("encode pack: %w", err)
	}
	defer enc.Close()
	h := &PackHead{ZtocDigest: ztocDigest, ZtocSize: ztocSize, Ztoc: z}
	if z.Algorithm == Gzip {
		zi, err := UnmarshalGzipZinfo(z.Checkpoints)
		if err != nil {
			return nil, nil, fmt.Errorf("encode pack: %w", err)
		}
		h.v1 = zi.V1
		windows, h.windows = packWindows(enc, spans)
	}
	h.WindowsDigest, h.WindowsSize = digest.FromBytes(windows), int64(len(windows))
	raw, err := h.encode()
	if err != nil {
		return nil, nil, fmt.Errorf("encode pack: %w", err)
	}
	return enc.EncodeAll(raw, nil), windows, nil
}

// packWindows compresses the windows of spans one by one and returns them
// concatenated, with where each lies.
func packWindows(enc *zstd.Encoder, spans []Span) ([]byte, []packWindow) {
	var blob []byte
	refs := make([]packWindow, len(spans))
	for i, s := range spans {
		if isZero(s.Window) {
			refs[i] = packWindow{off: int64(len(blob))}
			continue
		}
		start := len(blob)
		blob = enc.EncodeAll(s.Window, blob)
		refs[i] = packWindow{off: int64(start), n: int64(len(blob) - start), sum: sha256.Sum256(blob[start:])}
	}
	return blob, refs
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// UnmarshalPackHead decodes a pack head. It treats b as hostile, like
// Unmarshal: the decompressed size is bounded, every count and offset is
// checked before use, the TOC is decoded by Unmarshal's hardened decoder,
// and the result passes Validate and the chunk table checks; malformed
// input yields an error, never a panic. The caller verifies b against its
// descriptor digest first.
func UnmarshalPackHead(b []byte) (*PackHead, error) {
	return unmarshalPackHead(b, true)
}

// UnmarshalPackHeadInfo decodes a pack head like UnmarshalPackHead but
// leaves Ztoc.Files nil: the entries stay in TOC, to be read with
// DecodeFiles or NewTOCReader, so that a layer of a million files never
// has its whole TOC decoded in memory. The entries are checked as they are
// read.
func UnmarshalPackHeadInfo(b []byte) (*PackHead, error) {
	return unmarshalPackHead(b, false)
}

func unmarshalPackHead(b []byte, files bool) (*PackHead, error) {
	limit := min(max(int64(len(b))*maxHeadExpansion, minHeadLimit), MaxPackHeadSize)
	raw, err := zstdDecode(b, limit)
	if err != nil {
		return nil, fmt.Errorf("decode pack head: %w", err)
	}
	h, err := decodeHead(raw, files)
	if err != nil {
		return nil, fmt.Errorf("decode pack head: %w", err)
	}
	return h, nil
}

// zstdDecode decompresses the zstd frames in b, refusing to produce more
// than limit bytes.
func zstdDecode(b []byte, limit int64) ([]byte, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(uint64(limit)),
		zstd.WithDecoderMaxWindow(max(uint64(limit), zstd.MinWindowSize)))
	if err != nil {
		return nil, err
	}
	defer dec.Close()
	out, err := dec.DecodeAll(b, nil)
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	if int64(len(out)) > limit {
		return nil, fmt.Errorf("zstd: decompresses to more than %d bytes", limit)
	}
	if cap(out) > len(out)+len(out)/8 {
		// DecodeAll grows its output a megabyte at a time: a 32 KiB
		// window kept for the layer's lifetime would hold on to all of it.
		out = append([]byte(nil), out...)
	}
	return out, nil
}

// WindowTable returns a copy of h with only what WindowRange and
// DecodeWindow need: the TOC and the zTOC's tables, most of a decoded
// head's bytes, are left out, so that a window reader that lives as long
// as a mounted layer does not keep them in memory.
func (h *PackHead) WindowTable() *PackHead {
	return &PackHead{ZtocDigest: h.ZtocDigest, ZtocSize: h.ZtocSize, WindowsDigest: h.WindowsDigest, WindowsSize: h.WindowsSize,
		Ztoc: &Ztoc{CompressionInfo: CompressionInfo{Algorithm: h.Ztoc.Algorithm}}, windows: h.windows, v1: h.v1}
}

// WindowRange returns where span id's compressed window lies in the
// windows blob: n = 0 when there is nothing to fetch (an all-zero window,
// a tar layer, an id outside the span table; DecodeWindow tells them
// apart).
func (h *PackHead) WindowRange(id SpanID) (off, n int64) {
	if int(id) < 0 || int(id) >= len(h.windows) {
		return 0, 0
	}
	w := h.windows[id]
	return w.off, w.n
}

// DecodeWindow checks compressed, the bytes of span id's window range in
// the windows blob, against the SHA-256 the head records and returns the
// 32 KiB window they decompress to. A tar layer has no windows: it returns
// nil.
func (h *PackHead) DecodeWindow(id SpanID, compressed []byte) ([]byte, error) {
	if h.Ztoc.Algorithm != Gzip {
		return nil, nil
	}
	if int(id) < 0 || int(id) >= len(h.windows) {
		return nil, fmt.Errorf("window of span %d: no such span (layer has %d)", id, len(h.windows))
	}
	w := h.windows[id]
	if int64(len(compressed)) != w.n {
		return nil, fmt.Errorf("window of span %d: got %d bytes, want %d: %w", id, len(compressed), w.n, ErrWindowDigest)
	}
	if w.n == 0 {
		return make([]byte, WindowSize), nil
	}
	if sha256.Sum256(compressed) != w.sum {
		return nil, fmt.Errorf("window of span %d: bytes [%d, %d) of the windows blob do not match the head: %w", id, w.off, w.off+w.n, ErrWindowDigest)
	}
	out, err := zstdDecode(compressed, WindowSize)
	if err != nil {
		return nil, fmt.Errorf("window of span %d: %w", id, err)
	}
	if len(out) != WindowSize {
		return nil, fmt.Errorf("window of span %d: decompresses to %d bytes, want %d", id, len(out), WindowSize)
	}
	return out, nil
}

// Restore rebuilds the zTOC the pack was made from out of the head and
// the windows blob, and checks it against the digest the head records. It
// returns the zTOC (with the head's chunk table; it shares the head's
// TOC) and its bytes.
func (h *PackHead) Restore(windows []byte) (*Ztoc, []byte, error) {
	z, err := h.WithWindows(windows)
	if err != nil {
		return nil, nil, err
	}
	b, err := Marshal(z)
	if err != nil {
		return nil, nil, fmt.Errorf("restore zTOC %s: %w", h.ZtocDigest, err)
	}
	if d := digest.FromBytes(b); d != h.ZtocDigest || int64(len(b)) != h.ZtocSize {
		return nil, nil, fmt.Errorf("restore zTOC %s: rebuilt %d bytes with digest %s, want %d bytes", h.ZtocDigest, len(b), d, h.ZtocSize)
	}
	return z, b, nil
}

// checkWindowsBlob checks that windows is the pack's windows blob.
func (h *PackHead) checkWindowsBlob(windows []byte) error {
	if int64(len(windows)) != h.WindowsSize || digest.FromBytes(windows) != h.WindowsDigest {
		return fmt.Errorf("restore zTOC %s: the windows blob is not %s (%d bytes)", h.ZtocDigest, h.WindowsDigest, h.WindowsSize)
	}
	return nil
}

// WithWindowSource returns the head's zTOC with the windows of its
// checkpoints given one at a time by window (span id -> its decoded 32
// KiB window, checked against the head, as soci.Windows and AttachWindows
// give them): VerifyLayer asks for each when the inflation reaches it, so
// a layer of a thousand spans is verified without its 32 MiB of decoded
// windows in memory. Unlike Restore's, this zTOC cannot be encoded.
func (h *PackHead) WithWindowSource(window func(SpanID) ([]byte, error)) *Ztoc {
	z := *h.Ztoc
	if z.windowless != nil {
		z.windows = window
	}
	return &z
}

// AttachWindows is WithWindowSource over the windows blob (checked against
// the head's digest), decoding each window from it when asked.
func (h *PackHead) AttachWindows(windows []byte) (*Ztoc, error) {
	if err := h.checkWindowsBlob(windows); err != nil {
		return nil, err
	}
	t := h.WindowTable()
	return h.WithWindowSource(func(id SpanID) ([]byte, error) {
		off, n := t.WindowRange(id)
		return t.DecodeWindow(id, windows[off:off+n])
	}), nil
}

// WithWindows returns the head's zTOC with every checkpoint's window, from
// the windows blob (checked against the digests the head records), but
// without encoding it to compare it with the zTOC digest as Restore does:
// for a reader that checks the zTOC against the layer itself
// (VerifyLayer), the encoding is only memory (the size of the zTOC).
func (h *PackHead) WithWindows(windows []byte) (*Ztoc, error) {
	if err := h.checkWindowsBlob(windows); err != nil {
		return nil, err
	}
	z := *h.Ztoc
	if z.windowless == nil {
		return &z, nil
	}
	zi := GzipZinfo{SpanSize: z.windowless.SpanSize, V1: h.v1, Checkpoints: make([]Checkpoint, 0, len(z.windowless.Checkpoints))}
	for i, c := range z.windowless.Checkpoints {
		w := h.windows[i]
		win, err := h.DecodeWindow(SpanID(i), windows[w.off:w.off+w.n])
		if err != nil {
			return nil, fmt.Errorf("restore zTOC %s: %w", h.ZtocDigest, err)
		}
		c.Window = win
		zi.Checkpoints = append(zi.Checkpoints, c)
	}
	blob, err := MarshalGzipZinfo(&zi)
	if err != nil {
		return nil, fmt.Errorf("restore zTOC %s: %w", h.ZtocDigest, err)
	}
	z.Checkpoints, z.windowless = blob, nil
	return &z, nil
}
