package ztoc

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

var updateFuzzCorpus = flag.Bool("update-fuzz-corpus", false, "rewrite the committed seed corpora under testdata/fuzz")

// FuzzUnmarshal feeds arbitrary bytes to Unmarshal. Properties: it never
// panics, and whatever decodes re-encodes to a zTOC that decodes to the
// same value. Seeds: the committed corpus in testdata/fuzz/FuzzUnmarshal
// (small zTOCs of tiny generated layers, see fuzzSeeds). The SOCI golden
// zTOCs are no seeds: at hundreds of KiB each, an execution on one of
// their mutants took milliseconds and minimizing one took minutes.
func FuzzUnmarshal(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		checkReencode(t, b)
	})
}

// FuzzUnmarshalGzipZinfo feeds arbitrary bytes to UnmarshalGzipZinfo and
// the span table built on it. Properties: no panic; a decoded blob
// re-encodes to the same bytes (v1 stays v1) and yields a span table or a
// clean error. Seeds: testdata/fuzz/FuzzUnmarshalGzipZinfo (v1 and v2
// blobs of one or two checkpoints).
func FuzzUnmarshalGzipZinfo(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		zi, err := UnmarshalGzipZinfo(b)
		if err != nil {
			return
		}
		out, err := MarshalGzipZinfo(zi)
		if err != nil {
			t.Fatalf("decoded zinfo does not re-encode: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoded zinfo differs (v1 %v, %d checkpoints)", zi.V1, len(zi.Checkpoints))
		}
		n := len(zi.Checkpoints)
		z := &Ztoc{
			Version:                 Version,
			CompressedArchiveSize:   1 << 40,
			UncompressedArchiveSize: 1 << 40,
			CompressionInfo: CompressionInfo{
				Algorithm:   Gzip,
				MaxSpanID:   SpanID(n - 1),
				SpanDigests: testDigests(n),
				Checkpoints: b,
			},
		}
		spans, err := z.Spans()
		if err != nil {
			return
		}
		if len(spans) != n {
			t.Fatalf("%d spans from %d checkpoints", len(spans), n)
		}
		if err := z.Validate(); err != nil {
			return
		}
		if _, z2 := roundTrip(t, z); !reflect.DeepEqual(z, z2) {
			t.Fatal("zTOC around the zinfo does not round-trip")
		}
	})
}

// fuzzSeeds returns the committed seed corpora, by fuzz target and seed
// name: each seed is the target's arguments. They are small (a few KiB)
// so that every target runs at thousands of executions a second: tiny
// generated layers, their zTOCs, their header blocks, and synthetic zTOCs.
func fuzzSeeds(t *testing.T) map[string]map[string][]any {
	t.Helper()
	seeds := map[string]map[string][]any{
		"FuzzUnmarshal":          syntheticSeeds(t),
		"FuzzUnmarshalGzipZinfo": zinfoSeeds(t),
		"FuzzBuild":              {},
		"FuzzVerifyLayer":        {},
		"FuzzCheckHeader":        checkHeaderSeeds(t),
	}
	for _, l := range fuzzLayers(t) {
		zb := mustMarshal(t, l.z)
		seeds["FuzzBuild"][l.name] = []any{l.blob, uint16(l.spanSize - 1)}
		if len(zb) > 16<<10 {
			// A window makes a zTOC too big to minimize quickly: the
			// unit tests forge multi-checkpoint zTOCs instead.
			continue
		}
		seeds["FuzzUnmarshal"][l.name] = []any{zb}
		seeds["FuzzUnmarshal"][l.name+"-truncated"] = []any{zb[:len(zb)*2/3]}
		seeds["FuzzVerifyLayer"][l.name] = []any{l.blob, zb}
	}
	return seeds
}

// syntheticSeeds are zTOCs with every corner of FileMetadata.
func syntheticSeeds(t *testing.T) map[string][]any {
	t.Helper()
	tarZ := mustMarshal(t, syntheticTar())
	one := syntheticTar()
	one.Files = one.Files[:1]
	oneB := mustMarshal(t, one)
	sparse := syntheticTar()
	sparse.Files[1].PAXRecords = map[string]string{SparseMapRecord: "0,10,500,20,990,10"}
	sparseB := mustMarshal(t, sparse)
	return map[string][]any{
		"synthetic-tar":         {tarZ},
		"synthetic-tar-1file":   {oneB},
		"synthetic-sparse":      {sparseB},
		"truncated-tar-half":    {tarZ[:len(tarZ)/2]},
		"truncated-tar-minus-1": {tarZ[:len(tarZ)-1]},
	}
}

// zinfoSeeds are gzip checkpoint blobs: a blob holding a window is at
// least 32 KiB, so there are only two such.
func zinfoSeeds(t *testing.T) map[string][]any {
	t.Helper()
	zi := &GzipZinfo{SpanSize: 4096, Checkpoints: []Checkpoint{{In: 10, Window: make([]byte, WindowSize)}}}
	v2One, err := MarshalGzipZinfo(zi)
	if err != nil {
		t.Fatal(err)
	}
	zi.V1 = true
	v1Implied, err := MarshalGzipZinfo(zi) // header only: checkpoint 0 implied
	if err != nil {
		t.Fatal(err)
	}
	zi.Checkpoints = append(zi.Checkpoints, Checkpoint{In: 900, Out: 70000, Bits: 5})
	v1Two, err := MarshalGzipZinfo(zi)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]any{
		"v2-1checkpoint": {v2One},
		"v1-implied":     {v1Implied},
		"v1-2checkpoint": {v1Two},
		"header-only-v2": {v2One[:zinfoHeaderSize]},
	}
}

// fuzzLayer is a tiny layer and its zTOC.
type fuzzLayer struct {
	name     string
	blob     []byte
	spanSize int64
	z        *Ztoc
}

// fuzzTinyTar is a tiny layer with an entry of every type, PAX records
// and names that containerd confines to the root (GNU long names and
// sparse files are in FuzzBuild's other seeds).
func fuzzTinyTar(t testing.TB) []byte {
	t.Helper()
	mt := layertest.ModTime
	return layertest.Tar(t,
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: mt}},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: "/absolute/file.txt", Mode: 0o4755, Uid: 1000, Gid: 100,
			Uname: "u", Gname: "g", ModTime: mt.Add(123), Format: tar.FormatPAX,
			PAXRecords: map[string]string{"SCHILY.xattr.user.x": "a\x00b"}}, Data: []byte("hello\n")},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: "a/../../b", Mode: 0o644, ModTime: mt}, Data: layertest.Text(1, 300)},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "l", Linkname: "/absolute/file.txt", Mode: 0o777, ModTime: mt}},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: "h", Linkname: "/absolute/file.txt", ModTime: mt}},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: "null", Devmajor: 1, Devminor: 3, Mode: 0o666, ModTime: mt}},
	)
}

// fuzzLayers returns tiny layers and their zTOCs: a tar layer of several
// spans, a gzip layer of one span and one of two, their checkpoint blobs
// in the v1 layout (checkpoint 0 implied: no all-zero window).
func fuzzLayers(t *testing.T) []fuzzLayer {
	t.Helper()
	tarball := fuzzTinyTar(t)
	build := func(name string, blob []byte, spanSize int64) fuzzLayer {
		z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize})
		if err != nil {
			t.Fatal(err)
		}
		return fuzzLayer{name, blob, spanSize, z}
	}
	tarL := build("tiny-tar", tarball, 2048)
	gz := build("tiny-gzip-v1", layertest.Gzip(t, tarball, gzip.BestCompression), 1<<15)
	gz.z = vfForgeCheckpoints(t, gz.z, func(zi *GzipZinfo) { zi.V1 = true })
	// Sync flushes end deflate blocks, so a tiny layer gets a checkpoint.
	var two bytes.Buffer
	zw := gzip.NewWriter(&two)
	for i := 0; i < len(tarball); i += 1024 {
		zw.Write(tarball[i:min(i+1024, len(tarball))])
		zw.Flush()
	}
	zw.Close()
	gz2 := build("tiny-gzip-2spans", two.Bytes(), len64(tarball)/2)
	gz2.z = vfForgeCheckpoints(t, gz2.z, func(zi *GzipZinfo) { zi.V1 = true }) // one window, not two
	if tarL.z.NumSpans() < 2 || gz.z.NumSpans() != 1 || gz2.z.NumSpans() != 2 {
		t.Fatalf("tiny layers of %d, %d and %d spans", tarL.z.NumSpans(), gz.z.NumSpans(), gz2.z.NumSpans())
	}
	return []fuzzLayer{tarL, gz, gz2}
}

func len64(b []byte) int64 { return int64(len(b)) }

// argsSize returns the bytes of a seed's byte slice and string arguments.
func argsSize(args []any) int {
	n := 0
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			n += len(v)
		case string:
			n += len(v)
		}
	}
	return n
}

// marshalCorpusFile renders one input in Go's fuzz corpus format.
func marshalCorpusFile(t *testing.T, args ...any) []byte {
	t.Helper()
	b := []byte("go test fuzz v1\n")
	for _, a := range args {
		switch v := a.(type) {
		case []byte:
			b = fmt.Appendf(b, "[]byte(%q)\n", v)
		case string:
			b = fmt.Appendf(b, "string(%q)\n", v)
		case int64, uint16, uint32:
			b = fmt.Appendf(b, "%T(%v)\n", v, v)
		default:
			t.Fatalf("corpus argument of type %T", a)
		}
	}
	return b
}

// checkSeedFile checks that the committed seed file path holds want, or
// with -update-fuzz-corpus writes it; hint says how to regenerate.
func checkSeedFile(t *testing.T, path string, want []byte, hint string) {
	t.Helper()
	if *updateFuzzCorpus {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, want, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (%s)", err, hint)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is stale (%s)", path, hint)
	}
}

// TestFuzzCorpus checks that the committed seed corpora are the ones
// fuzzSeeds generates (run with -update-fuzz-corpus to rewrite them, which
// also removes stale seed files). Crashers found by fuzzing live next to
// them under other names and are replayed by plain `go test`.
func TestFuzzCorpus(t *testing.T) {
	const hint = "run go test ./ztoc -run TestFuzzCorpus -update-fuzz-corpus"
	for target, seeds := range fuzzSeeds(t) {
		dir := filepath.Join("testdata", "fuzz", target)
		old, err := filepath.Glob(filepath.Join(dir, "seed-*"))
		if err != nil {
			t.Fatal(err)
		}
		for _, path := range old {
			if _, ok := seeds[strings.TrimPrefix(filepath.Base(path), "seed-")]; ok {
				continue
			}
			if !*updateFuzzCorpus {
				t.Errorf("%s is no seed fuzzSeeds makes (%s)", path, hint)
			} else if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		}
		for name, args := range seeds {
			path := filepath.Join(dir, "seed-"+name)
			checkSeedFile(t, path, marshalCorpusFile(t, args...), hint)
			if n := argsSize(args); n > 48<<10 && !*updateFuzzCorpus {
				t.Errorf("%s holds %d KiB: seeds must stay small to keep fuzzing fast", path, n>>10)
			}
		}
	}
}
