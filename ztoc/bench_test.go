package ztoc

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"testing"

	kgzip "github.com/klauspost/compress/gzip"
)

// benchLayer returns the bytes of the layer named by $SPANPULL_BENCH_LAYER
// (default: the cached Debian layer that scripts/debian-layer.sh builds).
func benchLayer(b *testing.B) []byte {
	b.Helper()
	name := os.Getenv("SPANPULL_BENCH_LAYER")
	if name == "" {
		name = "/var/cache/spanpull/debian-python3.tar.gz"
	}
	data, err := os.ReadFile(name)
	if err != nil {
		b.Fatalf("benchmark layer: %v (build it with scripts/debian-layer.sh %s)", err, name)
	}
	return data
}

// BenchmarkDecompress compares the decoders we could build on, on the same
// layer, to justify cgo zlib for building (SetBytes: compressed bytes).
func BenchmarkDecompress(b *testing.B) {
	data := benchLayer(b)
	b.Run("zlib-cgo", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		out := make([]byte, 1<<20)
		for b.Loop() {
			inf, err := newInflater(windowBitsGzip)
			if err != nil {
				b.Fatal(err)
			}
			in := data
			for {
				c, _, ret, _ := inf.inflate(in, out, zNoFlush)
				in = in[c:]
				if ret == zStreamEnd {
					break
				}
				if ret != zOK {
					b.Fatalf("inflate: %d", ret)
				}
			}
			inf.close()
		}
	})
	for _, r := range []struct {
		name string
		open func(io.Reader) (io.Reader, error)
	}{
		{"stdlib", func(r io.Reader) (io.Reader, error) { return gzip.NewReader(r) }},
		{"klauspost", func(r io.Reader) (io.Reader, error) { return kgzip.NewReader(r) }},
	} {
		b.Run(r.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				zr, err := r.open(bytes.NewReader(data))
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, zr); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkBuild measures the whole single-pass build (TOC, checkpoints,
// span digests, layer digest) from memory (SetBytes: compressed bytes).
func BenchmarkBuild(b *testing.B) {
	data := benchLayer(b)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, _, err := Build(context.Background(), bytes.NewReader(data), BuildOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
