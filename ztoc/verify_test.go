package ztoc

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// vfDigests returns what an image says of blob: its digest and the digest
// of its uncompressed stream (the diff_id).
func vfDigests(t testing.TB, blob []byte) LayerDigests {
	t.Helper()
	tarball := blob
	if bytes.HasPrefix(blob, gzipMagic) {
		var err error
		if tarball, err = cfBufferedGunzip(blob); err != nil {
			t.Fatal(err)
		}
	}
	return LayerDigests{Blob: digest.FromBytes(blob), DiffID: digest.FromBytes(tarball)}
}

// vfVerify runs VerifyLayer over blob with a deadline, so a hang fails.
func vfVerify(t testing.TB, blob []byte, z *Ztoc, want LayerDigests) (VerifyResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	r, err := VerifyLayer(ctx, bytes.NewReader(blob), z, want)
	if ctx.Err() != nil {
		t.Fatalf("VerifyLayer did not finish within the deadline: %v", err)
	}
	return r, err
}

// vfCheckValid verifies the zTOC of a genuine layer and checks the result.
func vfCheckValid(t *testing.T, blob []byte, z *Ztoc) {
	t.Helper()
	want := vfDigests(t, blob)
	r, err := vfVerify(t, blob, z, want)
	if err != nil {
		t.Fatalf("VerifyLayer of a genuine layer: %v", err)
	}
	if r.Blob != want.Blob || r.DiffID != want.DiffID || r.CompressedSize != int64(len(blob)) ||
		r.Entries != len(z.Files) || r.Spans != z.NumSpans() || r.UncompressedSize < z.UncompressedArchiveSize {
		t.Fatalf("result %+v, want digests %+v, %d bytes, %d entries, %d spans", r, want, len(blob), len(z.Files), z.NumSpans())
	}
}

// TestVerifyLayerValid: the zTOCs the builder makes of every form of
// layer (tar, gzip at every level, multi-member, stored, header fields,
// pigz) at several span sizes verify.
func TestVerifyLayerValid(t *testing.T) {
	var small, big []cfTar
	for _, tr := range hdTars(t) {
		switch tr.name {
		case "gotar", "edge16k", "sparse-gnu", "sparse-pax-1.0":
			small = append(small, tr)
		case "posix":
			big = append(big, tr)
		}
	}
	run := func(tars []cfTar, compressions []cfCompression, spanSizes []int64) {
		for _, tr := range tars {
			for _, c := range compressions {
				t.Run(tr.name+"/"+c.name, func(t *testing.T) {
					t.Parallel()
					blob := c.compress(t, tr.tar)
					for _, s := range spanSizes {
						z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: s})
						if err != nil {
							t.Fatal(err)
						}
						if s < int64(len(tr.tar))/2 && z.NumSpans() < 2 {
							t.Fatalf("span size %d: %d spans; the test wants several", s, z.NumSpans())
						}
						vfCheckValid(t, blob, z)
					}
				})
			}
		}
	}
	run(small, cfCompressions, []int64{16 << 10, 64 << 10})
	run(big, cfCompressionsNamed(t, "tar", "gzip-6", "gzip-multi", "pigz"), []int64{256 << 10})
}

// TestVerifyLayerGolden: SOCI's own zTOCs verify against their layer, and
// so does a zTOC whose checkpoint blob is in the v1 layout.
func TestVerifyLayerGolden(t *testing.T) {
	tgz, tarball := goldenLayers(t)
	for _, g := range goldens {
		z, blob := g.decode(t), g.layer(tgz, tarball)
		t.Run(g.File, func(t *testing.T) { vfCheckValid(t, blob, z) })
	}
	t.Run("v1-zinfo", func(t *testing.T) {
		blob := layertest.Gzip(t, tarball, gzip.DefaultCompression) // bare 10-byte gzip header
		z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: 256 << 10})
		if err != nil {
			t.Fatal(err)
		}
		z = vfForgeCheckpoints(t, z, func(zi *GzipZinfo) { zi.V1 = true })
		vfCheckValid(t, blob, z)
	})
}

// vfForgeCheckpoints returns a copy of gzip zTOC z whose checkpoint blob
// mod changed (the windows it sees are copies).
func vfForgeCheckpoints(t testing.TB, z *Ztoc, mod func(zi *GzipZinfo)) *Ztoc {
	t.Helper()
	zi, err := UnmarshalGzipZinfo(z.Checkpoints)
	if err != nil {
		t.Fatal(err)
	}
	for i := range zi.Checkpoints {
		zi.Checkpoints[i].Window = bytes.Clone(zi.Checkpoints[i].Window)
	}
	mod(zi)
	c := *z
	c.SpanDigests = slices.Clone(z.SpanDigests)
	if c.Checkpoints, err = MarshalGzipZinfo(zi); err != nil {
		t.Fatal(err)
	}
	return &c
}

// vfMismatch checks that err is a *MismatchError of part at index, naming
// field (any field when field is "").
func vfMismatch(t *testing.T, err error, part string, index int, field string) {
	t.Helper()
	var m *MismatchError
	if !errors.As(err, &m) {
		t.Fatalf("error %v is not a *MismatchError", err)
	}
	t.Logf("%v", err)
	if m.Part != part || m.Index != index || (field != "" && m.Field != field) {
		t.Fatalf("mismatch of %s %d %q, want %s %d %q", m.Part, m.Index, m.Field, part, index, field)
	}
}

// TestVerifyLayerForgeries: each forged zTOC, wrong digest and damaged
// blob fails with an error naming what is wrong.
func TestVerifyLayerForgeries(t *testing.T) {
	tarball := hdPosixTar(t)
	gz := layertest.GzipCommand(t, tarball, "-6")
	z, _, err := cfBuild(t, gz, BuildOptions{SpanSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if z.NumSpans() < 5 {
		t.Fatalf("%d spans; the test wants at least 5", z.NumSpans())
	}
	want := vfDigests(t, gz)
	vfCheckValid(t, gz, z)
	const k = 2 // the checkpoint forged

	t.Run("entries", func(t *testing.T) {
		for _, f := range forgeries {
			if !f.validates {
				continue
			}
			t.Run(f.name, func(t *testing.T) {
				forged := cloneZtoc(z)
				entry, field := f.forge(t, forged)
				_, err := vfVerify(t, gz, forged, want)
				vfMismatch(t, err, PartEntry, entry, field)
				var hm *HeaderMismatchError
				if !errors.As(err, &hm) {
					t.Errorf("error %v does not wrap a *HeaderMismatchError", err)
				}
			})
		}
	})
	checkpoints := []struct {
		name  string
		mod   func(zi *GzipZinfo)
		field string
	}{
		{"window-from-another-checkpoint", func(zi *GzipZinfo) { zi.Checkpoints[k].Window = zi.Checkpoints[k+1].Window }, "window"},
		{"window-one-byte-off", func(zi *GzipZinfo) {
			w := zi.Checkpoints[k].Window
			copy(w, append(w[1:], 'x'))
		}, "window"},
		{"bits", func(zi *GzipZinfo) { zi.Checkpoints[k].Bits = (zi.Checkpoints[k].Bits + 1) % 8 }, "bits"},
		{"in-plus-1", func(zi *GzipZinfo) { zi.Checkpoints[k].In++ }, "in"},
		{"in-minus-1", func(zi *GzipZinfo) { zi.Checkpoints[k].In-- }, "in"},
		{"out-plus-1", func(zi *GzipZinfo) { zi.Checkpoints[k].Out++ }, "out"},
		{"out-minus-1", func(zi *GzipZinfo) { zi.Checkpoints[k].Out-- }, "out"},
		{"moved-to-another-boundary", func(zi *GzipZinfo) {
			// A genuine boundary elsewhere, with the window of the
			// checkpoint: only the window gives it away.
			zi.Checkpoints[k].Window = zi.Checkpoints[k-1].Window
		}, "window"},
	}
	for _, c := range checkpoints {
		t.Run("checkpoint/"+c.name, func(t *testing.T) {
			forged := vfForgeCheckpoints(t, z, c.mod)
			if err := forged.Validate(); err != nil {
				t.Fatalf("the forged zTOC does not validate: %v", err)
			}
			_, err := vfVerify(t, gz, forged, want)
			vfMismatch(t, err, PartCheckpoint, k, c.field)
		})
	}
	// Through a pack, the windows stay in the windows blob and are decoded
	// one at a time (PackHead.AttachWindows): the genuine zTOC verifies, a
	// forged window (consistent with its pack) is caught, and a head's
	// zTOC with no windows attached is an error, not a verdict.
	t.Run("pack", func(t *testing.T) {
		_, _, windows, h := packOf(t, z)
		attached, err := h.AttachWindows(windows)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := vfVerify(t, gz, attached, want); err != nil {
			t.Fatalf("genuine zTOC with its windows attached: %v", err)
		}
		if _, err := h.AttachWindows(append([]byte{0}, windows...)); err == nil {
			t.Error("AttachWindows took a blob that is not the pack's")
		}
		var m *MismatchError
		if _, err := vfVerify(t, gz, h.Ztoc, want); err == nil || errors.As(err, &m) {
			t.Errorf("head's zTOC without windows: %v, want an error that is not a mismatch", err)
		}
		forged := vfForgeCheckpoints(t, z, func(zi *GzipZinfo) { zi.Checkpoints[k].Window = zi.Checkpoints[k+1].Window })
		_, _, fw, fh := packOf(t, forged)
		if attached, err = fh.AttachWindows(fw); err != nil {
			t.Fatal(err)
		}
		_, err = vfVerify(t, gz, attached, want)
		vfMismatch(t, err, PartCheckpoint, k, "window")
	})
	t.Run("checkpoint/added-inside-a-block", func(t *testing.T) {
		forged := vfForgeCheckpoints(t, z, func(zi *GzipZinfo) {
			a, b := zi.Checkpoints[k], zi.Checkpoints[k+1]
			fake := Checkpoint{In: (a.In + b.In) / 2, Out: (a.Out + b.Out) / 2, Window: a.Window}
			zi.Checkpoints = slices.Insert(zi.Checkpoints, k+1, fake)
		})
		forged.MaxSpanID++
		forged.SpanDigests = slices.Insert(forged.SpanDigests, k+1, forged.SpanDigests[k])
		_, err := vfVerify(t, gz, forged, want)
		vfMismatch(t, err, PartCheckpoint, k+1, "")
	})
	t.Run("checkpoint/dropped", func(t *testing.T) {
		forged := vfForgeCheckpoints(t, z, func(zi *GzipZinfo) { zi.Checkpoints = slices.Delete(zi.Checkpoints, k, k+1) })
		forged.MaxSpanID--
		forged.SpanDigests = slices.Delete(forged.SpanDigests, k, k+1)
		_, err := vfVerify(t, gz, forged, want)
		vfMismatch(t, err, PartSpanDigest, k-1, "")
	})
	vfForgeLayer(t, gz, z, want)
}

// vfForgeLayer checks the digests, sizes and damaged blobs of a gzip layer.
func vfForgeLayer(t *testing.T, gz []byte, z *Ztoc, want LayerDigests) {
	swapped := cloneZtoc(z)
	swapped.SpanDigests = slices.Clone(z.SpanDigests)
	swapped.SpanDigests[1], swapped.SpanDigests[2] = swapped.SpanDigests[2], swapped.SpanDigests[1]
	bigger := cloneZtoc(z)
	bigger.CompressedArchiveSize++
	shorter := cloneZtoc(z)
	shorter.UncompressedArchiveSize -= 512
	flipped := bytes.Clone(gz)
	flipped[len(gz)/2] ^= 0x40
	plain, _, err := cfBuild(t, hdPosixTar(t), BuildOptions{SpanSize: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		blob  []byte
		z     *Ztoc
		want  LayerDigests
		part  string
		index int
	}{
		{"span-digests-swapped", gz, swapped, want, PartSpanDigest, 1},
		{"wrong-diff-id", gz, z, LayerDigests{Blob: want.Blob, DiffID: digest.FromString("another layer")}, PartDiffID, -1},
		{"wrong-layer-digest", gz, z, LayerDigests{Blob: digest.FromString("another layer"), DiffID: want.DiffID}, PartLayerDigest, -1},
		{"corrupted-blob", flipped, z, want, PartLayerDigest, -1},
		{"truncated-blob", gz[:len(gz)-100], z, want, PartLayerDigest, -1},
		{"blob-of-another-layer", layertest.GzipCommand(t, hdPosixTar(t)[:len(gz)], "-1"), z, want, PartLayerDigest, -1},
		{"compressed-size", gz, bigger, want, PartLayerSize, -1},
		{"archive-size", gz, shorter, want, PartArchiveSize, -1},
		{"compression", gz, plain, want, PartCompression, -1},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.z.Validate(); err != nil {
				t.Fatalf("the forged zTOC does not validate: %v", err)
			}
			r, err := vfVerify(t, c.blob, c.z, c.want)
			vfMismatch(t, err, c.part, c.index, "")
			if c.part == PartLayerDigest && r.Blob != digest.FromBytes(c.blob) {
				t.Errorf("result names blob digest %s, the blob has %s", r.Blob, digest.FromBytes(c.blob))
			}
		})
	}
}

// TestVerifyTarLayerForgeries: the same checks on an uncompressed layer.
func TestVerifyTarLayerForgeries(t *testing.T) {
	tarball := hdPosixTar(t)
	z, _, err := cfBuild(t, tarball, BuildOptions{SpanSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	want := vfDigests(t, tarball)
	swapped := cloneZtoc(z)
	swapped.SpanDigests = slices.Clone(z.SpanDigests)
	swapped.SpanDigests[0], swapped.SpanDigests[3] = swapped.SpanDigests[3], swapped.SpanDigests[0]
	_, err = vfVerify(t, tarball, swapped, want)
	vfMismatch(t, err, PartSpanDigest, 0, "")
	forged := cloneZtoc(z)
	entry, field := forgeries[0].forge(t, forged)
	_, err = vfVerify(t, tarball, forged, want)
	vfMismatch(t, err, PartEntry, entry, field)
	gz := layertest.GzipCommand(t, tarball, "-6")
	_, err = vfVerify(t, gz, z, vfDigests(t, gz))
	vfMismatch(t, err, PartCompression, -1, "")
}

// TestVerifyLayerReadError: an I/O error is returned as such, at once.
func TestVerifyLayerReadError(t *testing.T) {
	tarball := cfSmallTar(t)
	gz := layertest.Gzip(t, tarball, gzip.DefaultCompression)
	z, _, err := cfBuild(t, gz, BuildOptions{SpanSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("disk on fire")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r := readerFunc(func(p []byte) (int, error) { return 0, boom })
	_, err = VerifyLayer(ctx, r, z, vfDigests(t, gz))
	var m *MismatchError
	if !errors.Is(err, boom) || errors.As(err, &m) {
		t.Errorf("error %v, want the read error", err)
	}
	if _, err := VerifyLayer(ctx, bytes.NewReader(gz), z, LayerDigests{Blob: "sha256:nothex"}); err == nil || errors.As(err, &m) {
		t.Errorf("bad layer digest: %v", err)
	}
}

type readerFunc func(p []byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// TestVerifyDebianLayer verifies the zTOC of a real Debian layer, checks
// every entry's header on its own (per-file binding) and reports what
// that check costs: the header bytes read per file, and how often they
// lie in another span than the file's first byte.
func TestVerifyDebianLayer(t *testing.T) {
	t.Parallel()
	blob, err := os.ReadFile(layertest.DebianLayer(t))
	if err != nil {
		t.Fatal(err)
	}
	z, _, err := cfBuild(t, blob, BuildOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vfCheckValid(t, blob, z) // BenchmarkVerifyLayer measures its speed
	stream := cfUncompressed(t, blob)
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	var sizes []int64
	var total, otherSpan int64
	for i := range z.Files {
		s, e, err := HeaderRange(z, i)
		if err != nil {
			t.Fatal(err)
		}
		if err := CheckHeader(stream[s:e], &z.Files[i]); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if z.Files[i].Type != TypeReg {
			continue
		}
		sizes = append(sizes, e-s)
		total += e - s
		a, _ := SpanForOffset(spans, s)
		b, _ := SpanForOffset(spans, e)
		if a != b {
			otherSpan++
		}
	}
	// The measured attack: ./etc/debian_version mapped to offset 30209
	// of the same layer (another file's bytes).
	j := hdIndex(t, z, "./etc/debian_version")
	forged := cloneZtoc(z)
	forged.Files[j].UncompressedOffset = 30209
	if i, err := hdFirstFailure(forged, stream); i != j {
		t.Errorf("forged ./etc/debian_version: first failure at entry %d (%v), want %d", i, err, j)
	}
	sort.Slice(sizes, func(i, j int) bool { return sizes[i] < sizes[j] })
	n := int64(len(sizes))
	hist := map[int64]int{}
	for _, s := range sizes {
		hist[s]++
	}
	var top []string
	for _, s := range []int64{512, 1024, 1536, 2048} {
		top = append(top, fmt.Sprintf("%d B: %d", s, hist[s]))
	}
	t.Logf("%d entries, %d regular files: header bytes per file mean %.0f, median %d, max %d (%s); %d files' headers start in an earlier span than their data",
		len(z.Files), n, float64(total)/float64(n), sizes[n/2], sizes[n-1], strings.Join(top, ", "), otherSpan)
}

// BenchmarkVerifyLayer measures a whole-layer verification from memory,
// to compare with BenchmarkBuild (SetBytes: compressed bytes).
func BenchmarkVerifyLayer(b *testing.B) {
	data := benchLayer(b)
	z, _, err := Build(context.Background(), bytes.NewReader(data), BuildOptions{})
	if err != nil {
		b.Fatal(err)
	}
	want := vfDigests(b, data)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := VerifyLayer(context.Background(), bytes.NewReader(data), z, want); err != nil {
			b.Fatal(err)
		}
	}
}
