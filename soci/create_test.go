package soci_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/store"
)

// TestCreateLayerKinds indexes an image of six layers: three gzip or tar
// layers above the minimum layer size are indexed (the tar one with
// fixed-size spans), two small ones and a zstd one are skipped with a
// reason. The pushed SOCI index is checked byte for byte and found as a
// referrer, and the observer is told about every layer once.
func TestCreateLayerKinds(t *testing.T) {
	const spanSize = 128 << 10
	layers := socitest.LayerKinds()
	indexed := []socitest.Want{{Layer: layers[0], SpanSize: spanSize}, {Layer: layers[3], SpanSize: spanSize}, {Layer: layers[5], SpanSize: spanSize}}
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "kinds", "v1", "linux/amd64", false, layers...)
		obs := newRecorder()
		res := create(t, reg.Addr+"/kinds:v1", soci.Options{Cache: newCache(t), MinLayerSize: 200000, SpanSize: spanSize, Observer: obs})
		for _, i := range []int{0, 3, 5} {
			if l := layerResult(t, res, layers[i].Desc.Digest); l.Status != soci.LayerIndexed {
				t.Errorf("layer %d: %+v, want indexed", i, l)
			}
		}
		for _, i := range []int{1, 4} {
			if l := layerResult(t, res, layers[i].Desc.Digest); l.Status != soci.LayerSkipped || !errors.Is(l.Reason, soci.ErrLayerTooSmall) {
				t.Errorf("layer %d: want skipped for the minimum layer size, got %+v", i, l)
			}
		}
		var unsupported *soci.UnsupportedLayerError
		if l := layerResult(t, res, layers[2].Desc.Digest); l.Status != soci.LayerSkipped || !errors.As(l.Reason, &unsupported) || !strings.Contains(l.Reason.Error(), "zstd") {
			t.Errorf("zstd layer: want skipped with a reason naming zstd, got %+v", l)
		}
		if len(res.Platforms) != 1 {
			t.Fatalf("want one platform, got %+v", res.Platforms)
		}
		p := res.Platforms[0]
		if p.Index.ArtifactType != index.MediaTypeIndexV1 || platforms.Format(p.Platform) != "linux/amd64" || p.Manifest.Digest != img.Desc.Digest ||
			withZtoc(p) != 3 || len(p.Layers) != 6 {
			t.Errorf("platform %+v", p)
		}
		idx := p.Index.Digest
		obs.check(t, res)

		refs := socitest.SociReferrers(t, reg, "kinds", img.Desc.Digest)
		if len(refs) != 1 || refs[0].Digest != idx || refs[0].MediaType != ocispec.MediaTypeImageManifest {
			t.Errorf("SOCI referrers of the image: %+v, want index %s", refs, idx)
		}
		subject := img.Desc
		socitest.CheckIndex(t, reg.Addr, "kinds", idx, index.V1, &subject, indexed)
		if got := socitest.Walk(t, reg, "kinds"); len(got) != 1 || got[0] != idx {
			t.Errorf("SOCI indexes in the repository: %v, want [%s]", got, idx)
		}
	})
}

// TestCreateDefaults runs Create with the default minimum layer size (10
// MiB) and span size, and a re-run that reuses both layers' zTOCs.
func TestCreateDefaults(t *testing.T) {
	big := socitest.GzipLayer(10, 11<<20+300<<10, socitest.OCIGzip)
	small := socitest.GzipLayer(11, 2<<20, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "defaults", "latest", "linux/amd64", false, small, big)
		cache := newCache(t)
		opts := soci.Options{Cache: cache, MinLayerSize: soci.DefaultMinLayerSize}
		res := create(t, reg.Addr+"/defaults", opts)
		if len(res.Platforms) != 1 {
			t.Fatalf("result %+v", res)
		}
		p := res.Platforms[0]
		if platforms.Format(p.Platform) != "linux/amd64" || p.Manifest.Digest != img.Desc.Digest || p.Err != nil || p.Index.Digest.Validate() != nil || len(p.Layers) != 2 {
			t.Fatalf("platform result %+v", p)
		}
		l0, l1 := p.Layers[0], p.Layers[1]
		if l0.Layer.Digest != small.Desc.Digest || l0.Status != soci.LayerSkipped || !errors.Is(l0.Reason, soci.ErrLayerTooSmall) || l0.Ztoc.Digest != "" {
			t.Errorf("small layer: %+v", l0)
		}
		if l1.Layer.Digest != big.Desc.Digest || l1.Status != soci.LayerIndexed || l1.Ztoc.Digest.Validate() != nil || l1.Ztoc.Size <= 0 || l1.Spans != 11 || // 11.3 MiB at 1 MiB spans
			l1.Layer.Size != big.Desc.Size || l1.Layer.MediaType != socitest.OCIGzip || l1.Duration <= 0 {
			t.Errorf("big layer: %+v", l1)
		}
		subject := img.Desc
		m := socitest.CheckIndex(t, reg.Addr, "defaults", p.Index.Digest, index.V1, &subject, []socitest.Want{{Layer: big, SpanSize: soci.DefaultSpanSize}})
		if m.Layers[0].Digest != l1.Ztoc.Digest || m.Layers[0].Size != l1.Ztoc.Size {
			t.Errorf("result names zTOC %s (%d bytes), index has %+v", l1.Ztoc.Digest, l1.Ztoc.Size, m.Layers[0])
		}
		if m.Annotations[index.AnnotationBuildToolIdentifier] == "" {
			t.Errorf("index has no build tool annotation: %v", m.Annotations)
		}

		// A re-run reuses the zTOC and pushes the same index.
		again := create(t, reg.Addr+"/defaults:latest", opts)
		if again.Platforms[0].Index.Digest != p.Index.Digest || statuses(again)[big.Desc.Digest] != soci.LayerReused {
			t.Errorf("re-run: index %s, big layer %s; want %s and reused", again.Platforms[0].Index.Digest, statuses(again)[big.Desc.Digest], p.Index.Digest)
		}
		if _, err := soci.Create(context.Background(), repo(t, reg.Addr+"/defaults"), soci.Options{SpanSize: -1}); err == nil {
			t.Error("negative span size: no error")
		}
	})
}

// TestCreateReuse checks that nothing is rebuilt when the registry or the
// local cache already has a layer's zTOC, that Force rebuilds, and that a
// base layer shared by two images of a repository is indexed once.
func TestCreateReuse(t *testing.T) {
	f := newSharedBase(20, 300<<10, 200<<10, 250<<10)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		imgA, imgB := f.push(t, reg.Addr, "app")
		r := &reuseRun{t: t, reg: reg, cache: newCache(t), proxy: socitest.StartProxy(t, reg.Addr), layers: []socitest.Layer{f.base, f.a1, f.b1}}
		idx := r.rerunImageA(f.base, f.a1)

		// Image b shares the base layer: indexed once, reused now.
		second := r.create("b", soci.Options{Cache: r.cache})
		r.want(second, "image b", map[digest.Digest]soci.LayerStatus{f.base.Desc.Digest: soci.LayerReused, f.b1.Desc.Digest: soci.LayerIndexed})
		subject := imgB.Desc
		socitest.CheckIndex(t, reg.Addr, "app", second.Platforms[0].Index.Digest, index.V1, &subject,
			[]socitest.Want{{Layer: f.base, SpanSize: soci.DefaultSpanSize}, {Layer: f.b1, SpanSize: soci.DefaultSpanSize}})

		// Re-runs push the same index: the image has one SOCI index.
		if refs := socitest.SociReferrers(t, reg, "app", imgA.Desc.Digest); len(refs) != 1 || refs[0].Digest != idx {
			t.Errorf("after re-runs image a has SOCI referrers %+v, want only %s", refs, idx)
		}
		if refs := socitest.SociReferrers(t, reg, "app", imgB.Desc.Digest); len(refs) != 1 {
			t.Errorf("image b has SOCI referrers %+v, want one", refs)
		}
		if got := socitest.Walk(t, reg, "app"); len(got) != 2 {
			t.Errorf("SOCI indexes in the repository: %v, want 2", got)
		}
	})
}

// reuseRun is TestCreateReuse's repository "app", reached through a
// recording proxy, and its local cache.
type reuseRun struct {
	t      *testing.T
	reg    socitest.Registry
	cache  *store.ZtocCache
	proxy  *socitest.Proxy
	layers []socitest.Layer
}

func (r *reuseRun) create(tag string, opts soci.Options) *soci.Result {
	r.t.Helper()
	opts.MinLayerSize = 1000
	return create(r.t, r.proxy.Addr+"/app:"+tag, opts)
}

// layerGETs counts the layer downloads so far.
func (r *reuseRun) layerGETs() int {
	n := 0
	for _, q := range r.proxy.Requests() {
		for _, l := range r.layers {
			if strings.HasPrefix(q, "GET /v2/app/blobs/"+l.Desc.Digest.String()) {
				n++
			}
		}
	}
	return n
}

func (r *reuseRun) want(res *soci.Result, what string, st map[digest.Digest]soci.LayerStatus) {
	r.t.Helper()
	got := statuses(res)
	for d, s := range st {
		if got[d] != s {
			r.t.Errorf("%s: layer %s is %q, want %q", what, d, got[d], s)
		}
	}
}

// rerunImageA indexes image a (layers base and a1), then again and again:
// from the cache, the registry, a fresh cache, and with Force. It returns
// the index of image a.
func (r *reuseRun) rerunImageA(base, a1 socitest.Layer) digest.Digest {
	t := r.t
	both := func(st soci.LayerStatus) map[digest.Digest]soci.LayerStatus {
		return map[digest.Digest]soci.LayerStatus{base.Desc.Digest: st, a1.Desc.Digest: st}
	}
	first := r.create("a", soci.Options{Cache: r.cache})
	r.want(first, "first create", both(soci.LayerIndexed))
	idx := first.Platforms[0].Index.Digest
	gets := r.layerGETs()
	if gets != 2 {
		t.Errorf("first create downloaded layers %d times, want 2", gets)
	}
	again := r.create("a", soci.Options{Cache: r.cache})
	r.want(again, "second create", both(soci.LayerReused))
	if again.Platforms[0].Index.Digest != idx {
		t.Errorf("second create pushed index %s, first %s", again.Platforms[0].Index.Digest, idx)
	}
	// Straight to the registry: only reused layers.
	third := create(t, r.reg.Addr+"/app:a", soci.Options{Cache: r.cache, MinLayerSize: 1000})
	for d, st := range statuses(third) {
		if st != soci.LayerReused {
			t.Errorf("third create: layer %s is %s, want only reused layers", d, st)
		}
	}
	// Without the local cache the zTOCs must come from the registry.
	noCache := r.create("a", soci.Options{})
	r.want(noCache, "no cache", both(soci.LayerReused))
	for _, l := range noCache.Platforms[0].Layers {
		if l.FromCache {
			t.Errorf("no cache: layer %s reused from the cache, want the registry", l.Layer.Digest)
		}
	}
	// An empty cache in a fresh directory: same.
	r.want(r.create("a", soci.Options{Cache: newCache(t)}), "fresh cache", both(soci.LayerReused))
	if n := r.layerGETs(); n != gets {
		t.Errorf("re-runs downloaded layers %d times; a reused layer must not be read", n-gets)
	}
	forced := r.create("a", soci.Options{Cache: r.cache, Force: true})
	r.want(forced, "force", both(soci.LayerIndexed))
	for i, l := range forced.Platforms[0].Layers {
		if l.Ztoc.Digest != first.Platforms[0].Layers[i].Ztoc.Digest {
			t.Errorf("Force rebuilt layer %s into zTOC %s, first build %s (not deterministic)", l.Layer.Digest, l.Ztoc.Digest, first.Platforms[0].Layers[i].Ztoc.Digest)
		}
	}
	return idx
}

// TestCreateSharedLayerNoCache: without a local cache, a layer indexed for
// one image of a repository is reused from the registry for another image,
// found through the other image's SOCI index (a referrer: fallback tag or
// referrers API).
func TestCreateSharedLayerNoCache(t *testing.T) {
	f := newSharedBase(30, 300<<10, 100<<10, 100<<10)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		_, imgB := f.push(t, reg.Addr, "shared")
		opts := soci.Options{MinLayerSize: 1000}
		create(t, reg.Addr+"/shared:a", opts)
		res := create(t, reg.Addr+"/shared:b", opts)
		st := statuses(res)
		if st[f.b1.Desc.Digest] != soci.LayerIndexed {
			t.Errorf("second image: own layer %s, want indexed", st[f.b1.Desc.Digest])
		}
		if st[f.base.Desc.Digest] != soci.LayerReused {
			t.Errorf("second image without cache: base layer %s, want reused (from image a's index)", st[f.base.Desc.Digest])
		}
		subject := imgB.Desc
		socitest.CheckIndex(t, reg.Addr, "shared", res.Platforms[0].Index.Digest, index.V1, &subject,
			[]socitest.Want{{Layer: f.base, SpanSize: soci.DefaultSpanSize}, {Layer: f.b1, SpanSize: soci.DefaultSpanSize}})
	})
}

// TestCreatePlatforms indexes a two-platform image index: the default
// platform only, one requested platform, all platforms, and a platform
// that matches nothing.
func TestCreatePlatforms(t *testing.T) {
	shared := socitest.GzipLayer(40, 150<<10, socitest.OCIGzip)
	amd := socitest.GzipLayer(41, 200<<10, socitest.OCIGzip)
	arm := socitest.GzipLayer(42, 220<<10, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		p := &platformsRun{t: t, reg: reg, shared: shared, amd: amd, arm: arm}
		p.defaultPlatform()
		p.onePlatform()
		p.allPlatforms()

		p.push("none")
		out := p.create("none", soci.Options{Platforms: []ocispec.Platform{mustPlatform(t, "linux/s390x")}})
		if out.err == nil || !strings.Contains(out.err.Error(), "linux/s390x") || !strings.Contains(out.err.Error(), "no image manifest") {
			t.Errorf("linux/s390x: err %v, want an error naming the platform", out.err)
		}
		if got := socitest.Walk(t, reg, "none"); len(got) != 0 {
			t.Errorf("failed create left SOCI indexes %v", got)
		}
	})
}

// platformsRun is TestCreatePlatforms on one registry: each case pushes the
// two-platform image to a repository of its own.
type platformsRun struct {
	t                *testing.T
	reg              socitest.Registry
	shared, amd, arm socitest.Layer
}

func (p *platformsRun) push(repo string) (socitest.Image, socitest.Image) {
	return socitest.PushMultiPlatform(p.t, p.reg.Addr, repo, "multi", false, []socitest.Layer{p.shared, p.amd}, []socitest.Layer{p.shared, p.arm})
}

func (p *platformsRun) create(repo string, opts soci.Options) outcome {
	opts.MinLayerSize, opts.Cache = 1000, newCache(p.t)
	return tryCreate(p.t, p.reg.Addr+"/"+repo+":multi", opts)
}

// count returns how many SOCI indexes images a and b have.
func (p *platformsRun) count(repo string, a, b socitest.Image) (int, int) {
	return len(socitest.SociReferrers(p.t, p.reg, repo, a.Desc.Digest)), len(socitest.SociReferrers(p.t, p.reg, repo, b.Desc.Digest))
}

// indexedFor lists the platforms that got an index.
func indexedFor(res *soci.Result) []string {
	var out []string
	for _, p := range res.Platforms {
		if p.Index.Digest != "" {
			out = append(out, platforms.Format(p.Platform))
		}
	}
	return out
}

// defaultPlatform: without a requested platform, this machine's is indexed.
func (p *platformsRun) defaultPlatform() {
	t := p.t
	a, b := p.push("default")
	out := p.create("default", soci.Options{})
	if out.err != nil {
		t.Fatal(out.err)
	}
	got := indexedFor(out.res)
	na, nb := p.count("default", a, b)
	switch socitest.DefaultPlatform() {
	case "linux/amd64":
		if len(got) != 1 || got[0] != "linux/amd64" || na != 1 || nb != 0 {
			t.Errorf("default platform: indexes for %q, referrers amd64 %d arm64 %d; want amd64 only", got, na, nb)
		}
		if statuses(out.res)[p.arm.Desc.Digest] == soci.LayerIndexed {
			t.Errorf("default platform indexed the arm64 layer")
		}
		subject := a.Desc
		subject.Platform = nil
		socitest.CheckIndex(t, p.reg.Addr, "default", out.res.Platforms[0].Index.Digest, index.V1, &subject,
			[]socitest.Want{{Layer: p.shared, SpanSize: soci.DefaultSpanSize}, {Layer: p.amd, SpanSize: soci.DefaultSpanSize}})
	case "linux/arm64":
		if len(got) != 1 || got[0] != "linux/arm64" || na != 0 || nb != 1 {
			t.Errorf("default platform: indexes for %q, referrers amd64 %d arm64 %d; want arm64 only", got, na, nb)
		}
	default:
		if out.err == nil {
			t.Errorf("default platform %s is not in the image, but create succeeded", socitest.DefaultPlatform())
		}
	}
}

// onePlatform: a requested platform only.
func (p *platformsRun) onePlatform() {
	t := p.t
	a, b := p.push("arm")
	out := p.create("arm", soci.Options{Platforms: []ocispec.Platform{mustPlatform(t, "linux/arm64")}})
	if err := out.failure(); err != nil {
		t.Fatal(err)
	}
	got := indexedFor(out.res)
	if na, nb := p.count("arm", a, b); len(got) != 1 || got[0] != "linux/arm64" || na != 0 || nb != 1 {
		t.Errorf("linux/arm64: indexes for %q, referrers amd64 %d arm64 %d", got, na, nb)
		return
	}
	subject := b.Desc
	subject.Platform = nil
	socitest.CheckIndex(t, p.reg.Addr, "arm", out.res.Platforms[0].Index.Digest, index.V1, &subject,
		[]socitest.Want{{Layer: p.shared, SpanSize: soci.DefaultSpanSize}, {Layer: p.arm, SpanSize: soci.DefaultSpanSize}})
}

// allPlatforms: every platform, the shared layer built once.
func (p *platformsRun) allPlatforms() {
	t := p.t
	a, b := p.push("all")
	all := create(t, p.reg.Addr+"/all:multi", soci.Options{MinLayerSize: 1000, Cache: newCache(t), AllPlatforms: true})
	if len(all.Platforms) != 2 || platforms.Format(all.Platforms[0].Platform) != "linux/amd64" || platforms.Format(all.Platforms[1].Platform) != "linux/arm64" {
		t.Fatalf("all platforms: %+v", all.Platforms)
	}
	if na, nb := p.count("all", a, b); na != 1 || nb != 1 {
		t.Errorf("all platforms: referrers amd64 %d arm64 %d, want 1 and 1", na, nb)
	}
	if z0, z1 := all.Platforms[0].Layers[0].Ztoc.Digest, all.Platforms[1].Layers[0].Ztoc.Digest; z0 != z1 || z0 == "" {
		t.Errorf("shared layer zTOCs %s and %s", z0, z1)
	}
	if got := socitest.Walk(t, p.reg, "all"); len(got) != 2 {
		t.Errorf("SOCI indexes: %v, want 2", got)
	}
}

// TestCreateSingleManifestPlatform: a requested platform must match the
// config of a single-manifest image.
func TestCreateSingleManifestPlatform(t *testing.T) {
	l := socitest.GzipLayer(50, 100<<10, socitest.OCIGzip)
	reg := socitest.Registry{Addr: registrytest.StartReferrersRegistry(t), Referrers: true}
	socitest.PushImage(t, reg.Addr, "single", "v1", "linux/arm64", false, l)
	out := tryCreate(t, reg.Addr+"/single:v1", soci.Options{Cache: newCache(t), Platforms: []ocispec.Platform{mustPlatform(t, "linux/amd64")}})
	if out.err == nil || !strings.Contains(out.err.Error(), "linux/arm64") {
		t.Errorf("single arm64 image, linux/amd64 requested: err %v", out.err)
	}
	res := create(t, reg.Addr+"/single:v1", soci.Options{Cache: newCache(t)})
	if len(res.Platforms) != 1 || res.Platforms[0].Index.Digest == "" || platforms.Format(res.Platforms[0].Platform) != "linux/arm64" {
		t.Errorf("single arm64 image, no platform requested: %+v", res.Platforms)
	}
}

// TestCreateFaults runs Create through registrytest's fault proxy in front
// of docker-registry: transient failures are retried, persistent ones and
// a registry that stops answering fail in bounded time with a clear
// error, and a failed create leaves no SOCI index pointing at missing
// blobs. Each case runs in parallel with the others (most of them wait on
// retry backoff), on an image in a repository of its own.
func TestCreateFaults(t *testing.T) {
	f := newFaults(t)
	for _, c := range []struct {
		name   string
		faults func(f *faults) registrytest.Faults
		check  func(t *testing.T, r *faultRun)
	}{
		{"transient 5xx", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: registrytest.MatchBlobGET, Status: http.StatusServiceUnavailable, StatusCount: 3}
		}, func(t *testing.T, r *faultRun) {
			r.succeeds()
			if c := r.proxy.CountRequests("503 (injected)"); c != 3 {
				t.Errorf("%d injected 503s, want 3", c)
			}
		}},
		{"transient 5xx on push", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: func(r *http.Request) bool { return r.Method != http.MethodGet && r.Method != http.MethodHead }, Status: http.StatusBadGateway, StatusCount: 3}
		}, func(t *testing.T, r *faultRun) { r.succeeds() }},
		{"reset mid-layer", func(f *faults) registrytest.Faults {
			return registrytest.Faults{Match: layerGET(f.layers[1].Desc.Digest), ResetAfter: 100 << 10, ResetCount: 2}
		}, func(t *testing.T, r *faultRun) {
			r.succeeds()
			if c := r.proxy.CountRequests("reset after"); c != 2 {
				t.Errorf("%d resets, want 2", c)
			}
			if c := r.proxy.CountRequests(f.layers[1].Desc.Digest.String() + " [bytes="); c == 0 {
				t.Errorf("the broken download was not resumed with a Range request:\n%s", strings.Join(r.proxy.Requests(), "\n"))
			}
		}},
		{"dropped connections", func(*faults) registrytest.Faults { return registrytest.Faults{DropCount: 4} },
			func(t *testing.T, r *faultRun) { r.succeeds() }},
		{"persistent 5xx on a layer", func(f *faults) registrytest.Faults {
			return registrytest.Faults{Match: layerGET(f.layers[1].Desc.Digest), Status: http.StatusInternalServerError, StatusCount: -1}
		}, func(t *testing.T, r *faultRun) {
			r.fails(r.create(context.Background()), f.layers[1].Desc.Digest.String(), "500")
		}},
		{"persistent 5xx on uploads", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/blobs/uploads/") }, Status: http.StatusServiceUnavailable, StatusCount: -1}
		}, func(t *testing.T, r *faultRun) { r.fails(r.create(context.Background()), "503") }},
		{"index manifest push fails", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: func(r *http.Request) bool {
				return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/")
			}, Status: http.StatusInternalServerError, StatusCount: -1}
		}, func(t *testing.T, r *faultRun) { r.fails(r.create(context.Background()), "500") }},
		{"fallback tag update fails", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: func(r *http.Request) bool {
				return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/sha256-")
			}, Status: http.StatusInternalServerError, StatusCount: -1}
		}, func(t *testing.T, r *faultRun) {
			if out := r.create(context.Background()); out.failure() == nil {
				t.Errorf("create succeeded though the index could not be made discoverable: %s", describe(out))
			}
			r.proxy.Set(registrytest.Faults{})
			socitest.Walk(t, f.reg, r.repo) // no dangling pointers, whatever was pushed
		}},
		{"registry stops answering", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 64 << 10, ResetCount: -1, StallReset: true}
		}, func(t *testing.T, r *faultRun) { r.failsWithin(10*time.Second, 20*time.Second) }},
		{"registry stops answering before headers", func(*faults) registrytest.Faults {
			return registrytest.Faults{Match: registrytest.MatchBlobGET, Latency: 5 * time.Minute}
		}, func(t *testing.T, r *faultRun) { r.failsWithin(5*time.Second, 15*time.Second) }},
		{"corrupt layer body", func(f *faults) registrytest.Faults {
			return registrytest.Faults{Match: layerGET(f.layers[0].Desc.Digest), Corrupt: true}
		}, func(t *testing.T, r *faultRun) {
			r.fails(r.create(context.Background()), f.layers[0].Desc.Digest.String())
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := f.setup(t)
			r.proxy.Set(c.faults(f))
			c.check(t, r)
		})
	}
}

// faults is TestCreateFaults' image and upstream docker-registry.
type faults struct {
	layers []socitest.Layer
	want   []socitest.Want
	reg    socitest.Registry
	mu     sync.Mutex
	n      int
}

func newFaults(t *testing.T) *faults {
	f := &faults{layers: []socitest.Layer{
		socitest.GzipLayer(110, 300<<10, socitest.OCIGzip),
		socitest.GzipLayer(111, 350<<10, socitest.OCIGzip),
		socitest.TarLayer(112, 250<<10),
	}}
	for _, l := range f.layers {
		f.want = append(f.want, socitest.Want{Layer: l, SpanSize: soci.DefaultSpanSize})
	}
	f.reg = socitest.Registry{Name: "distribution", Addr: registrytest.StartDistribution(t)}
	return f
}

// faultRun is one case of TestCreateFaults: the image in a repository of
// its own, behind a fault proxy of its own.
type faultRun struct {
	t     *testing.T
	f     *faults
	img   socitest.Image
	repo  string
	proxy *registrytest.FaultProxy
}

// setup pushes the image and starts the proxy for a parallel subtest.
func (f *faults) setup(t *testing.T) *faultRun {
	f.mu.Lock()
	f.n++
	repo := fmt.Sprintf("faults%d", f.n)
	f.mu.Unlock()
	r := &faultRun{t: t, f: f, repo: repo}
	r.img = socitest.PushImage(t, f.reg.Addr, repo, "v1", "linux/amd64", false, f.layers...)
	r.proxy = registrytest.StartFaultProxy(t, f.reg.Addr)
	t.Parallel()
	return r
}

func layerGET(d digest.Digest) func(*http.Request) bool {
	return func(r *http.Request) bool {
		return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d.String())
	}
}

func (r *faultRun) create(ctx context.Context) outcome {
	return runCreate(ctx, r.t, r.proxy.Addr+"/"+r.repo+":v1", soci.Options{MinLayerSize: 1000})
}

// succeeds checks a create that must succeed despite the faults.
func (r *faultRun) succeeds() {
	t := r.t
	t.Helper()
	out := r.create(context.Background())
	if err := out.failure(); err != nil {
		t.Fatalf("create failed: %v\nproxy saw:\n%s", err, strings.Join(r.proxy.Requests(), "\n"))
	}
	idx := out.res.Platforms[0].Index.Digest
	if idx == "" {
		t.Fatalf("no index: %+v", out.res.Platforms)
	}
	subject := r.img.Desc
	socitest.CheckIndex(t, r.f.reg.Addr, r.repo, idx, index.V1, &subject, r.f.want)
}

// fails checks a failed create: an error within bounds that contains every
// string of msg, and nothing half-pushed.
func (r *faultRun) fails(out outcome, msg ...string) {
	t := r.t
	t.Helper()
	err := out.failure()
	if err == nil {
		t.Fatalf("create succeeded: %s", describe(out))
	}
	if out.elapsed > 60*time.Second {
		t.Errorf("create took %s to fail", out.elapsed)
	}
	for _, s := range msg {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
	r.proxy.Set(registrytest.Faults{})
	if got := socitest.Walk(t, r.f.reg, r.repo); len(got) != 0 {
		t.Errorf("failed create left SOCI indexes %v", got)
	}
}

// failsWithin checks a create bounded by deadline: it must fail, and
// return within bound.
func (r *faultRun) failsWithin(deadline, bound time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	out := r.create(ctx)
	r.fails(out)
	if out.elapsed > bound {
		r.t.Errorf("create ran %s past its %s deadline", out.elapsed, deadline)
	}
}

// TestCreateCorruptLayerData flips a byte inside a file's data of an
// uncompressed tar layer on its way from the registry: the tar still
// parses, so only the digest check can catch it.
func TestCreateCorruptLayerData(t *testing.T) {
	l := socitest.TarLayer(120, 300<<10)
	g := socitest.GzipLayer(121, 300<<10, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		socitest.PushImage(t, reg.Addr, "corrupt", "v1", "linux/amd64", false, l, g)
		proxy := socitest.StartProxy(t, reg.Addr)
		proxy.Corrupt(l.Desc.Digest, l.Desc.Size/2+1000)
		proxy.Corrupt(g.Desc.Digest, g.Desc.Size/2)
		out := tryCreate(t, proxy.Addr+"/corrupt:v1", soci.Options{MinLayerSize: 1000})
		err := out.failure()
		if err == nil {
			t.Fatalf("create of corrupted layers succeeded: %s", describe(out))
		}
		for _, d := range []digest.Digest{l.Desc.Digest, g.Desc.Digest} {
			if !strings.Contains(err.Error(), d.String()) {
				t.Errorf("error %q does not name layer %s", err, d)
			}
			if st := layerResult(t, out.res, d); st.Status != soci.LayerFailed || st.Err == nil {
				t.Errorf("layer %s: %+v, want failed", d, st)
			}
		}
		if got := socitest.Walk(t, reg, "corrupt"); len(got) != 0 {
			t.Errorf("SOCI indexes %v pushed for corrupted layers", got)
		}
	})
}

// TestCreateBadInput: a manifest that does not parse, an image config
// that does not parse, a layer that is neither gzip nor tar.
func TestCreateBadInput(t *testing.T) {
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		run := func(ref string) outcome {
			return tryCreate(t, reg.Addr+"/"+ref, soci.Options{})
		}
		// A layer of random bytes labelled tar+gzip.
		junk := socitest.ZstdLayer(130, 50<<10)
		junk.Desc.MediaType = socitest.OCIGzip
		good := socitest.GzipLayer(131, 50<<10, socitest.OCIGzip)
		socitest.PushImage(t, reg.Addr, "bad", "junk", "linux/amd64", false, good, junk)
		out := run("bad:junk")
		if err := out.failure(); err == nil || !strings.Contains(err.Error(), "layer "+junk.Desc.Digest.String()) {
			t.Errorf("junk layer: err %v, want one naming layer %s", err, junk.Desc.Digest)
		}
		if got := socitest.Walk(t, reg, "bad"); len(got) != 0 {
			t.Errorf("SOCI indexes %v pushed for an image with a junk layer", got)
		}

		// An image config that is not JSON.
		cfg := []byte("this is not an image config")
		registrytest.PushBlob(t, reg.Addr, "bad", cfg)
		registrytest.PushBlob(t, reg.Addr, "bad", good.Data)
		m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
			Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
			Layers: []ocispec.Descriptor{good.Desc}}
		m.SchemaVersion = 2
		mb, _ := json.Marshal(m)
		registrytest.PushManifest(t, reg.Addr, "bad", "config", m.MediaType, mb)
		// Create needs no platform for a single manifest (a v1 index has
		// none) and indexes it; Convert must refuse it, clearly.
		out = run("bad:config")
		if err := out.failure(); err != nil || out.res.Platforms[0].Index.Digest == "" || platforms.Format(out.res.Platforms[0].Platform) != "unknown" {
			t.Errorf("create of an image whose config is not JSON: err %v", err)
		}
		out = tryConvert(t, reg.Addr+"/bad:config", reg.Addr+"/bad:config-soci", soci.Options{})
		if out.err == nil || !strings.Contains(out.err.Error(), "config") {
			t.Errorf("convert of an image whose config is not JSON: err %v", out.err)
		}
		out = tryCreate(t, reg.Addr+"/bad:config", soci.Options{Platforms: []ocispec.Platform{mustPlatform(t, "linux/amd64")}})
		if out.err == nil || !strings.Contains(out.err.Error(), "config") {
			t.Errorf("create for linux/amd64 of an image whose config is not JSON: err %v", out.err)
		}

		// A manifest with a bad layer digest, which docker-registry
		// refuses; the in-process registry stores it.
		if reg.Referrers {
			bad := strings.Replace(string(mb), good.Desc.Digest.String(), "sha256:nothex", 1)
			registrytest.PushManifest(t, reg.Addr, "bad", "digest", m.MediaType, []byte(bad))
			out = run("bad:digest")
			if err := out.failure(); err == nil || !strings.Contains(err.Error(), "nothex") {
				t.Errorf("manifest with a bad layer digest: err %v", err)
			}
			registrytest.PushManifest(t, reg.Addr, "bad", "json", m.MediaType, []byte(`{"schemaVersion":2,"layers":[`))
			out = run("bad:json")
			if err := out.failure(); err == nil || !strings.Contains(err.Error(), "manifest") {
				t.Errorf("manifest that is not JSON: err %v", err)
			}
		}

		// An image index whose entry names a manifest of another kind.
		registrytest.PushManifest(t, reg.Addr, "bad", "notimage", "application/vnd.oci.image.index.v1+json",
			[]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`))
		if err := run("bad:notimage").failure(); err == nil {
			t.Error("empty image index: no error")
		}
		if err := run("bad:missing").failure(); err == nil || !strings.Contains(err.Error(), "not found") {
			t.Errorf("missing tag: %v", err)
		}
	})
}

// TestCreatePartialFailure: when one platform of an index fails, the
// others still get their index, and the result says which failed.
func TestCreatePartialFailure(t *testing.T) {
	amd := socitest.GzipLayer(140, 150<<10, socitest.OCIGzip)
	arm := socitest.GzipLayer(141, 150<<10, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		a, b := socitest.PushMultiPlatform(t, reg.Addr, "partial", "v1", false, []socitest.Layer{amd}, []socitest.Layer{arm})
		proxy := socitest.StartProxy(t, reg.Addr)
		proxy.Corrupt(arm.Desc.Digest, 100)
		out := tryCreate(t, proxy.Addr+"/partial:v1", soci.Options{MinLayerSize: 1000, AllPlatforms: true})
		if out.err != nil {
			t.Fatal(out.err)
		}
		failed := out.res.Failed()
		if len(failed) != 1 || len(out.res.Platforms) != 2 || platforms.Format(failed[0].Platform) != "linux/arm64" || failed[0].Index.Digest != "" {
			t.Errorf("failed platforms %+v, want linux/arm64 only", failed)
		}
		if p := out.res.Platforms[0]; platforms.Format(p.Platform) != "linux/amd64" || p.Err != nil || p.Index.Digest == "" {
			t.Errorf("linux/amd64: %+v, want an index", p)
		}
		if n := len(socitest.SociReferrers(t, reg, "partial", a.Desc.Digest)); n != 1 {
			t.Errorf("amd64 has %d SOCI indexes, want 1", n)
		}
		if n := len(socitest.SociReferrers(t, reg, "partial", b.Desc.Digest)); n != 0 {
			t.Errorf("arm64 has %d SOCI indexes, want 0", n)
		}
		socitest.Walk(t, reg, "partial")
	})
}

// TestCreateSkipsNonImages: attestation manifests (platform
// unknown/unknown) and SOCI v2 entries of an image index are not indexed.
func TestCreateSkipsNonImages(t *testing.T) {
	l := socitest.GzipLayer(150, 100<<10, socitest.OCIGzip)
	att := socitest.GzipLayer(151, 100<<10, socitest.OCIGzip)
	addr := registrytest.StartReferrersRegistry(t)
	reg := socitest.Registry{Addr: addr, Referrers: true}
	img := socitest.PushImage(t, addr, "att", "", "linux/amd64", false, l)
	a := socitest.PushImage(t, addr, "att", "", "linux/amd64", false, att)
	a.Platform = ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	socitest.PushIndex(t, addr, "att", "v1", false, img, a)
	res := create(t, addr+"/att:v1", soci.Options{MinLayerSize: 1000, AllPlatforms: true})
	if len(res.Platforms) != 1 || res.Platforms[0].Manifest.Digest != img.Desc.Digest {
		t.Errorf("platforms %+v, want the image only", res.Platforms)
	}
	if n := len(socitest.SociReferrers(t, reg, "att", a.Desc.Digest)); n != 0 {
		t.Errorf("the attestation got %d SOCI indexes", n)
	}
}

// TestCreateSpanSizeChange: zTOCs built with another span size are not
// reused; the image then has one index per span size. The image is named
// by digest.
func TestCreateSpanSizeChange(t *testing.T) {
	l := socitest.GzipLayer(160, 600<<10, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "spans", "", "linux/amd64", false, l)
		ref := reg.Addr + "/spans@" + img.Desc.Digest.String()
		cache := newCache(t)
		first := create(t, ref, soci.Options{Cache: cache, MinLayerSize: 1000})
		second := create(t, ref, soci.Options{Cache: cache, MinLayerSize: 1000, SpanSize: 65536})
		if st := statuses(second)[l.Desc.Digest]; st != soci.LayerIndexed {
			t.Errorf("layer with a new span size is %q, want indexed", st)
		}
		if first.Platforms[0].Index.Digest == second.Platforms[0].Index.Digest {
			t.Fatal("same index for two span sizes")
		}
		subject := img.Desc
		socitest.CheckIndex(t, reg.Addr, "spans", second.Platforms[0].Index.Digest, index.V1, &subject, []socitest.Want{{Layer: l, SpanSize: 65536}})
		if n := len(socitest.SociReferrers(t, reg, "spans", img.Desc.Digest)); n != 2 {
			t.Errorf("image has %d SOCI indexes, want 2", n)
		}
		third := create(t, ref, soci.Options{MinLayerSize: 1000, SpanSize: 65536})
		if st := statuses(third)[l.Desc.Digest]; st != soci.LayerReused {
			t.Errorf("third run: layer %q, want reused from the registry", st)
		}
	})
}

// TestCreateManyLayers: sixteen layers, one of them twice in the manifest,
// with a concurrency of 1 and 3: every position of the manifest gets its
// zTOC, in order, and the repeated layer is built once (and reported once).
func TestCreateManyLayers(t *testing.T) {
	var layers []socitest.Layer
	for i := range 16 {
		layers = append(layers, socitest.GzipLayer(uint64(200+i), int64(20+i)<<10, socitest.OCIGzip))
	}
	layers = append(layers, layers[3])
	var want []socitest.Want
	for _, l := range layers {
		want = append(want, socitest.Want{Layer: l, SpanSize: 64 << 10})
	}
	addr := registrytest.StartReferrersRegistry(t)
	img := socitest.PushImage(t, addr, "many", "v1", "linux/amd64", false, layers...)
	for _, c := range []int{1, 3} {
		obs := newRecorder()
		res := create(t, addr+"/many:v1", soci.Options{Force: true, SpanSize: 65536, Concurrency: c, Observer: obs})
		ls := res.Platforms[0].Layers
		if len(ls) != 17 || ls[16].Ztoc.Digest != ls[3].Ztoc.Digest {
			t.Fatalf("concurrency %d: layers %+v", c, ls)
		}
		obs.check(t, res)
		subject := img.Desc
		socitest.CheckIndex(t, addr, "many", res.Platforms[0].Index.Digest, index.V1, &subject, want)
	}
}

// TestCreateCacheAcrossRegistries: a zTOC from the local cache is pushed
// to a registry that does not have it yet.
func TestCreateCacheAcrossRegistries(t *testing.T) {
	l := socitest.GzipLayer(170, 300<<10, socitest.OCIGzip)
	one := registrytest.StartDistribution(t)
	two := registrytest.StartReferrersRegistry(t)
	cache := newCache(t)
	socitest.PushImage(t, one, "app", "v1", "linux/amd64", false, l)
	img := socitest.PushImage(t, two, "app", "v1", "linux/amd64", false, l)
	create(t, one+"/app:v1", soci.Options{Cache: cache, MinLayerSize: 1000})
	res := create(t, two+"/app:v1", soci.Options{Cache: cache, MinLayerSize: 1000})
	if ls := res.Platforms[0].Layers; ls[0].Status != soci.LayerReused || !ls[0].FromCache {
		t.Errorf("second registry: layer %+v, want reused from the local cache", ls[0])
	}
	subject := img.Desc
	socitest.CheckIndex(t, two, "app", res.Platforms[0].Index.Digest, index.V1, &subject, []socitest.Want{{Layer: l, SpanSize: soci.DefaultSpanSize}})
}

// TestCreateDockerManifestList indexes both platforms of a Docker
// manifest list.
func TestCreateDockerManifestList(t *testing.T) {
	amd := socitest.GzipLayer(180, 120<<10, socitest.DockerGzip)
	arm := socitest.GzipLayer(181, 130<<10, socitest.DockerGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		a, b := socitest.PushMultiPlatform(t, reg.Addr, "dlist", "v1", true, []socitest.Layer{amd}, []socitest.Layer{arm})
		res := create(t, reg.Addr+"/dlist:v1", soci.Options{MinLayerSize: 1000, AllPlatforms: true})
		if len(res.Platforms) != 2 {
			t.Fatalf("platforms %+v", res.Platforms)
		}
		for i, im := range []socitest.Image{a, b} {
			subject := im.Desc
			idx := res.Platforms[i].Index.Digest
			socitest.CheckIndex(t, reg.Addr, "dlist", idx, index.V1, &subject, []socitest.Want{{Layer: im.Layers[0], SpanSize: soci.DefaultSpanSize}})
			if refs := socitest.SociReferrers(t, reg, "dlist", im.Desc.Digest); len(refs) != 1 || refs[0].Digest != idx {
				t.Errorf("%s: referrers %+v", platforms.Format(res.Platforms[i].Platform), refs)
			}
		}
	})
}

// TestCreateDockerSchema2 indexes a Docker v2 schema 2 image: the SOCI
// index's subject keeps the Docker manifest media type and the zTOC
// descriptors the Docker layer media type.
func TestCreateDockerSchema2(t *testing.T) {
	l0 := socitest.GzipLayer(70, 150<<10, socitest.DockerGzip)
	l1 := socitest.GzipLayer(71, 250<<10, socitest.DockerGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "docker", "v1", "linux/amd64", true, l0, l1)
		res := create(t, reg.Addr+"/docker:v1", soci.Options{Cache: newCache(t), MinLayerSize: 1000})
		if len(res.Platforms) != 1 || res.Platforms[0].Index.Digest == "" {
			t.Fatalf("result %+v", res)
		}
		subject := img.Desc
		if subject.MediaType != socitest.DockerImage {
			t.Fatalf("test image is %s", subject.MediaType)
		}
		idx := res.Platforms[0].Index.Digest
		socitest.CheckIndex(t, reg.Addr, "docker", idx, index.V1, &subject, []socitest.Want{{Layer: l0, SpanSize: soci.DefaultSpanSize}, {Layer: l1, SpanSize: soci.DefaultSpanSize}})
		if refs := socitest.SociReferrers(t, reg, "docker", img.Desc.Digest); len(refs) != 1 || refs[0].Digest != idx {
			t.Errorf("referrers %+v", refs)
		}
	})
}
