package index

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

var (
	head1    = digest.FromString("head1")
	windows1 = digest.FromString("windows1")
	head2    = digest.FromString("head2")
)

// testPacks are packs of both test zTOCs; the second has no windows blob.
func testPacks() []Pack {
	return []Pack{
		{LayerDigest: layer1, Ztoc: ztoc1, Head: ocispec.Descriptor{Digest: head1, Size: 300}, Windows: ocispec.Descriptor{Digest: windows1, Size: 4000}},
		{LayerDigest: layer2, Ztoc: ztoc2, Head: ocispec.Descriptor{Digest: head2, Size: 200}},
	}
}

func packedOptions() BuildOptions {
	return BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers(), BuildTool: "AWS SOCI CLI v0.2",
		Prefetches: []Prefetch{{LayerDigest: layer1, Blob: ocispec.Descriptor{Digest: digest.FromString("prefetch"), Size: 77}}},
		Packs:      testPacks()}
}

// TestBuildPacksGolden pins the bytes of an index with packs: SOCI's
// descriptors exactly as without packs, then head and windows descriptors
// with spanpull's annotations only.
func TestBuildPacksGolden(t *testing.T) {
	b, err := Build(packedOptions())
	if err != nil {
		t.Fatal(err)
	}
	compareGolden(t, "index-v1-packs.golden.json", b.Bytes)
	plain := packedOptions()
	plain.Packs = nil
	pb, err := Build(plain)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(pb.Manifest.Layers); n != 3 || len(b.Manifest.Layers) != 6 {
		t.Fatalf("%d descriptors without packs, %d with", n, len(b.Manifest.Layers))
	}
	for i, d := range pb.Manifest.Layers {
		got, _ := json.Marshal(b.Manifest.Layers[i])
		want, _ := json.Marshal(d)
		if string(got) != string(want) {
			t.Errorf("descriptor %d changes with packs: %s, want %s", i, got, want)
		}
	}
}

func TestParsePacks(t *testing.T) {
	b, err := Build(packedOptions())
	if err != nil {
		t.Fatal(err)
	}
	ix, err := Parse(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(ix.Layers) != 2 || len(ix.Prefetches) != 1 || len(ix.Packs) != 2 || !ix.Canonical {
		t.Fatalf("%d zTOCs, %d prefetches, %d packs, canonical %v", len(ix.Layers), len(ix.Prefetches), len(ix.Packs), ix.Canonical)
	}
	head, windows, ok := ix.Pack(layer1)
	if !ok || head.Digest != head1 || head.Size != 300 || head.MediaType != MediaTypePackHead ||
		windows.Digest != windows1 || windows.Size != 4000 || windows.MediaType != MediaTypePackWindows {
		t.Fatalf("Pack(layer1) = %+v, %+v, %v", head, windows, ok)
	}
	if head, windows, ok := ix.Pack(layer2); !ok || head.Digest != head2 || windows.Digest != "" {
		t.Fatalf("Pack(layer2) = %+v, %+v, %v", head, windows, ok)
	}
	if _, _, ok := ix.Pack(digest.FromString("other")); ok {
		t.Fatal("a pack for an unindexed layer")
	}
	plain, err := Build(BuildOptions{Version: V2, Layers: testLayers()})
	if err != nil {
		t.Fatal(err)
	}
	ix, err = Parse(plain.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, ok := ix.Pack(layer1); ok || ix.Packs != nil {
		t.Fatal("an index without packs has one")
	}
}

func TestPackErrors(t *testing.T) {
	good, err := Build(packedOptions())
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(ls []any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good.Bytes, &m); err != nil {
			t.Fatal(err)
		}
		f(m["layers"].([]any))
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ann := func(ls []any, i int) map[string]any {
		return ls[i].(map[string]any)["annotations"].(map[string]any)
	}
	// layers: zTOC 1, zTOC 2, prefetch, head 1, windows 1, head 2.
	for name, tc := range map[string]struct {
		in   []byte
		want string
	}{
		"unknown ztoc":    {edit(func(ls []any) { ann(ls, 5)[AnnotationPackZtocDigest] = digest.FromString("x").String() }), "lists no such zTOC"},
		"other layer":     {edit(func(ls []any) { ann(ls, 5)[AnnotationPackLayerDigest] = layer1.String() }), "bound to layer"},
		"windows layer":   {edit(func(ls []any) { ann(ls, 4)[AnnotationPackLayerDigest] = layer2.String() }), "its head"},
		"windows first":   {edit(func(ls []any) { ls[3], ls[4] = ls[4], ls[3] }), "without a head"},
		"two windows":     {edit(func(ls []any) { ls[5] = ls[4] }), "listed twice"},
		"two heads":       {edit(func(ls []any) { ls[4] = ls[3] }), "listed twice"},
		"soci annotation": {edit(func(ls []any) { ann(ls, 3)[AnnotationImageLayerDigest] = layer1.String() }), "SOCI would take it"},
		"no ztoc annot":   {edit(func(ls []any) { delete(ann(ls, 3), AnnotationPackZtocDigest) }), "no " + AnnotationPackZtocDigest},
		"no layer annot":  {edit(func(ls []any) { delete(ann(ls, 5), AnnotationPackLayerDigest) }), "no " + AnnotationPackLayerDigest},
		"bad ztoc":        {edit(func(ls []any) { ann(ls, 3)[AnnotationPackZtocDigest] = "sha256:zz" }), AnnotationPackZtocDigest},
		"bad head size":   {edit(func(ls []any) { ls[3].(map[string]any)["size"] = 0 }), "invalid size"},
	} {
		t.Run(name, func(t *testing.T) {
			ix, err := Parse(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse = %v, %v; want error containing %q", ix, err, tc.want)
			}
		})
	}
	for name, mut := range map[string]func(ps []Pack){
		"unknown ztoc": func(ps []Pack) { ps[0].Ztoc = digest.FromString("x") },
		"other layer":  func(ps []Pack) { ps[1].LayerDigest = layer1 },
		"twice":        func(ps []Pack) { ps[1] = ps[0] },
		"no head":      func(ps []Pack) { ps[0].Head = ocispec.Descriptor{} },
		"bad windows":  func(ps []Pack) { ps[0].Windows.Size = -1 },
	} {
		opts := packedOptions()
		mut(opts.Packs)
		if _, err := Build(opts); err == nil || !strings.Contains(err.Error(), "pack") {
			t.Errorf("Build with %s: %v", name, err)
		}
	}
}
