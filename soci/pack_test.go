package soci_test

import (
	"bytes"
	"reflect"
	"testing"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// packLayers are the layers of the pack tests: a gzip layer of several
// spans (a windows blob), a tar layer and a gzip layer of one span (heads
// only).
func packLayers() []socitest.Layer {
	return []socitest.Layer{
		socitest.GzipLayer(41, 900<<10, socitest.OCIGzip),
		socitest.TarLayer(42, 300<<10),
		socitest.GzipLayer(43, 100<<10, socitest.OCIGzip),
	}
}

const packSpanSize = 128 << 10

func packWant(layers []socitest.Layer) []socitest.Want {
	want := make([]socitest.Want, len(layers))
	for i, l := range layers {
		want[i] = socitest.Want{Layer: l, SpanSize: packSpanSize}
	}
	return want
}

// packHead fetches and decodes the pack head of a layer result.
func packHead(t *testing.T, addr, repo string, l soci.LayerResult) *ztoc.PackHead {
	t.Helper()
	if l.Pack.Head.Digest == "" || l.Pack.Ztoc != l.Ztoc.Digest || l.Pack.LayerDigest != l.Layer.Digest {
		t.Fatalf("layer %s: pack %+v", l.Layer.Digest, l.Pack)
	}
	h, err := ztoc.UnmarshalPackHead(socitest.Blob(t, addr, repo, l.Pack.Head.Digest))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestCreatePacks checks the packs Create publishes: by default one per
// zTOC, with a chunk table when the layer was streamed, reused from the
// registry or the cache on a re-run, made from the zTOC (without chunks)
// when a reused zTOC has none; and with NoPack, an index of SOCI's
// artifacts only, byte for byte what index.Build makes of the zTOCs.
func TestCreatePacks(t *testing.T) {
	layers := packLayers()
	want := packWant(layers)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "packs", "v1", "linux/amd64", false, layers...)
		subject := img.Desc
		cache := newCache(t)
		opts := soci.Options{Cache: cache, MinLayerSize: 1000, SpanSize: packSpanSize}
		res := create(t, reg.Addr+"/packs:v1", opts)
		m := socitest.CheckIndex(t, reg.Addr, "packs", res.Platforms[0].Index.Digest, index.V1, &subject, want)
		if n := len(socitest.Packs(m)); n != 4 {
			t.Errorf("%d pack blobs, want 3 heads and the windows of the first layer", n)
		}
		for i, l := range res.Platforms[0].Layers {
			if h := packHead(t, reg.Addr, "packs", l); h.Ztoc.Chunks == nil {
				t.Errorf("layer %d: a pack built with the layer has no chunk table", i)
			}
			if (l.Pack.Windows.Digest != "") != (i == 0) {
				t.Errorf("layer %d: windows blob %+v", i, l.Pack.Windows)
			}
		}

		// A re-run reuses zTOCs and packs from the registry: same index.
		again := create(t, reg.Addr+"/packs:v1", opts)
		if again.Platforms[0].Index.Digest != res.Platforms[0].Index.Digest {
			t.Errorf("re-run pushed index %s, want %s", again.Platforms[0].Index.Digest, res.Platforms[0].Index.Digest)
		}

		// NoPack, in another repository without a cache: SOCI's index.
		socitest.PushImage(t, reg.Addr, "plain", "v1", "linux/amd64", false, layers...)
		plain := create(t, reg.Addr+"/plain:v1", soci.Options{MinLayerSize: 1000, SpanSize: packSpanSize, NoPack: true})
		p := plain.Platforms[0]
		pm := socitest.CheckIndex(t, reg.Addr, "plain", p.Index.Digest, index.V1, &subject, want)
		if n := len(socitest.Packs(pm)); n != 0 {
			t.Errorf("NoPack: %d pack blobs", n)
		}
		opts2 := index.BuildOptions{Version: index.V1, Subject: &subject}
		for _, l := range p.Layers {
			if l.Pack.Head.Digest != "" {
				t.Errorf("NoPack: layer %s has pack %+v", l.Layer.Digest, l.Pack)
			}
			opts2.Layers = append(opts2.Layers, index.Layer{LayerDigest: l.Layer.Digest, LayerMediaType: l.Layer.MediaType, SpanSize: packSpanSize, Ztoc: l.Ztoc})
		}
		built, err := index.Build(opts2)
		if err != nil {
			t.Fatal(err)
		}
		if got, _, _ := socitest.Manifest(t, reg.Addr, "plain", p.Index.Digest.String()); !bytes.Equal(got, built.Bytes) {
			t.Errorf("NoPack index:\n%s\nwant SOCI's index:\n%s", got, built.Bytes)
		}

		// Packs for the zTOCs the NoPack run left in the registry: made
		// from the zTOCs, without chunk tables.
		late := create(t, reg.Addr+"/plain:v1", soci.Options{MinLayerSize: 1000, SpanSize: packSpanSize})
		socitest.CheckIndex(t, reg.Addr, "plain", late.Platforms[0].Index.Digest, index.V1, &subject, want)
		for _, l := range late.Platforms[0].Layers {
			if l.Status != soci.LayerReused {
				t.Errorf("layer %s: %s, want reused", l.Layer.Digest, l.Status)
			}
			if h := packHead(t, reg.Addr, "plain", l); h.Ztoc.Chunks != nil {
				t.Errorf("layer %s: a pack made from a reused zTOC has a chunk table", l.Layer.Digest)
			}
		}

		// The first cache, in a third repository: zTOCs and packs (with
		// their chunk tables) from the cache.
		socitest.PushImage(t, reg.Addr, "cached", "v1", "linux/amd64", false, layers...)
		cached := create(t, reg.Addr+"/cached:v1", opts)
		socitest.CheckIndex(t, reg.Addr, "cached", cached.Platforms[0].Index.Digest, index.V1, &subject, want)
		for i, l := range cached.Platforms[0].Layers {
			if !l.FromCache || !reflect.DeepEqual(l.Pack, res.Platforms[0].Layers[i].Pack) {
				t.Errorf("layer %d: from cache %v, pack %+v; want the first run's %+v", i, l.FromCache, l.Pack, res.Platforms[0].Layers[i].Pack)
			}
		}
	})
}
