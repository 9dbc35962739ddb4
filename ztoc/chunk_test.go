package ztoc

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// withoutChunks returns a copy of z without its chunk table, which SOCI's
// encoding does not carry: what a zTOC read back from its bytes holds.
func withoutChunks(z *Ztoc) *Ztoc {
	c := *z
	c.Chunks = nil
	return &c
}

// cfCheckChunks checks the chunk table of z, built from blob whose
// uncompressed stream is stream: one list per span, tiling each span, every
// digest the SHA-256 of the chunk's bytes, and, for every chunk k,
// inflating from the span's checkpoint with only the bytes up to chunk k's
// end yields the stream up to its uncompressed end.
func cfCheckChunks(t testing.TB, z *Ztoc, blob, stream []byte) {
	t.Helper()
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	if z.Chunks == nil {
		t.Fatal("Build made no chunk table")
	}
	if err := checkChunks(spans, z.Chunks); err != nil {
		t.Fatal(err)
	}
	for i, s := range spans {
		start, out := s.CompressedStart, s.UncompressedStart
		for k, c := range z.Chunks[i] {
			sum := sha256.Sum256(blob[start:c.CompressedEnd])
			if d := digest.NewDigestFromBytes(digest.SHA256, sum[:]); d != c.Digest {
				t.Fatalf("span %d chunk %d [%d, %d): digest %s, table says %s", i, k, start, c.CompressedEnd, d, c.Digest)
			}
			var got []byte
			err := InflateRange(z.Algorithm, s, blob[s.CompressedStart:c.CompressedEnd], out, c.UncompressedEnd, func(b []byte) error {
				got = append(got, b...)
				return nil
			})
			if err != nil {
				t.Fatalf("span %d chunk %d: inflating the bytes up to %d to uncompressed %d: %v", i, k, c.CompressedEnd, c.UncompressedEnd, err)
			}
			if !bytes.Equal(got, stream[out:c.UncompressedEnd]) {
				t.Fatalf("span %d chunk %d: uncompressed [%d, %d) differs from the stream at byte %d", i, k, out, c.UncompressedEnd, cfFirstDiff(got, stream[out:]))
			}
			start, out = c.CompressedEnd, c.UncompressedEnd
		}
	}
}

// cfPigzMembers compresses b with pigz as one member per piece of size
// bytes: pigz's deflate (empty stored blocks every 128 KiB) in a
// multi-member stream.
func cfPigzMembers(t testing.TB, b []byte, size int) []byte {
	t.Helper()
	var out []byte
	for len(b) > 0 {
		n := min(size, len(b))
		out = append(out, cfRun(t, b[:n], nil, "pigz", "-n", "-6", "-p", "2", "-c")...)
		b = b[n:]
	}
	return out
}

// TestChunks builds layers in several compressions with small chunks, at
// tiny and large span sizes, and checks every chunk against the stream.
func TestChunks(t *testing.T) {
	t.Parallel()
	tr := layertest.Text(7, 600<<10)
	tarball := layertest.Tar(t,
		layertest.Dir("d/", 0o755),
		layertest.Reg("d/text", 0o644, tr),
		layertest.Reg("d/random", 0o644, layertest.Random(3, 200<<10)),
		layertest.Reg("d/empty", 0o644, nil),
		layertest.Reg("d/more", 0o644, tr[:99999]),
	)
	compressions := append(cfCompressionsNamed(t, "tar", "gzip-1", "gzip-9", "gzip-multi", "gzip-multi-tiny", "gzip-stored", "pigz"),
		cfCompression{"pigz-members", func(t testing.TB, b []byte) []byte { return cfPigzMembers(t, b, 250000) }},
		cfCompression{"gzip-padded", func(t testing.TB, b []byte) []byte {
			// Zero padding after the last member, across chunk boundaries.
			return append(layertest.GzipMembers(t, gzip.BestSpeed, b[:300000], b[300000:]), make([]byte, 3000)...)
		}},
	)
	for _, c := range compressions {
		blob := c.compress(t, tarball)
		for _, spanSize := range []int64{16 << 10, 1 << 20} {
			for _, chunkSize := range []int64{1000, 4096, DefaultChunkSize, 1 << 30} {
				t.Run(fmt.Sprintf("%s/%d/%d", c.name, spanSize, chunkSize), func(t *testing.T) {
					z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize, ChunkSize: chunkSize})
					if err != nil {
						t.Fatal(err)
					}
					cfCheckChunks(t, z, blob, cfUncompressed(t, blob))
					// Chunks change no zTOC byte.
					z0, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize, ChunkSize: -1})
					if err != nil {
						t.Fatal(err)
					}
					if z0.Chunks != nil {
						t.Error("a negative chunk size still built a chunk table")
					}
					b := mustMarshal(t, z)
					b0 := mustMarshal(t, z0)
					if !bytes.Equal(b, b0) {
						t.Error("the zTOC bytes depend on the chunk size")
					}
				})
			}
		}
	}
}

// TestChunksCountAndSize checks that chunks are ChunkSize bytes long,
// except the last of each span.
func TestChunksCountAndSize(t *testing.T) {
	t.Parallel()
	tarball := layertest.Tar(t, layertest.Reg("f", 0o644, layertest.Random(1, 300<<10)))
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6") {
		blob := c.compress(t, tarball)
		const chunkSize = 10000
		z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: 100 << 10, ChunkSize: chunkSize})
		if err != nil {
			t.Fatal(err)
		}
		spans, err := z.Spans()
		if err != nil {
			t.Fatal(err)
		}
		for i, s := range spans {
			cs := z.Chunks[i]
			if want := (s.Size() + chunkSize - 1) / chunkSize; int64(len(cs)) != want {
				t.Errorf("%s span %d of %d bytes: %d chunks, want %d", c.name, i, s.Size(), len(cs), want)
			}
			for k, ch := range cs[:len(cs)-1] {
				if ch.CompressedEnd != s.CompressedStart+int64(k+1)*chunkSize {
					t.Errorf("%s span %d chunk %d ends at %d", c.name, i, k, ch.CompressedEnd)
				}
			}
		}
	}
}

// TestCheckChunks checks that checkChunks rejects every way a chunk table
// can disagree with its spans.
func TestCheckChunks(t *testing.T) {
	spans := []Span{
		{ID: 0, CompressedStart: 10, CompressedEnd: 30, UncompressedStart: 0, UncompressedEnd: 100},
		{ID: 1, CompressedStart: 29, CompressedEnd: 40, UncompressedStart: 100, UncompressedEnd: 150},
	}
	d := digest.FromString("x")
	good := func() [][]Chunk {
		return [][]Chunk{
			{{CompressedEnd: 20, UncompressedEnd: 40, Digest: d}, {CompressedEnd: 30, UncompressedEnd: 100, Digest: d}},
			{{CompressedEnd: 40, UncompressedEnd: 150, Digest: d}},
		}
	}
	if err := checkChunks(spans, good()); err != nil {
		t.Fatalf("good table: %v", err)
	}
	if err := checkChunks(spans, nil); err != nil {
		t.Fatalf("no table: %v", err)
	}
	bad := map[string]func(c [][]Chunk) [][]Chunk{
		"span count":       func(c [][]Chunk) [][]Chunk { return c[:1] },
		"no chunks":        func(c [][]Chunk) [][]Chunk { c[1] = nil; return c },
		"empty chunk":      func(c [][]Chunk) [][]Chunk { c[0][0].CompressedEnd = 10; return c },
		"backwards":        func(c [][]Chunk) [][]Chunk { c[0][1].CompressedEnd = 19; return c },
		"past span":        func(c [][]Chunk) [][]Chunk { c[1][0].CompressedEnd = 41; return c },
		"short":            func(c [][]Chunk) [][]Chunk { c[0] = c[0][:1]; return c },
		"out backwards":    func(c [][]Chunk) [][]Chunk { c[0][0].UncompressedEnd = 101; return c },
		"out before span":  func(c [][]Chunk) [][]Chunk { c[1][0].UncompressedEnd = 99; return c },
		"out short of end": func(c [][]Chunk) [][]Chunk { c[1][0].UncompressedEnd = 149; return c },
		"bad digest":       func(c [][]Chunk) [][]Chunk { c[0][1].Digest = "sha256:abc"; return c },
		"not sha256": func(c [][]Chunk) [][]Chunk {
			c[0][1].Digest = digest.NewDigestFromEncoded(digest.SHA512, strings.Repeat("ab", 64))
			return c
		},
		"negative compressed": func(c [][]Chunk) [][]Chunk { c[0][0].CompressedEnd = -5; return c },
	}
	for name, f := range bad {
		if err := checkChunks(spans, f(good())); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), "span") && !strings.Contains(err.Error(), "chunk") {
			t.Errorf("%s: unclear error %v", name, err)
		}
	}
}
