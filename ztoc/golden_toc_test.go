package ztoc_test

// Tests that compare SOCI's golden zTOCs with archive/tar's reading of the
// golden layer through toctest, which imports ztoc: they live in the
// external test package (export_test.go gives them the golden vectors).

import (
	"bytes"
	"crypto/sha256"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/toctest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestGoldenDecode reads SOCI-built zTOCs and checks them against Go's own
// reading of the layer: TOC entries, offsets, sizes, spans and digests.
func TestGoldenDecode(t *testing.T) {
	tgz, tarball := ztoc.GoldenLayers(t)
	wantFiles, wantUSize := toctest.FromTar(t, tarball)
	if len(wantFiles) != 461 {
		t.Fatalf("small.tar has %d entries, README says 461", len(wantFiles))
	}
	for _, g := range ztoc.Goldens {
		t.Run(g.File, func(t *testing.T) {
			z, err := ztoc.Unmarshal(ztoc.ReadGolden(t, g.File))
			if err != nil {
				t.Fatal(err)
			}
			layer, alg := tarball, ztoc.Uncompressed
			if g.Gzip {
				layer, alg = tgz, ztoc.Gzip
			}
			if z.Version != "0.9" || z.BuildToolIdentifier != ztoc.SOCIBuildToolIdentifier {
				t.Errorf("version %q, tool %q", z.Version, z.BuildToolIdentifier)
			}
			if z.Algorithm != alg {
				t.Errorf("algorithm %v, want %v", z.Algorithm, alg)
			}
			if z.CompressedArchiveSize != int64(len(layer)) || z.UncompressedArchiveSize != wantUSize {
				t.Errorf("sizes %d/%d, want %d/%d", z.CompressedArchiveSize, z.UncompressedArchiveSize, len(layer), wantUSize)
			}
			if z.NumSpans() != g.Spans || len(z.SpanDigests) != g.Spans {
				t.Errorf("%d spans, %d digests, want %d", z.NumSpans(), len(z.SpanDigests), g.Spans)
			}
			if g.Gzip {
				zi, err := ztoc.UnmarshalGzipZinfo(z.Checkpoints)
				if err != nil {
					t.Fatal(err)
				}
				if zi.SpanSize != g.SpanSize || zi.V1 {
					t.Errorf("zinfo span size %d v1 %v, want %d v2", zi.SpanSize, zi.V1, g.SpanSize)
				}
			} else {
				tz, err := ztoc.UnmarshalTarZinfo(z.Checkpoints)
				if err != nil {
					t.Fatal(err)
				}
				if tz != (ztoc.TarZinfo{SpanSize: g.SpanSize, Size: int64(len(tarball))}) {
					t.Errorf("tar zinfo %+v", tz)
				}
			}
			spans, err := z.Spans()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range spans {
				sum := sha256.Sum256(layer[s.CompressedStart:s.CompressedEnd])
				if got := digest.NewDigestFromBytes(digest.SHA256, sum[:]); got != z.SpanDigests[s.ID] {
					t.Errorf("span %d [%d,%d): digest %s, zTOC says %s", s.ID, s.CompressedStart, s.CompressedEnd, got, z.SpanDigests[s.ID])
				}
			}
			if len(z.Files) != len(wantFiles) {
				t.Fatalf("%d TOC entries, tar has %d", len(z.Files), len(wantFiles))
			}
			for i := range z.Files {
				if i > 0 && z.Files[i].UncompressedOffset <= z.Files[i-1].UncompressedOffset {
					t.Errorf("entry %d: offsets not sorted", i)
				}
				if !reflect.DeepEqual(z.Files[i], wantFiles[i]) {
					t.Errorf("entry %d:\n got %+v\nwant %+v", i, z.Files[i], wantFiles[i])
				}
			}
		})
	}
}

// TestGoldenByteExactFromTar builds the zTOC value from Go's reading of the
// tar plus the golden's compression info, so the TOC half of the bytes is
// produced without decoding it first.
func TestGoldenByteExactFromTar(t *testing.T) {
	_, tarball := ztoc.GoldenLayers(t)
	files, usize := toctest.FromTar(t, tarball)
	for _, g := range ztoc.Goldens {
		b := ztoc.ReadGolden(t, g.File)
		gz, err := ztoc.Unmarshal(b)
		if err != nil {
			t.Fatal(err)
		}
		z := &ztoc.Ztoc{
			Version:                 ztoc.Version,
			BuildToolIdentifier:     ztoc.SOCIBuildToolIdentifier,
			CompressedArchiveSize:   gz.CompressedArchiveSize,
			UncompressedArchiveSize: usize,
			Files:                   files,
			CompressionInfo:         gz.CompressionInfo,
		}
		out, err := ztoc.Marshal(z)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, b) {
			t.Errorf("%s: zTOC from tar reading differs from golden", g.File)
		}
	}
}
