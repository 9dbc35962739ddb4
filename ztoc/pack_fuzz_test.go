package ztoc

import (
	"path/filepath"
	"reflect"
	"testing"
)

// packFuzzSeeds returns the heads the pack head fuzzer starts from: small
// gzip and tar heads, with and without chunk tables, and a v1 gzip one,
// each as it is published (zstd) and as the decoder behind zstd reads it.
func packFuzzSeeds(t testing.TB) map[string][]byte {
	t.Helper()
	v1 := vfForgeCheckpoints(t, packTestGzip(t, false), func(zi *GzipZinfo) { zi.V1 = true })
	seeds := make(map[string][]byte)
	for name, z := range map[string]*Ztoc{
		"gzip-chunks":   packTestGzip(t, true),
		"gzip-v1":       v1,
		"tar-chunks":    packTestTar(true),
		"tar-no-chunks": packTestTar(false),
	} {
		_, head, _, _ := packOf(t, z)
		seeds[name] = head
		seeds[name+"-raw"] = rawHead(t, head)
	}
	return seeds
}

// FuzzUnmarshalPackHead feeds arbitrary bytes to UnmarshalPackHead, and
// to the head decoder behind its zstd layer (mutated zstd frames rarely get
// past their checksum). Properties: neither panics; a head that decodes
// re-encodes to a head that decodes to the same value, and its windows lie
// inside the windows blob it names. Seeds: packFuzzSeeds, committed under
// testdata/fuzz/FuzzUnmarshalPackHead.
func FuzzUnmarshalPackHead(f *testing.F) {
	for _, b := range packFuzzSeeds(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := UnmarshalPackHead(b)
		checkFuzzedHead(t, h, err)
		h, err = decodeHead(b, true)
		checkFuzzedHead(t, h, err)
	})
}

// checkFuzzedHead checks the properties of FuzzUnmarshalPackHead on what a
// decoder made of fuzzed bytes.
func checkFuzzedHead(t *testing.T, h *PackHead, err error) {
	t.Helper()
	if err != nil {
		if err.Error() == "" {
			t.Fatal("empty error message")
		}
		return
	}
	raw, err := h.encode()
	if err != nil {
		t.Fatalf("a decoded head does not re-encode: %v", err)
	}
	h2, err := decodeHead(raw, true)
	if err != nil {
		t.Fatalf("a re-encoded head does not decode: %v", err)
	}
	if !reflect.DeepEqual(h, h2) {
		t.Fatal("a head changes through encode/decode")
	}
	for i := range h.Ztoc.NumSpans() {
		if off, n := h.WindowRange(SpanID(i)); off < 0 || n < 0 || off+n > h.WindowsSize {
			t.Fatalf("window %d [%d, +%d) is outside the %d-byte windows blob", i, off, n, h.WindowsSize)
		}
	}
}

// TestPackFuzzCorpus checks that the committed seeds of
// FuzzUnmarshalPackHead are the ones packFuzzSeeds generates (run with
// -update-fuzz-corpus to rewrite them).
func TestPackFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzUnmarshalPackHead")
	for name, b := range packFuzzSeeds(t) {
		checkSeedFile(t, filepath.Join(dir, "seed-"+name), marshalCorpusFile(t, b), "run go test ./ztoc -run TestPackFuzzCorpus -update-fuzz-corpus")
	}
}
