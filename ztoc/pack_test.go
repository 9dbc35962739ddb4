package ztoc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// packTestFiles is a small TOC for the hand-made zTOCs of the pack tests.
func packTestFiles() []FileMetadata {
	mt := time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC)
	return []FileMetadata{
		{Name: "d/", Type: TypeDir, UncompressedOffset: 512, Mode: 0o755, ModTime: mt},
		{Name: "d/f", Type: TypeReg, UncompressedOffset: 1024, UncompressedSize: 5000, Mode: 0o644, ModTime: mt,
			PAXRecords: map[string]string{"SCHILY.xattr.user.x": "y"}},
		{Name: "d/l", Type: TypeSymlink, UncompressedOffset: 6656, Linkname: "f", ModTime: mt},
	}
}

// packTestWindow returns a window that is not all zeros.
func packTestWindow(seed byte) []byte {
	w := make([]byte, WindowSize)
	for i := range w {
		w[i] = byte(i/64) ^ seed
	}
	return w
}

// packTestGzip returns a hand-made gzip-layer zTOC of three spans (the
// first window all zeros), with a chunk table when chunks is set.
func packTestGzip(t testing.TB, chunks bool) *Ztoc {
	t.Helper()
	zi := &GzipZinfo{SpanSize: 4096, Checkpoints: []Checkpoint{
		{In: 10, Out: 0, Window: make([]byte, WindowSize)},
		{In: 1200, Out: 4200, Bits: 3, Window: packTestWindow(1)},
		{In: 2100, Out: 8400, Window: packTestWindow(2)},
	}}
	cp, err := MarshalGzipZinfo(zi)
	if err != nil {
		t.Fatal(err)
	}
	z := &Ztoc{Version: Version, BuildToolIdentifier: DefaultBuildToolIdentifier, CompressedArchiveSize: 3000, UncompressedArchiveSize: 10240,
		Files: packTestFiles(), CompressionInfo: CompressionInfo{Algorithm: Gzip, MaxSpanID: 2, SpanDigests: packTestDigests("span", 3), Checkpoints: cp}}
	if chunks {
		d := packTestDigests("chunk", 5)
		z.Chunks = [][]Chunk{
			{{CompressedEnd: 600, UncompressedEnd: 2000, Digest: d[0]}, {CompressedEnd: 1200, UncompressedEnd: 4200, Digest: d[1]}},
			{{CompressedEnd: 2100, UncompressedEnd: 8400, Digest: d[2]}},
			{{CompressedEnd: 2500, UncompressedEnd: 9000, Digest: d[3]}, {CompressedEnd: 3000, UncompressedEnd: 10240, Digest: d[4]}},
		}
	}
	return z
}

// packTestTar returns a hand-made tar-layer zTOC of three spans.
func packTestTar(chunks bool) *Ztoc {
	z := &Ztoc{Version: Version, CompressedArchiveSize: 10240, UncompressedArchiveSize: 10240, Files: packTestFiles(),
		CompressionInfo: CompressionInfo{Algorithm: Uncompressed, MaxSpanID: 2, SpanDigests: packTestDigests("span", 3),
			Checkpoints: MarshalTarZinfo(TarZinfo{SpanSize: 4096, Size: 10240})}}
	if chunks {
		d := packTestDigests("chunk", 4)
		z.Chunks = [][]Chunk{
			{{CompressedEnd: 4096, UncompressedEnd: 4096, Digest: d[0]}},
			{{CompressedEnd: 6000, UncompressedEnd: 6000, Digest: d[1]}, {CompressedEnd: 8192, UncompressedEnd: 8192, Digest: d[2]}},
			{{CompressedEnd: 10240, UncompressedEnd: 10240, Digest: d[3]}},
		}
	}
	return z
}

func packTestDigests(prefix string, n int) []digest.Digest {
	ds := make([]digest.Digest, n)
	for i := range ds {
		ds[i] = digest.FromString(fmt.Sprint(prefix, i))
	}
	return ds
}

// packOf encodes z and its pack, and decodes the head.
func packOf(t testing.TB, z *Ztoc) (zb, head, windows []byte, h *PackHead) {
	t.Helper()
	zb = mustMarshal(t, z)
	head, windows, err := MarshalPack(z, digest.FromBytes(zb), int64(len(zb)))
	if err != nil {
		t.Fatalf("MarshalPack: %v", err)
	}
	if h, err = UnmarshalPackHead(head); err != nil {
		t.Fatalf("UnmarshalPackHead: %v", err)
	}
	return zb, head, windows, h
}

// checkPack checks the pack of z: the head's zTOC equals z but for the
// windows, every window decodes to z's, Restore gives z's bytes back, and
// encoding is deterministic.
// checkPackInfo checks that UnmarshalPackHeadInfo leaves the TOC out of
// the Ztoc and that its TOC bytes yield z's entries, one by one (TOCReader)
// and in a walk (DecodeFiles).
func checkPackInfo(t *testing.T, head []byte, z *Ztoc) {
	t.Helper()
	h, err := UnmarshalPackHeadInfo(head)
	if err != nil {
		t.Fatalf("UnmarshalPackHeadInfo: %v", err)
	}
	if h.Ztoc.Files != nil {
		t.Errorf("UnmarshalPackHeadInfo decoded %d entries", len(h.Ztoc.Files))
	}
	r, err := NewTOCReader(h.TOC)
	if err != nil {
		t.Fatal(err)
	}
	if r.Len() != len(z.Files) {
		t.Fatalf("TOCReader has %d entries, want %d", r.Len(), len(z.Files))
	}
	for i := r.Len() - 1; i >= 0; i-- {
		f, err := r.File(i)
		if err != nil || !reflect.DeepEqual(*f, z.Files[i]) {
			t.Errorf("TOCReader entry %d = %+v, %v; want %+v", i, f, err, z.Files[i])
		}
	}
	var walked []FileMetadata
	if err := DecodeFiles(h.TOC, func(f *FileMetadata) error { walked = append(walked, *f); return nil }); err != nil || !reflect.DeepEqual(walked, z.Files) {
		t.Errorf("DecodeFiles of the head's TOC: %v, entries equal: %v", err, reflect.DeepEqual(walked, z.Files))
	}
	if _, err := r.File(r.Len()); err == nil {
		t.Errorf("TOCReader decoded an entry past the end")
	}
}

func checkPack(t *testing.T, z *Ztoc) (zb, head, windows []byte) {
	t.Helper()
	zb, head, windows, h := packOf(t, z)
	if h.ZtocDigest != digest.FromBytes(zb) || h.ZtocSize != int64(len(zb)) {
		t.Errorf("head names zTOC %s (%d bytes), want %s (%d)", h.ZtocDigest, h.ZtocSize, digest.FromBytes(zb), len(zb))
	}
	if h.WindowsDigest != digest.FromBytes(windows) || h.WindowsSize != int64(len(windows)) {
		t.Errorf("head names windows %s (%d bytes), want %s (%d)", h.WindowsDigest, h.WindowsSize, digest.FromBytes(windows), len(windows))
	}
	hz := h.Ztoc
	if hz.Version != z.Version || hz.BuildToolIdentifier != z.BuildToolIdentifier || hz.CompressedArchiveSize != z.CompressedArchiveSize ||
		hz.UncompressedArchiveSize != z.UncompressedArchiveSize || hz.Algorithm != z.Algorithm || hz.MaxSpanID != z.MaxSpanID {
		t.Errorf("head's zTOC header differs")
	}
	if !reflect.DeepEqual(hz.Files, z.Files) || !reflect.DeepEqual(hz.SpanDigests, z.SpanDigests) || !reflect.DeepEqual(hz.Chunks, z.Chunks) {
		t.Errorf("head's TOC, span digests or chunks differ")
	}
	checkPackInfo(t, head, z)
	if got, err := hz.SpanSize(); err != nil || got != mustSpanSize(t, z) {
		t.Errorf("head's span size %d, %v", got, err)
	}
	want, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	got, err := hz.Spans()
	if err != nil {
		t.Fatalf("head's span table: %v", err)
	}
	for i := range want {
		w := want[i]
		if z.Algorithm == Gzip && got[i].Window != nil {
			t.Errorf("span %d of the head has a window", i)
		}
		w.Window = got[i].Window
		if !reflect.DeepEqual(got[i], w) {
			t.Errorf("span %d: head %+v, zTOC %+v", i, got[i], w)
		}
		off, n := h.WindowRange(SpanID(i))
		win, err := h.DecodeWindow(SpanID(i), windows[off:off+n])
		if err != nil {
			t.Fatalf("window %d: %v", i, err)
		}
		if !bytes.Equal(win, want[i].Window) {
			t.Errorf("window %d decodes to other bytes than the zTOC's", i)
		}
	}
	// A tar layer has no windows: its head holds the whole zTOC.
	if b, err := Marshal(hz); z.Algorithm == Gzip && err == nil {
		t.Error("Marshal encoded a zTOC without windows")
	} else if z.Algorithm == Uncompressed && !bytes.Equal(b, zb) {
		t.Errorf("the head of a tar layer does not encode to its zTOC: %v", err)
	}
	rz, rb, err := h.Restore(windows)
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if !bytes.Equal(rb, zb) || !reflect.DeepEqual(rz.Chunks, z.Chunks) {
		t.Error("Restore did not rebuild the zTOC")
	}
	if head2, windows2, err := MarshalPack(z, h.ZtocDigest, h.ZtocSize); err != nil || !bytes.Equal(head, head2) || !bytes.Equal(windows, windows2) {
		t.Errorf("MarshalPack is not deterministic (err %v)", err)
	}
	return zb, head, windows
}

func mustSpanSize(t testing.TB, z *Ztoc) int64 {
	t.Helper()
	s, err := z.SpanSize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestPackRoundTrip(t *testing.T) {
	v1 := vfForgeCheckpoints(t, packTestGzip(t, true), func(zi *GzipZinfo) { zi.V1 = true })
	cases := map[string]*Ztoc{
		"gzip":           packTestGzip(t, true),
		"gzip-no-chunks": packTestGzip(t, false),
		"gzip-v1":        v1,
		"tar":            packTestTar(true),
		"tar-no-chunks":  packTestTar(false),
	}
	tarball := layertest.Tar(t, layertest.Reg("big", 0o644, layertest.Text(3, 300<<10)), layertest.Reg("rnd", 0o644, layertest.Random(5, 50<<10)))
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6", "gzip-multi-tiny") {
		z, _, err := cfBuild(t, c.compress(t, tarball), BuildOptions{SpanSize: 64 << 10, ChunkSize: 8 << 10})
		if err != nil {
			t.Fatal(err)
		}
		cases["built-"+c.name] = z
	}
	for name, z := range cases {
		t.Run(name, func(t *testing.T) { checkPack(t, z) })
	}
}

// TestPackDebianLayer packs the zTOCs of the real Debian layer and reports
// the sizes: the head is what a mount fetches instead of the zTOC.
func TestPackDebianLayer(t *testing.T) {
	t.Parallel()
	blob, err := os.ReadFile(layertest.DebianLayer(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []int64{DefaultSpanSize, 1 << 20} {
		z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: s})
		if err != nil {
			t.Fatal(err)
		}
		zb, head, windows := checkPack(t, z)
		t.Logf("span size %d: layer %d bytes, %d spans, %d chunks; zTOC %d bytes; head %d bytes (%.1f%% of the zTOC); windows %d bytes, %d per span",
			s, len(blob), z.NumSpans(), numChunks(z), len(zb), len(head), 100*float64(len(head))/float64(len(zb)), len(windows), len(windows)/z.NumSpans())
		if len(head)*5 > len(zb) {
			t.Errorf("the head (%d bytes) is not much smaller than the zTOC (%d)", len(head), len(zb))
		}
	}
}

func numChunks(z *Ztoc) int {
	n := 0
	for _, cs := range z.Chunks {
		n += len(cs)
	}
	return n
}

func TestDecodeWindowErrors(t *testing.T) {
	_, _, windows, h := packOf(t, packTestGzip(t, true))
	off, n := h.WindowRange(1)
	if n == 0 {
		t.Fatal("span 1 has no stored window")
	}
	bad := bytes.Clone(windows[off : off+n])
	bad[len(bad)/2] ^= 1
	if _, err := h.DecodeWindow(1, bad); !errors.Is(err, ErrWindowDigest) {
		t.Errorf("flipped byte: %v", err)
	}
	if _, err := h.DecodeWindow(1, windows[off:off+n-1]); !errors.Is(err, ErrWindowDigest) {
		t.Errorf("short window: %v", err)
	}
	if _, err := h.DecodeWindow(3, nil); err == nil || !strings.Contains(err.Error(), "no such span") {
		t.Errorf("span 3: %v", err)
	}
	if off, n := h.WindowRange(-1); off != 0 || n != 0 {
		t.Errorf("WindowRange(-1) = %d, %d", off, n)
	}
	if _, n := h.WindowRange(0); n != 0 {
		t.Errorf("the all-zero window of span 0 is stored (%d bytes)", n)
	}
	if _, _, err := h.Restore(windows[1:]); err == nil {
		t.Error("Restore accepted a wrong windows blob")
	}
}

func TestMarshalPackErrors(t *testing.T) {
	z := packTestGzip(t, true)
	zb := mustMarshal(t, z)
	d := digest.FromBytes(zb)
	if _, _, err := MarshalPack(nil, d, 1); err == nil {
		t.Error("nil zTOC packed")
	}
	if _, _, err := MarshalPack(z, "sha256:nope", 1); err == nil {
		t.Error("bad zTOC digest accepted")
	}
	if _, _, err := MarshalPack(z, d, 0); err == nil {
		t.Error("zero zTOC size accepted")
	}
	broken := packTestGzip(t, true)
	broken.Chunks[2] = broken.Chunks[2][:1]
	if _, _, err := MarshalPack(broken, d, 1); err == nil {
		t.Error("bad chunk table packed")
	}
	_, _, _, h := packOf(t, z)
	if _, _, err := MarshalPack(h.Ztoc, d, 1); err == nil {
		t.Error("a zTOC without windows packed")
	}
}

// rawHead decodes a head's zstd layer, for tests that forge heads.
func rawHead(t testing.TB, head []byte) []byte {
	t.Helper()
	raw, err := zstdDecode(head, MaxPackHeadSize)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func zstdEncode(t testing.TB, b []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

// TestUnmarshalPackHeadHostile feeds forged heads: every truncation and
// single-byte change of a real head, trailing bytes, and a zstd bomb. Each
// must fail cleanly (or, for a changed byte that still makes sense, decode
// into a head that passes its checks).
func TestUnmarshalPackHeadHostile(t *testing.T) {
	_, head, _, _ := packOf(t, packTestGzip(t, true))
	raw := rawHead(t, head)
	for i := range raw {
		if _, err := UnmarshalPackHead(zstdEncode(t, raw[:i])); err == nil {
			t.Fatalf("head truncated to %d of %d bytes decoded", i, len(raw))
		}
		forged := bytes.Clone(raw)
		forged[i] ^= 0x41
		if h, err := UnmarshalPackHead(zstdEncode(t, forged)); err == nil {
			if err := h.check(); err != nil {
				t.Fatalf("byte %d changed: decoded a head that fails its checks: %v", i, err)
			}
		}
	}
	if _, err := UnmarshalPackHead(zstdEncode(t, append(bytes.Clone(raw), 0))); err == nil || !strings.Contains(err.Error(), "follow") {
		t.Errorf("trailing byte: %v", err)
	}
	if _, err := UnmarshalPackHead(head[:len(head)-3]); err == nil {
		t.Error("truncated zstd frame decoded")
	}
	bomb := zstdEncode(t, make([]byte, 64<<20))
	if _, err := UnmarshalPackHead(bomb); err == nil || !strings.Contains(err.Error(), "zstd") {
		t.Errorf("a %d-byte frame of 64 MiB of zeros: %v", len(bomb), err)
	}
	for name, b := range map[string][]byte{"empty": nil, "not zstd": []byte("hello, world"), "magic only": zstdEncode(t, packMagic)} {
		if _, err := UnmarshalPackHead(b); err == nil {
			t.Errorf("%s: decoded", name)
		}
	}
}

// TestPackWindowTable: the trimmed head that window readers keep decodes
// every window as the full head does, and holds neither the TOC nor the
// zTOC's tables.
func TestPackWindowTable(t *testing.T) {
	_, head, windows, _ := packOf(t, packTestGzip(t, true))
	h, err := UnmarshalPackHeadInfo(head)
	if err != nil {
		t.Fatal(err)
	}
	wt := h.WindowTable()
	if wt.TOC != nil || wt.Ztoc.SpanDigests != nil || wt.Ztoc.Chunks != nil || wt.Ztoc.windowless != nil {
		t.Fatalf("window table keeps more than the windows: %+v", wt.Ztoc)
	}
	for id := range SpanID(h.Ztoc.NumSpans()) {
		off, n := h.WindowRange(id)
		if woff, wn := wt.WindowRange(id); woff != off || wn != n {
			t.Fatalf("span %d: window range [%d,+%d), full head [%d,+%d)", id, woff, wn, off, n)
		}
		want, err := h.DecodeWindow(id, windows[off:off+n])
		if err != nil {
			t.Fatal(err)
		}
		got, err := wt.DecodeWindow(id, windows[off:off+n])
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("span %d: window table decodes %d bytes (%v), full head %d", id, len(got), err, len(want))
		}
	}
}
