package ztoc

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

var updateFuzzCorpus = flag.Bool("update-fuzz-corpus", false, "rewrite the committed seed corpora under testdata/fuzz")

// FuzzUnmarshal feeds arbitrary bytes to Unmarshal. Properties: it never
// panics, and whatever decodes re-encodes to a zTOC that decodes to the
// same value. Seeds: the SOCI golden zTOCs and their truncations, plus the
// committed corpus in testdata/fuzz/FuzzUnmarshal.
func FuzzUnmarshal(f *testing.F) {
	for _, g := range goldens {
		b := readGolden(f, g.File)
		f.Add(b)
		f.Add(b[:len(b)-1])
		f.Add(b[:len(b)/2])
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkReencode(t, b)
	})
}

// FuzzUnmarshalGzipZinfo feeds arbitrary bytes to UnmarshalGzipZinfo and
// the span table built on it. Properties: no panic; a decoded blob
// re-encodes to the same bytes (v1 stays v1) and yields a span table or a
// clean error. Seeds: the checkpoint blobs of the golden gzip zTOCs in v2
// and v1 form, plus testdata/fuzz/FuzzUnmarshalGzipZinfo.
func FuzzUnmarshalGzipZinfo(f *testing.F) {
	for _, g := range goldens {
		if !g.Gzip {
			continue
		}
		z, err := Unmarshal(readGolden(f, g.File))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(z.Checkpoints)
		zi, err := UnmarshalGzipZinfo(z.Checkpoints)
		if err != nil {
			f.Fatal(err)
		}
		zi.V1 = true
		v1, err := MarshalGzipZinfo(zi)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(v1)
	}
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

// fuzzSeeds returns the committed seed corpora: small inputs that reach the
// interesting code paths quickly (the big golden files are added at run
// time by the fuzz targets themselves).
func fuzzSeeds(t *testing.T) map[string]map[string][]byte {
	t.Helper()
	tarZ, err := Marshal(syntheticTar())
	if err != nil {
		t.Fatal(err)
	}
	one := syntheticTar()
	one.Files = one.Files[:1]
	oneB, err := Marshal(one)
	if err != nil {
		t.Fatal(err)
	}
	sparse := syntheticTar()
	sparse.Files[1].PAXRecords = map[string]string{SparseMapRecord: "0,10,500,20,990,10"}
	sparseB, err := Marshal(sparse)
	if err != nil {
		t.Fatal(err)
	}
	gz := syntheticGzip(t, false)
	gz.Files = gz.Files[1:2]
	zi, err := UnmarshalGzipZinfo(gz.Checkpoints)
	if err != nil {
		t.Fatal(err)
	}
	zi.Checkpoints = zi.Checkpoints[:1] // one all-zero window keeps the seed small
	gz.MaxSpanID, gz.SpanDigests = 0, gz.SpanDigests[:1]
	if gz.Checkpoints, err = MarshalGzipZinfo(zi); err != nil {
		t.Fatal(err)
	}
	gzB, err := Marshal(gz)
	if err != nil {
		t.Fatal(err)
	}
	v2One := gz.Checkpoints
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
	return map[string]map[string][]byte{
		"FuzzUnmarshal": {
			"synthetic-tar":         tarZ,
			"synthetic-tar-1file":   oneB,
			"synthetic-gzip-1span":  gzB,
			"synthetic-sparse":      sparseB,
			"truncated-tar-half":    tarZ[:len(tarZ)/2],
			"truncated-tar-minus-1": tarZ[:len(tarZ)-1],
		},
		"FuzzUnmarshalGzipZinfo": {
			"v2-1checkpoint": v2One,
			"v1-implied":     v1Implied,
			"v1-2checkpoint": v1Two,
			"header-only-v2": v2One[:zinfoHeaderSize],
		},
	}
}

// marshalCorpusFile renders one []byte input in Go's fuzz corpus format.
func marshalCorpusFile(b []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b)
}

// TestFuzzCorpus checks that the committed seed corpora are the ones
// fuzzSeeds generates (run with -update-fuzz-corpus to rewrite them).
// Crashers found by fuzzing live next to them under other names and are
// replayed by plain `go test`.
func TestFuzzCorpus(t *testing.T) {
	for target, seeds := range fuzzSeeds(t) {
		dir := filepath.Join("testdata", "fuzz", target)
		for name, b := range seeds {
			path := filepath.Join(dir, "seed-"+name)
			want := marshalCorpusFile(b)
			if *updateFuzzCorpus {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./ztoc -run TestFuzzCorpus -update-fuzz-corpus)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s is stale (run go test ./ztoc -run TestFuzzCorpus -update-fuzz-corpus)", path)
			}
		}
	}
}
