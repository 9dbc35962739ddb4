package ztoc

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	flatbuffers "github.com/google/flatbuffers/go"
	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

const goldenDir = "testdata/soci-golden"

// golden describes one zTOC built by SOCI (see testdata/soci-golden/README.md).
type golden struct {
	File     string
	Gzip     bool // layer is small.tar.gz (else the plain small.tar)
	SpanSize int64
	Spans    int
}

var goldens = []golden{
	{"small.span65536.ztoc", true, 65536, 18},
	{"small.span1048576.ztoc", true, 1 << 20, 4},
	{"small-tar.span1048576.ztoc", false, 1 << 20, 4},
}

// layer returns the layer g was built from: tgz, or the plain tarball.
func (g golden) layer(tgz, tarball []byte) []byte {
	if g.Gzip {
		return tgz
	}
	return tarball
}

// decode returns g's zTOC, decoded with Unmarshal.
func (g golden) decode(t testing.TB) *Ztoc {
	t.Helper()
	z, err := Unmarshal(readGolden(t, g.File))
	if err != nil {
		t.Fatal(err)
	}
	return z
}

func readGolden(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(goldenDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// goldenLayers returns small.tar.gz and its decompressed tar, both checked
// against SHA256SUMS.
func goldenLayers(t testing.TB) (tgz, tarball []byte) {
	t.Helper()
	tgz = readGolden(t, "small.tar.gz")
	tarball = layertest.Gunzip(t, tgz)
	sums := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(readGolden(t, "SHA256SUMS"))), "\n") {
		sum, name, ok := strings.Cut(line, "  ")
		if !ok {
			t.Fatalf("bad SHA256SUMS line %q", line)
		}
		sums[strings.Fields(name)[0]] = sum
	}
	check := func(name string, b []byte) {
		got := sha256.Sum256(b)
		if want := sums[name]; hex.EncodeToString(got[:]) != want {
			t.Fatalf("%s: sha256 %x, SHA256SUMS says %q", name, got, want)
		}
	}
	check("small.tar.gz", tgz)
	check("small.tar", tarball)
	for _, g := range goldens {
		check(g.File, readGolden(t, g.File))
	}
	return tgz, tarball
}

// TestGoldenByteExact proves the encoder follows SOCI's creation order: it
// reproduces SOCI's bytes from the decoded value.
func TestGoldenByteExact(t *testing.T) {
	for _, g := range goldens {
		b := readGolden(t, g.File)
		z, err := Unmarshal(b)
		if err != nil {
			t.Fatal(err)
		}
		out := mustMarshal(t, z)
		if !bytes.Equal(out, b) {
			i := 0
			for i < len(out) && i < len(b) && out[i] == b[i] {
				i++
			}
			t.Errorf("%s: re-encoded %d bytes differ from golden %d bytes at offset %d", g.File, len(out), len(b), i)
		}
	}
}

// testWindow returns a deterministic 32 KiB window.
func testWindow(seed byte) []byte {
	w := make([]byte, WindowSize)
	for i := range w {
		w[i] = seed + byte(i*7)
	}
	return w
}

func testDigests(n int) []digest.Digest {
	ds := make([]digest.Digest, n)
	for i := range ds {
		ds[i] = digest.FromString(fmt.Sprint("span ", i))
	}
	return ds
}

// syntheticFiles covers the corners of FileMetadata.
func syntheticFiles() []FileMetadata {
	return []FileMetadata{
		{Name: "./", Type: TypeDir, UncompressedOffset: 512, Mode: 0o755, ModTime: time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)},
		{
			Name: "./pax-file", Type: TypeReg, UncompressedOffset: 2048, UncompressedSize: 1000, Mode: 0o100644,
			UID: math.MaxUint32, GID: 1 << 31, Uname: "ü-user", Gname: "grp",
			ModTime: time.Date(2100, 6, 1, 12, 0, 0, 123456789, time.UTC),
			PAXRecords: map[string]string{
				"path":                          "./pax-file",
				"mtime":                         "4115534400.123456789",
				"SCHILY.xattr.user.comment":     "hello\x00binary\xff",
				"SCHILY.xattr.security.selinux": "",
				"LIBARCHIVE.xattr.user.a":       "eA==",
				"LIBARCHIVE.xattr.user.b":       "eQ==",
			},
		},
		{Name: "old", Type: TypeReg, UncompressedOffset: 3584, UncompressedSize: 0, ModTime: time.Date(1901, 12, 13, 20, 45, 52, 0, time.UTC)},
		{Name: "link", Type: TypeSymlink, UncompressedOffset: 4096, Linkname: "../../etc/passwd", Mode: 0o777, ModTime: time.Unix(-1, 500).UTC()},
		{Name: "hard", Type: TypeHardlink, UncompressedOffset: 4608, Linkname: "old"},
		{Name: "dev/null", Type: TypeChar, UncompressedOffset: 5120, Devmajor: 1, Devminor: 3, Mode: 0o666},
		{Name: "dev/sda", Type: TypeBlock, UncompressedOffset: 5632, Devmajor: 8, Devminor: math.MaxInt64},
		{Name: "fifo", Type: TypeFifo, UncompressedOffset: 6144, Mode: -1, ModTime: time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)},
		{Name: "a/..b/c..", Type: TypeReg, UncompressedOffset: 6656, UncompressedSize: 1, ModTime: time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC)},
	}
}

// syntheticGzip returns a valid gzip-layer zTOC with three spans.
func syntheticGzip(t testing.TB, v1 bool) *Ztoc {
	t.Helper()
	zi := &GzipZinfo{SpanSize: 4096, V1: v1, Checkpoints: []Checkpoint{
		{In: 10, Out: 0, Window: make([]byte, WindowSize)},
		{In: 1500, Out: 4200, Bits: 3, Window: testWindow(1)},
		{In: 2500, Out: 8400, Bits: 0, Window: testWindow(2)},
	}}
	cp, err := MarshalGzipZinfo(zi)
	if err != nil {
		t.Fatal(err)
	}
	return &Ztoc{
		Version:                 Version,
		BuildToolIdentifier:     DefaultBuildToolIdentifier,
		CompressedArchiveSize:   3000,
		UncompressedArchiveSize: 10240,
		Files:                   syntheticFiles(),
		CompressionInfo:         CompressionInfo{Algorithm: Gzip, MaxSpanID: 2, SpanDigests: testDigests(3), Checkpoints: cp},
	}
}

// syntheticTar returns a valid tar-layer zTOC with two spans.
func syntheticTar() *Ztoc {
	return &Ztoc{
		Version:                 Version,
		BuildToolIdentifier:     "",
		CompressedArchiveSize:   10240,
		UncompressedArchiveSize: 8192,
		Files:                   syntheticFiles(),
		CompressionInfo: CompressionInfo{Algorithm: Uncompressed, MaxSpanID: 1, SpanDigests: testDigests(2),
			Checkpoints: MarshalTarZinfo(TarZinfo{SpanSize: 8192, Size: 10240})},
	}
}

// TestRoundTrip checks Unmarshal(Marshal(z)) == z and that Marshal is
// deterministic (PAX records come from a map).
func TestRoundTrip(t *testing.T) {
	empty := syntheticTar()
	empty.Files = nil
	cases := map[string]*Ztoc{
		"gzip":     syntheticGzip(t, false),
		"gzip-v1":  syntheticGzip(t, true),
		"tar":      syntheticTar(),
		"no-files": empty,
	}
	for name, z := range cases {
		t.Run(name, func(t *testing.T) {
			b := mustMarshal(t, z)
			for range 10 {
				b2, err := Marshal(z)
				if err != nil || !bytes.Equal(b, b2) {
					t.Fatalf("Marshal is not deterministic (err %v)", err)
				}
			}
			got, err := Unmarshal(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, z) {
				t.Fatalf("round trip differs:\n got %+v\nwant %+v", got, z)
			}
			// The decoded value must not alias the buffer.
			for i := range b {
				b[i] = 0xAA
			}
			if !reflect.DeepEqual(got, z) {
				t.Fatal("decoded zTOC changed when its buffer was overwritten")
			}
		})
	}
}

// TestModTimeEdges pins how times that SOCI cannot represent are stored.
func TestModTimeEdges(t *testing.T) {
	z := syntheticTar()
	z.Files = []FileMetadata{
		{Name: "zero", Type: TypeDir, UncompressedOffset: 512},
		{Name: "far", Type: TypeDir, UncompressedOffset: 1024, ModTime: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)},
		{Name: "neg", Type: TypeDir, UncompressedOffset: 1536, ModTime: time.Date(-5, 1, 1, 0, 0, 0, 0, time.UTC)},
		{Name: "zone", Type: TypeDir, UncompressedOffset: 2048, ModTime: time.Date(2020, 1, 1, 0, 0, 0, 0, time.FixedZone("x", -7*3600))},
	}
	b := mustMarshal(t, z)
	for _, want := range []string{"0001-01-01T00:00:00Z", "2020-01-01T07:00:00Z"} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("encoding lacks mod_time %q", want)
		}
	}
	got, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range got.Files {
		want := z.Files[i].ModTime.UTC()
		if y := want.Year(); y < 0 || y > 9999 {
			want = time.Time{}
		}
		if !reflect.DeepEqual(f.ModTime, want) {
			t.Errorf("%s: mod time %v, want %v", f.Name, f.ModTime, want)
		}
	}
}

// patch returns a copy of b with the only occurrence of old replaced by
// new (same length), failing if old is not unique.
func patch(t *testing.T, b []byte, old, new string) []byte {
	t.Helper()
	if len(old) != len(new) {
		t.Fatalf("patch %q -> %q changes the length", old, new)
	}
	if n := bytes.Count(b, []byte(old)); n != 1 {
		t.Fatalf("%q occurs %d times", old, n)
	}
	return bytes.Replace(b, []byte(old), []byte(new), 1)
}

// locate returns the position of the offset vector in field id of the table
// reached from the root through path (a list of table field ids).
func locate(t *testing.T, b []byte, field int, path ...int) (slot, vec int64) {
	t.Helper()
	d := &fbDecoder{buf: b, budget: math.MaxInt64}
	tab, err := d.table(int64(binary.LittleEndian.Uint32(b)))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range path {
		if tab, _, err = tab.tableField(id); err != nil {
			t.Fatal(err)
		}
	}
	slot, err = tab.field(field, 4)
	if err != nil || slot < 0 {
		t.Fatalf("field %d: %v", field, err)
	}
	vec, _, err = tab.ref(field)
	if err != nil {
		t.Fatal(err)
	}
	return slot, vec
}

func put32(b []byte, pos int64, v uint32) []byte {
	b = bytes.Clone(b)
	binary.LittleEndian.PutUint32(b[pos:], v)
	return b
}

// TestUnmarshalHostile feeds forged and corrupted zTOCs to Unmarshal.
func TestUnmarshalHostile(t *testing.T) {
	good, err := encode(syntheticTar())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Unmarshal(good); err != nil {
		t.Fatal(err)
	}
	// forgeFrom encodes z, changed by mod, without Marshal's validation.
	forgeFrom := func(z *Ztoc, mod func(z *Ztoc)) []byte {
		mod(z)
		b, err := encode(z)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	forge := func(mod func(z *Ztoc)) []byte { return forgeFrom(syntheticTar(), mod) }
	forgeGzip := func(mod func(z *Ztoc)) []byte { return forgeFrom(syntheticGzip(t, false), mod) }
	forgeCheckpoints := func(mod func(zi *GzipZinfo)) []byte {
		return forgeGzip(func(z *Ztoc) { z.Checkpoints = vfForgeCheckpoints(t, z, mod).Checkpoints })
	}
	_, metaVec := locate(t, good, fbTOCMetadata, fbZtocTOC)
	_, digestVec := locate(t, good, fbCISpanDigests, fbZtocCompressionInfo)
	tocSlot, _ := locate(t, good, fbZtocTOC)

	cases := []struct {
		name string
		b    []byte
		want string // substring of the error
	}{
		{"empty", nil, "too short"},
		{"root past end", put32(good, 0, uint32(len(good))), "outside"},
		{"root huge", put32(good, 0, math.MaxUint32), "outside"},
		{"metadata vector huge", put32(good, metaVec, math.MaxUint32), "overrun"},
		{"metadata vector long", put32(good, metaVec, uint32(len(good)/4)), "overrun"},
		{"digest vector huge", put32(good, digestVec, 1<<30), "overrun"},
		{"toc offset past end", put32(good, tocSlot, uint32(len(good))), "outside"},
		{"toc offset zero", put32(good, tocSlot, 0), "zero offset"},
		{"version", forge(func(z *Ztoc) { z.Version = "1.0" }), "version"},
		{"bad algorithm", forge(func(z *Ztoc) { z.Algorithm = 3 }), "algorithm"},
		{"negative max span", forge(func(z *Ztoc) { z.MaxSpanID = -1 }), "span"},
		{"digest count", forge(func(z *Ztoc) { z.SpanDigests = z.SpanDigests[:1] }), "span digests"},
		{"digest count high", forge(func(z *Ztoc) { z.MaxSpanID = 2; z.SpanDigests = testDigests(3) }), "spans"},
		{"bad digest hex", forge(func(z *Ztoc) { z.SpanDigests[1] = "sha256:xyz" }), "span digest 1"},
		{"upper-case digest", forge(func(z *Ztoc) { z.SpanDigests[0] = digest.Digest(strings.ToUpper(string(z.SpanDigests[0]))) }), "span digest 0"},
		{"sha512 digest", forge(func(z *Ztoc) { z.SpanDigests[0] = digest.Digest("sha512:" + strings.Repeat("ab", 64)) }), "span digest 0"},
		{"negative compressed size", forge(func(z *Ztoc) { z.CompressedArchiveSize = -1 }), "negative"},
		{"negative uncompressed size", forge(func(z *Ztoc) { z.UncompressedArchiveSize = -1 }), "negative"},
		{"tar zinfo size", forge(func(z *Ztoc) { z.CompressedArchiveSize = 10241 }), "size"},
		{"archive larger than tar", forge(func(z *Ztoc) { z.UncompressedArchiveSize = 10241 }), "cannot hold"},
		{"empty checkpoints", forge(func(z *Ztoc) { z.Checkpoints = nil }), "zinfo"},
		{"negative file size", forge(func(z *Ztoc) { z.Files[1].UncompressedSize = -1 }), `"./pax-file": negative size`},
		{"file past end", forge(func(z *Ztoc) { z.Files[1].UncompressedSize = 8192 }), `"./pax-file": data`},
		{"file size overflow", forge(func(z *Ztoc) { z.Files[1].UncompressedSize = math.MaxInt64 }), `"./pax-file": data`},
		{"negative offset", forge(func(z *Ztoc) { z.Files[0].UncompressedOffset = -512 }), `"./": data offset`},
		{"offset past end", forge(func(z *Ztoc) { z.Files[8].UncompressedOffset = 8193 }), "outside"},
		{"offsets unsorted", forge(func(z *Ztoc) { z.Files[3].UncompressedOffset = 2048 }), `"link": data offset 2048 does not follow`},
		{"bad sparse map", forge(func(z *Ztoc) { z.Files[1].PAXRecords = map[string]string{SparseMapRecord: "0,10,5"} }), "sparse map"},
		{"sparse map past file", forge(func(z *Ztoc) { z.Files[1].PAXRecords = map[string]string{SparseMapRecord: "990,11"} }), "sparse map"},
		{"unknown type", forge(func(z *Ztoc) { z.Files[2].Type = "sparse" }), `"old": unknown entry type`},
		{"empty type", forge(func(z *Ztoc) { z.Files[2].Type = "" }), `toc entry 2: "old": entry without type`},
		{"NUL in name", forge(func(z *Ztoc) { z.Files[2].Name = "a\x00b" }), "NUL"},
		{"NUL in link target", forge(func(z *Ztoc) { z.Files[3].Linkname = "a\x00b" }), "NUL"},
		{"whiteout of nothing", forge(func(z *Ztoc) { z.Files[2].Name = "/dir/.wh.." }), `"/dir/.wh..": whiteout ".wh.." names no file`},
		{"hardlink to the root", forge(func(z *Ztoc) { z.Files[4].Linkname = "a/../.." }), `hardlink target "a/../.." resolves to the layer root`},
		{"bad mod_time", patch(t, good, "2024-01-02T03:04:05Z", "2024-13-02T03:04:05Z"), "mod_time"},
		{"mod_time out of range", patch(t, good, "2100-06-01T12:00:00.123456789Z", "0000-01-01T00:00:00.1234+01:00"), "mod_time"},
		{"duplicate xattr", patch(t, good, "LIBARCHIVE.xattr.user.b", "LIBARCHIVE.xattr.user.a"), "twice"},
		{"gzip unsorted checkpoints", forgeCheckpoints(func(zi *GzipZinfo) {
			zi.Checkpoints[1], zi.Checkpoints[2] = zi.Checkpoints[2], zi.Checkpoints[1]
		}), "span 1"},
		{"gzip first span not at 0", forgeCheckpoints(func(zi *GzipZinfo) { zi.Checkpoints[0].Out = 100 }), "span 0 starts"},
		{"gzip checkpoint past layer", forgeGzip(func(z *Ztoc) { z.CompressedArchiveSize = 2000 }), "outside"},
		{"gzip zinfo truncated", forgeGzip(func(z *Ztoc) { z.Checkpoints = z.Checkpoints[:len(z.Checkpoints)-1] }), "zinfo"},
		{"gzip zinfo spans mismatch", forgeGzip(func(z *Ztoc) { z.MaxSpanID = 1; z.SpanDigests = z.SpanDigests[:2] }), "checkpoints"},
		{"no toc", forgeRaw(func(b *flatbuffers.Builder) {
			v := b.CreateString(Version)
			b.StartObject(fbZtocNumFields)
			b.PrependUOffsetTSlot(fbZtocVersion, v, 0)
		}), "toc is missing"},
		{"no compression info", forgeRaw(func(b *flatbuffers.Builder) {
			b.StartVector(4, 0, 4)
			vec := b.EndVector(0)
			b.StartObject(fbTOCNumFields)
			b.PrependUOffsetTSlot(fbTOCMetadata, vec, 0)
			toc := b.EndObject()
			b.StartObject(fbZtocNumFields)
			b.PrependUOffsetTSlot(fbZtocTOC, toc, 0)
		}), "compression info is missing"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			z, err := Unmarshal(c.b)
			if err == nil {
				t.Fatalf("decoded %+v, want error containing %q", z, c.want)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q does not contain %q", err, c.want)
			}
			// Marshal refuses the same zTOCs (when they can be decoded
			// without validation).
			d := &fbDecoder{buf: c.b, budget: int64(len(c.b))}
			if raw, derr := d.ztoc(); derr == nil {
				if _, merr := Marshal(raw); merr == nil {
					t.Fatalf("Marshal accepted what Unmarshal rejects with %v", err)
				}
			}
		})
	}
}

// forgeRaw builds a flatbuffer whose root table is left open by build.
func forgeRaw(build func(b *flatbuffers.Builder)) []byte {
	b := flatbuffers.NewBuilder(0)
	build(b)
	b.Finish(b.EndObject())
	return b.FinishedBytes()
}

// TestUnmarshalSharedOffsets checks that a small flatbuffer pointing many
// offsets at one big object cannot make the decoder allocate a lot.
func TestUnmarshalSharedOffsets(t *testing.T) {
	b := flatbuffers.NewBuilder(0)
	name := b.CreateString(strings.Repeat("n", 64<<10))
	typ := b.CreateString(TypeDir)
	b.StartObject(fbFileNumFields)
	b.PrependUOffsetTSlot(fbFileName, name, 0)
	b.PrependUOffsetTSlot(fbFileType, typ, 0)
	file := b.EndObject()
	const copies = 20000 // 20000 * 64 KiB = 1.3 GB if copied naively
	offs := make([]flatbuffers.UOffsetT, copies)
	for i := range offs {
		offs[i] = file
	}
	vec := marshalOffsetVector(b, offs)
	b.StartObject(fbTOCNumFields)
	b.PrependUOffsetTSlot(fbTOCMetadata, vec, 0)
	toc := b.EndObject()
	b.StartObject(fbZtocNumFields)
	b.PrependUOffsetTSlot(fbZtocTOC, toc, 0)
	b.Finish(b.EndObject())
	buf := b.FinishedBytes()

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := Unmarshal(buf)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "referenced more than once") {
		t.Fatalf("got error %v, want a shared-reference error", err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 8*uint64(len(buf)) {
		t.Fatalf("decoding %d bytes allocated %d bytes", len(buf), alloc)
	}
}

// TestUnmarshalTruncated decodes prefixes of a golden zTOC: none may decode
// (every field matters) and none may panic.
func TestUnmarshalTruncated(t *testing.T) {
	for _, g := range goldens {
		b := readGolden(t, g.File)
		step := len(b)/3000 + 1
		for n := 0; n < len(b); n++ {
			if n > 512 && n < len(b)-512 && n%step != 0 {
				continue
			}
			// Copy so that the race detector / bounds checks see the
			// real end of the slice.
			if z, err := Unmarshal(bytes.Clone(b[:n])); err == nil {
				t.Fatalf("%s truncated to %d bytes decoded (%d files)", g.File, n, len(z.Files))
			}
		}
	}
}

// TestUnmarshalBitFlips corrupts golden zTOCs at random. Whatever decodes
// must survive a Marshal/Unmarshal round trip; nothing may panic.
func TestUnmarshalBitFlips(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	iters := 1000
	if testing.Short() {
		iters = 300
	}
	for _, g := range goldens[1:] {
		orig := readGolden(t, g.File)
		// Flip bytes mostly outside the checkpoint windows, where most of
		// the structure lives.
		z, _ := Unmarshal(orig)
		cpStart := bytes.Index(orig, z.Checkpoints)
		decoded := 0
		for range iters {
			b := bytes.Clone(orig)
			for range 1 + rng.Intn(4) {
				i := rng.Intn(len(b))
				if i >= cpStart && i < cpStart+len(z.Checkpoints) && rng.Intn(8) != 0 {
					i = rng.Intn(cpStart)
				}
				b[i] ^= byte(1 + rng.Intn(255))
			}
			if checkReencode(t, b) {
				decoded++
			}
		}
		t.Logf("%s: %d/%d corrupted copies still decoded", g.File, decoded, iters)
	}
}

// mustMarshal returns Marshal(z), failing the test when Marshal fails.
func mustMarshal(t testing.TB, z *Ztoc) []byte {
	t.Helper()
	b, err := Marshal(z)
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	return b
}

// roundTrip marshals z and unmarshals the bytes, failing the test when
// either fails, and returns the bytes and the decoded zTOC.
func roundTrip(t testing.TB, z *Ztoc) ([]byte, *Ztoc) {
	t.Helper()
	b := mustMarshal(t, z)
	z2, err := Unmarshal(b)
	if err != nil {
		t.Fatalf("Unmarshal(Marshal(z)): %v", err)
	}
	return b, z2
}

// checkReencode asserts the fuzz property: if b decodes, its re-encoding
// decodes to the same value. It reports whether b decoded.
func checkReencode(t testing.TB, b []byte) bool {
	t.Helper()
	z, err := Unmarshal(b)
	if err != nil {
		return false
	}
	if _, z2 := roundTrip(t, z); !reflect.DeepEqual(z, z2) {
		t.Fatal("re-encoded zTOC decodes to a different value")
	}
	return true
}

// TestMarshalRejectsInvalid checks that Marshal validates.
func TestMarshalRejectsInvalid(t *testing.T) {
	if _, err := Marshal(nil); err == nil {
		t.Error("Marshal(nil) succeeded")
	}
	z := syntheticGzip(t, false)
	z.Files[3].Name = "/abs\x00"
	if _, err := Marshal(z); err == nil || !strings.Contains(err.Error(), `"/abs\x00"`) {
		t.Errorf("Marshal of a name with NUL: %v", err)
	}
}

// TestUnmarshalConfinedNames: names that containerd confines to the layer
// root (absolute, with ".." components, resolving to the root itself) and
// hardlinks to such names decode, with their raw names.
func TestUnmarshalConfinedNames(t *testing.T) {
	for _, c := range []struct{ name, hardlink string }{
		{"/etc/shadow", "/etc/shadow"},
		{"../escape", "../../etc/shadow"},
		{"./a/../../b", "./a/../../b"},
		{"a/..", "a/../b"},
		{"", "/x"},
	} {
		z := syntheticTar()
		z.Files[2].Name, z.Files[4].Linkname = c.name, c.hardlink
		b, z2 := roundTrip(t, z)
		if z2.Files[2].Name != c.name || z2.Files[4].Linkname != c.hardlink {
			t.Errorf("decoded name %q, hardlink %q; want %q, %q", z2.Files[2].Name, z2.Files[4].Linkname, c.name, c.hardlink)
		}
		if !checkReencode(t, b) {
			t.Errorf("%q: does not re-encode", c.name)
		}
	}
}

// BenchmarkUnmarshal measures decoding the largest golden zTOC.
func BenchmarkUnmarshal(b *testing.B) {
	buf := readGolden(b, goldens[0].File)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if _, err := Unmarshal(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMarshal measures encoding the largest golden zTOC.
func BenchmarkMarshal(b *testing.B) {
	z := goldens[0].decode(b)
	for b.Loop() {
		if _, err := Marshal(z); err != nil {
			b.Fatal(err)
		}
	}
}

// TestModTimeOtherZone decodes a mod_time written by an indexer outside UTC
// (SOCI formats in the host's zone): the instant is kept, normalized to UTC.
// Re-encoding then writes "Z", so such zTOCs do not re-encode byte for byte.
func TestModTimeOtherZone(t *testing.T) {
	good := mustMarshal(t, syntheticTar())
	b := patch(t, good, "2100-06-01T12:00:00.123456789Z", "2100-06-01T05:00:00.1234-07:00")
	z, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	want := time.Date(2100, 6, 1, 12, 0, 0, 123400000, time.UTC)
	if got := z.Files[1].ModTime; !reflect.DeepEqual(got, want) {
		t.Fatalf("mod time %v, want %v", got, want)
	}
	out := mustMarshal(t, z)
	if !bytes.Contains(out, []byte("2100-06-01T12:00:00.1234Z")) {
		t.Fatal("re-encoded mod time is not the UTC form")
	}
}
