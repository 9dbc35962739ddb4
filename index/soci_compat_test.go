package index_test

import (
	"encoding/json"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/soci/socitest"
)

// compatOptions is an index with everything SOCI reads (two zTOCs, a
// prefetch artifact) and a pack per zTOC.
func compatOptions(v index.Version) index.BuildOptions {
	l1, l2 := digest.FromString("layer1"), digest.FromString("layer2")
	z1, z2 := digest.FromString("ztoc1"), digest.FromString("ztoc2")
	o := index.BuildOptions{
		Version: v,
		Layers: []index.Layer{
			{LayerDigest: l1, LayerMediaType: ocispec.MediaTypeImageLayerGzip, SpanSize: 4 << 20, Ztoc: ocispec.Descriptor{Digest: z1, Size: 1000}},
			{LayerDigest: l2, LayerMediaType: ocispec.MediaTypeImageLayer, SpanSize: 4 << 20, Ztoc: ocispec.Descriptor{Digest: z2, Size: 2000}},
		},
		Prefetches: []index.Prefetch{{LayerDigest: l2, Blob: ocispec.Descriptor{Digest: digest.FromString("prefetch"), Size: 50}}},
		Packs: []index.Pack{
			{LayerDigest: l1, Ztoc: z1, Head: ocispec.Descriptor{Digest: digest.FromString("h1"), Size: 100}, Windows: ocispec.Descriptor{Digest: digest.FromString("w1"), Size: 300}},
			{LayerDigest: l2, Ztoc: z2, Head: ocispec.Descriptor{Digest: digest.FromString("h2"), Size: 90}},
		},
	}
	if v == index.V1 {
		o.Subject = &ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("image"), Size: 500}
	}
	return o
}

// TestPacksKeepSOCICompatibility checks that indexes with packs satisfy
// every rule SOCI-FORMAT.md states for SOCI's readers (as
// socitest.CheckSOCIReadable spells them), so that upstream SOCI reads
// them as if the packs were not there.
func TestPacksKeepSOCICompatibility(t *testing.T) {
	for _, v := range []index.Version{index.V1, index.V2} {
		t.Run(v.String(), func(t *testing.T) {
			o := compatOptions(v)
			b, err := index.Build(o)
			if err != nil {
				t.Fatal(err)
			}
			m := socitest.CheckSOCIReadable(t, b.Bytes, []digest.Digest{o.Layers[0].LayerDigest, o.Layers[1].LayerDigest})
			if n := len(socitest.Packs(m)); n != 3 {
				t.Fatalf("%d pack descriptors, want 3", n)
			}
			// What SOCI binds to each layer (descriptors annotated with
			// the layer, by media type) is what it would without packs.
			o.Packs = nil
			plain, err := index.Build(o)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := sociView(t, b.Bytes), sociView(t, plain.Bytes); got != want {
				t.Errorf("SOCI's view of the index changes with packs:\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// sociView renders what SOCI's runtime takes from an index: per
// descriptor bound to a layer by its annotation, the layer, media type,
// digest and size, in order.
func sociView(t *testing.T, b []byte) string {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	for _, d := range m.Layers {
		if l, ok := d.Annotations[index.AnnotationImageLayerDigest]; ok {
			fmt.Fprintf(&out, "%s %s %s %d\n", l, d.MediaType, d.Digest, d.Size)
		}
	}
	return out.String()
}

// TestSOCIReadableRejects checks that the compatibility checker fails for
// indexes SOCI would misread: a pack before a zTOC, a pack carrying SOCI's
// layer annotation, zTOCs out of image-layer order, non-canonical bytes.
func TestSOCIReadableRejects(t *testing.T) {
	good, err := index.Build(compatOptions(index.V1))
	if err != nil {
		t.Fatal(err)
	}
	order := []digest.Digest{digest.FromString("layer1"), digest.FromString("layer2")}
	edit := func(f func(ls []any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good.Bytes, &m); err != nil {
			t.Fatal(err)
		}
		f(m["layers"].([]any))
		var sorted ocispec.Manifest // re-encode in ocispec's field order
		b, _ := json.Marshal(m)
		if err := json.Unmarshal(b, &sorted); err != nil {
			t.Fatal(err)
		}
		b, _ = json.Marshal(sorted)
		return b
	}
	ann := func(ls []any, i int) map[string]any { return ls[i].(map[string]any)["annotations"].(map[string]any) }
	for name, b := range map[string][]byte{
		"pack first":      edit(func(ls []any) { ls[0], ls[3] = ls[3], ls[0] }),
		"soci annotation": edit(func(ls []any) { ann(ls, 3)[index.AnnotationImageLayerDigest] = order[0].String() }),
		"layer order":     edit(func(ls []any) { ls[0], ls[1] = ls[1], ls[0] }),
		"prefetch last":   edit(func(ls []any) { ls[2], ls[5] = ls[5], ls[2] }),
		"not canonical":   append([]byte(" "), good.Bytes...),
	} {
		if !failsCheck(t, b, order) {
			t.Errorf("%s: the compatibility check passed", name)
		}
	}
	if failsCheck(t, good.Bytes, order) {
		t.Error("the compatibility check fails a good index")
	}
}

// failsCheck runs CheckSOCIReadable on b and reports whether it failed.
func failsCheck(t *testing.T, b []byte, order []digest.Digest) bool {
	r := &recordingTB{TB: t}
	var wg sync.WaitGroup
	wg.Go(func() { socitest.CheckSOCIReadable(r, b, order) })
	wg.Wait()
	return r.failed
}

// recordingTB records failures instead of failing the test; Fatal ends
// only the goroutine running the check.
type recordingTB struct {
	testing.TB
	mu     sync.Mutex
	failed bool
}

func (r *recordingTB) Helper() {}
func (r *recordingTB) Errorf(string, ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
}
func (r *recordingTB) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}
