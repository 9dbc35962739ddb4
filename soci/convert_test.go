package soci_test

import (
	"strings"
	"testing"

	"github.com/containerd/platforms"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
)

// TestConvert converts a Docker manifest list and a single Docker manifest
// into SOCI-enabled images in another repository of the same registry,
// through a proxy that records every request: the layers must be mounted,
// and only zTOCs and the `{}` config uploaded.
func TestConvert(t *testing.T) {
	shared := socitest.GzipLayer(80, 200<<10, socitest.DockerGzip)
	amd := socitest.GzipLayer(81, 300<<10, socitest.DockerGzip)
	arm := socitest.GzipLayer(82, 260<<10, socitest.DockerGzip)
	small := socitest.GzipLayer(83, 20<<10, socitest.DockerGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		a, b := socitest.PushMultiPlatform(t, reg.Addr, "src", "list", true, []socitest.Layer{shared, amd, small}, []socitest.Layer{shared, arm})
		single := socitest.PushImage(t, reg.Addr, "src", "single", "linux/amd64", true, amd)

		proxy := socitest.StartProxy(t, reg.Addr)
		host := proxy.Addr
		res := convert(t, host+"/src:list", host+"/dst:list-soci", soci.Options{Cache: newCache(t), MinLayerSize: 100000, AllPlatforms: true})
		if len(res.Platforms) != 2 || res.Image.Digest == "" {
			t.Fatalf("result %s", describe(outcome{res: res}))
		}
		if st := statuses(res); st[small.Desc.Digest] != soci.LayerSkipped || st[amd.Desc.Digest] != soci.LayerIndexed {
			t.Errorf("statuses %v", st)
		}
		want := [][]socitest.Want{
			{{Layer: shared, SpanSize: soci.DefaultSpanSize}, {Layer: amd, SpanSize: soci.DefaultSpanSize}},
			{{Layer: shared, SpanSize: soci.DefaultSpanSize}, {Layer: arm, SpanSize: soci.DefaultSpanSize}},
		}
		idx := socitest.CheckConverted(t, reg.Addr, "dst", "list-soci", []socitest.Image{a, b}, want)
		if b, _, _ := socitest.Manifest(t, reg.Addr, "dst", "list-soci"); res.Image.Size != int64(len(b)) {
			t.Errorf("result names image %+v, the tag has %d bytes", res.Image, len(b))
		}
		for i, p := range res.Platforms {
			if p.Index.Digest != idx.Manifests[2+i].Digest {
				t.Errorf("result platform %s index %s, image index has %s", platforms.Format(p.Platform), p.Index.Digest, idx.Manifests[2+i].Digest)
			}
		}
		socitest.CheckUploads(t, proxy, "dst", artifacts(res), a, b)

		// A single Docker manifest: wrapped into an index of its own.
		res = convert(t, host+"/src:single", host+"/dst2:single-soci", soci.Options{Cache: newCache(t), MinLayerSize: 100000})
		socitest.CheckConverted(t, reg.Addr, "dst2", "single-soci", []socitest.Image{single}, [][]socitest.Want{{{Layer: amd, SpanSize: soci.DefaultSpanSize}}})
		socitest.CheckUploads(t, proxy, "dst2", artifacts(res), single)

		// A re-run reuses the zTOC and pushes the same image.
		again := convert(t, host+"/src:single", host+"/dst2:single-soci", soci.Options{Cache: newCache(t), MinLayerSize: 100000})
		if st := statuses(again)[amd.Desc.Digest]; st != soci.LayerReused || again.Image.Digest != res.Image.Digest ||
			again.Platforms[0].Index.ArtifactType != index.MediaTypeIndexV2 || platforms.Format(again.Platforms[0].Platform) != "linux/amd64" {
			t.Errorf("convert re-run: layer %s, image %+v (first %+v), platforms %+v", st, again.Image, res.Image, again.Platforms)
		}

		// Converting the converted image again changes nothing: same
		// zTOCs (reused), same indexes, same rewritten manifests, and the
		// old v2 descriptors replaced rather than duplicated.
		first, _, _ := socitest.Manifest(t, reg.Addr, "dst", "list-soci")
		res = convert(t, host+"/dst:list-soci", host+"/dst:list-soci-again", soci.Options{Cache: newCache(t), MinLayerSize: 100000, AllPlatforms: true})
		for d, st := range statuses(res) {
			if st == soci.LayerIndexed {
				t.Errorf("converting the converted image rebuilt layer %s", d)
			}
		}
		if b, _, _ := socitest.Manifest(t, reg.Addr, "dst", "list-soci-again"); string(b) != string(first) {
			t.Errorf("converting the converted image gave\n%s\nwant\n%s", b, first)
		}
		for _, repo := range []string{"src", "dst", "dst2"} {
			socitest.Walk(t, reg, repo)
		}
	})
}

// TestConvertAcrossRegistries converts an image from docker-registry into
// the referrers registry: blobs are copied, and the result is complete.
func TestConvertAcrossRegistries(t *testing.T) {
	l0 := socitest.GzipLayer(95, 200<<10, socitest.OCIGzip)
	l1 := socitest.TarLayer(96, 150<<10)
	src := socitest.Registry{Name: "distribution", Addr: registrytest.StartDistribution(t)}
	dst := socitest.Registry{Name: "referrers", Addr: registrytest.StartReferrersRegistry(t), Referrers: true}
	img := socitest.PushImage(t, src.Addr, "app", "v1", "linux/arm64", false, l0, l1)
	convert(t, src.Addr+"/app:v1", dst.Addr+"/mirror/app:v1-soci", soci.Options{Cache: newCache(t), MinLayerSize: 1000})
	socitest.CheckConverted(t, dst.Addr, "mirror/app", "v1-soci", []socitest.Image{img},
		[][]socitest.Want{{{Layer: l0, SpanSize: soci.DefaultSpanSize}, {Layer: l1, SpanSize: soci.DefaultSpanSize}}})
	if got := socitest.Walk(t, dst, "mirror/app"); len(got) != 1 {
		t.Errorf("SOCI indexes in DST: %v", got)
	}
	for _, l := range []socitest.Layer{l0, l1} {
		if b := socitest.Blob(t, dst.Addr, "mirror/app", l.Desc.Digest); len(b) != len(l.Data) {
			t.Errorf("layer %s copied as %d bytes", l.Desc.Digest, len(b))
		}
	}
}

// TestConvertErrors: a destination without a tag, and a source whose
// platforms all fail (nothing indexable) must fail without pushing an
// image.
func TestConvertErrors(t *testing.T) {
	addr := registrytest.StartReferrersRegistry(t)
	small := socitest.GzipLayer(90, 10<<10, socitest.OCIGzip)
	socitest.PushImage(t, addr, "src", "v1", "linux/amd64", false, small)
	for _, dst := range []string{"/dst", "/dst@" + small.Desc.Digest.String()} {
		if out := tryConvert(t, addr+"/src:v1", addr+dst, soci.Options{Cache: newCache(t)}); out.err == nil || !strings.Contains(out.err.Error(), "tag") {
			t.Errorf("destination %s without tag: %v", dst, out.err)
		}
	}
	out := tryConvert(t, addr+"/src:v1", addr+"/dst:soci", soci.Options{Cache: newCache(t), MinLayerSize: soci.DefaultMinLayerSize})
	if out.failure() == nil || out.err != nil || len(out.res.Failed()) != 1 || out.res.Image.Digest != "" {
		t.Errorf("convert of an image with no indexable layer: %s", describe(out))
	}
	if _, _, ok := socitest.Manifest(t, addr, "dst", "soci"); ok {
		t.Error("convert pushed an image though nothing was indexed")
	}
}

// TestConvertReusesAcrossImages: converting a second image that shares a
// base layer with an image already converted into the destination reuses
// the base layer's zTOC from there, without a local cache.
func TestConvertReusesAcrossImages(t *testing.T) {
	f := newSharedBase(190, 200<<10, 100<<10, 100<<10)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		a, b := f.push(t, reg.Addr, "src")
		opts := soci.Options{MinLayerSize: 1000}
		convert(t, reg.Addr+"/src:a", reg.Addr+"/dst:a-soci", opts)
		res := convert(t, reg.Addr+"/src:b", reg.Addr+"/dst:b-soci", opts)
		if st := statuses(res); st[f.base.Desc.Digest] != soci.LayerReused || st[f.b1.Desc.Digest] != soci.LayerIndexed {
			t.Errorf("second conversion: base %s, own layer %s; want reused and indexed", st[f.base.Desc.Digest], st[f.b1.Desc.Digest])
		}
		socitest.CheckConverted(t, reg.Addr, "dst", "b-soci", []socitest.Image{b}, [][]socitest.Want{{{Layer: f.base, SpanSize: soci.DefaultSpanSize}, {Layer: f.b1, SpanSize: soci.DefaultSpanSize}}})
		socitest.CheckConverted(t, reg.Addr, "dst", "a-soci", []socitest.Image{a}, [][]socitest.Want{{{Layer: f.base, SpanSize: soci.DefaultSpanSize}, {Layer: f.a1, SpanSize: soci.DefaultSpanSize}}})
	})
}
