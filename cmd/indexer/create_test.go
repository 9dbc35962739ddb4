package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/ztoc"
)

// itHasLine reports whether the human output has the line of a layer with
// the given status ("indexed", "reused", "skipped").
func itHasLine(out, status string, d digest.Digest) bool {
	prefix := fmt.Sprintf("%-9s%s  ", status, short(d))
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, prefix) {
			return true
		}
	}
	return false
}

func itLineOf(out string, d digest.Digest) string {
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, short(d)+"  ") {
			return line
		}
	}
	return ""
}

var itIndexLine = regexp.MustCompile(`(?m)^index    (sha256:[0-9a-f]{64})  SOCI index (v1|v2) for (\S+) \(manifest (sha256:[0-9a-f]{12}), (\d+) of (\d+) layers\)$`)

// TestCreateLayerKinds indexes an image of six layers: three gzip or tar
// layers above --min-layer-size are indexed (the tar one with fixed-size
// spans), two small ones and a zstd one are skipped with a reason. The
// pushed SOCI index is checked byte for byte and found as a referrer.
func TestCreateLayerKinds(t *testing.T) {
	const spanSize = 128 << 10
	layers := []itLayer{
		itGzipLayer(1, 400<<10, itOCIGzip),
		itGzipLayer(2, 40<<10, itOCIGzip),
		itZstdLayer(3, 300<<10),
		itTarLayer(4, 500<<10),
		itGzipLayer(5, 60<<10, itOCIGzip),
		itGzipLayer(6, 700<<10, itOCIGzip),
	}
	indexed := []itWant{{layers[0], spanSize}, {layers[3], spanSize}, {layers[5], spanSize}}
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		img := itPushImage(t, reg.Addr, "kinds", "v1", "linux/amd64", false, layers...)
		out := itMustRun(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "200000",
			"--span-size", fmt.Sprint(spanSize), reg.Addr+"/kinds:v1")
		for _, i := range []int{0, 3, 5} {
			if !itHasLine(out.Stdout, "indexed", layers[i].Desc.Digest) {
				t.Errorf("no indexed line for layer %d:\n%s", i, out.Stdout)
			}
		}
		for _, i := range []int{1, 4} {
			if l := itLineOf(out.Stdout, layers[i].Desc.Digest); !itHasLine(out.Stdout, "skipped", layers[i].Desc.Digest) || !strings.Contains(l, "below --min-layer-size") {
				t.Errorf("layer %d: want a skipped line naming --min-layer-size, got %q", i, l)
			}
		}
		if l := itLineOf(out.Stdout, layers[2].Desc.Digest); !itHasLine(out.Stdout, "skipped", layers[2].Desc.Digest) || !strings.Contains(l, "zstd") {
			t.Errorf("zstd layer: want a skipped line naming zstd, got %q", l)
		}
		m := itIndexLine.FindAllStringSubmatch(out.Stdout, -1)
		if len(m) != 1 {
			t.Fatalf("want one index line, got %d:\n%s", len(m), out.Stdout)
		}
		if m[0][2] != "v1" || m[0][3] != "linux/amd64" || m[0][4] != short(img.Desc.Digest) || m[0][5] != "3" || m[0][6] != "6" {
			t.Errorf("index line %q", m[0][0])
		}
		idx := digest.Digest(m[0][1])

		refs := itSociReferrers(t, reg, "kinds", img.Desc.Digest)
		if len(refs) != 1 || refs[0].Digest != idx || refs[0].MediaType != ocispec.MediaTypeImageManifest {
			t.Errorf("SOCI referrers of the image: %+v, want index %s", refs, idx)
		}
		subject := img.Desc
		itCheckIndex(t, reg.Addr, "kinds", idx, index.V1, &subject, indexed)
		if got := itWalk(t, reg, "kinds"); len(got) != 1 || got[0] != idx {
			t.Errorf("SOCI indexes in the repository: %v, want [%s]", got, idx)
		}
	})
}

// TestCreateDefaults runs create with the default --min-layer-size (10
// MiB) and span size, and checks --json and -q output.
func TestCreateDefaults(t *testing.T) {
	big := itGzipLayer(10, 11<<20+300<<10, itOCIGzip)
	small := itGzipLayer(11, 2<<20, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		img := itPushImage(t, reg.Addr, "defaults", "latest", "linux/amd64", false, small, big)
		cache := t.TempDir()
		rep := itReport(t, "create", "--plain-http", "--cache-dir", cache, reg.Addr+"/defaults")
		if rep.Image != reg.Addr+"/defaults" || len(rep.Platforms) != 1 {
			t.Fatalf("report %+v", rep)
		}
		p := rep.Platforms[0]
		if p.Platform != "linux/amd64" || p.Manifest != img.Desc.Digest || p.Error != "" || p.Index.Validate() != nil || len(p.Layers) != 2 {
			t.Fatalf("platform report %+v", p)
		}
		l0, l1 := p.Layers[0], p.Layers[1]
		if l0.Digest != small.Desc.Digest || l0.Status != "skipped" || !strings.Contains(l0.Reason, "10.0 MiB") || l0.Ztoc != "" {
			t.Errorf("small layer: %+v", l0)
		}
		if l1.Digest != big.Desc.Digest || l1.Status != "indexed" || l1.Ztoc.Validate() != nil || l1.ZtocSize <= 0 || l1.Spans != 3 ||
			l1.Size != big.Desc.Size || l1.MediaType != itOCIGzip {
			t.Errorf("big layer: %+v", l1)
		}
		subject := img.Desc
		m := itCheckIndex(t, reg.Addr, "defaults", p.Index, index.V1, &subject, []itWant{{big, ztoc.DefaultSpanSize}})
		if m.Layers[0].Digest != l1.Ztoc || m.Layers[0].Size != l1.ZtocSize {
			t.Errorf("report names zTOC %s (%d bytes), index has %+v", l1.Ztoc, l1.ZtocSize, m.Layers[0])
		}
		if m.Annotations[index.AnnotationBuildToolIdentifier] == "" {
			t.Errorf("index has no build tool annotation: %v", m.Annotations)
		}

		// -q: the index digest alone (the layers are reused this time).
		out := itMustRun(t, "create", "--plain-http", "--cache-dir", cache, "-q", reg.Addr+"/defaults:latest")
		if out.Stdout != p.Index.String()+"\n" || out.Stderr != "" {
			t.Errorf("-q printed %q (stderr %q), want %q", out.Stdout, out.Stderr, p.Index.String()+"\n")
		}
		if r := itRun(t, "create", "--plain-http", "--cache-dir", cache, "-q", "--json", reg.Addr+"/defaults:latest"); r.Err == nil {
			t.Error("-q with --json: no error")
		}
	})
}

// TestCreateReuse checks that nothing is rebuilt when the registry or the
// local cache already has a layer's zTOC, that --force rebuilds, and that
// a base layer shared by two images of a repository is indexed once.
func TestCreateReuse(t *testing.T) {
	base := itGzipLayer(20, 300<<10, itOCIGzip)
	a1 := itGzipLayer(21, 200<<10, itOCIGzip)
	b1 := itGzipLayer(22, 250<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		imgA := itPushImage(t, reg.Addr, "app", "a", "linux/amd64", false, base, a1)
		imgB := itPushImage(t, reg.Addr, "app", "b", "linux/amd64", false, base, b1)
		cache := t.TempDir()
		flags := []string{"create", "--plain-http", "--min-layer-size", "1000"}
		proxy := itStartProxy(t, reg.Addr)
		create := func(ref string, extra ...string) runReport {
			return itReport(t, append(append(append([]string{}, flags...), extra...), proxy.Addr+"/app:"+ref)...)
		}
		// layerGETs counts the layer downloads so far.
		layerGETs := func() int {
			n := 0
			for _, r := range proxy.Requests() {
				for _, l := range []itLayer{base, a1, b1} {
					if strings.HasPrefix(r, "GET /v2/app/blobs/"+l.Desc.Digest.String()) {
						n++
					}
				}
			}
			return n
		}
		want := func(rep runReport, what string, st map[digest.Digest]string) {
			t.Helper()
			got := itStatuses(rep)
			for d, s := range st {
				if got[d] != s {
					t.Errorf("%s: layer %s is %q, want %q", what, short(d), got[d], s)
				}
			}
		}
		first := create("a", "--cache-dir", cache)
		want(first, "first create", map[digest.Digest]string{base.Desc.Digest: "indexed", a1.Desc.Digest: "indexed"})
		idx := first.Platforms[0].Index

		gets := layerGETs()
		if gets != 2 {
			t.Errorf("first create downloaded layers %d times, want 2", gets)
		}
		again := create("a", "--cache-dir", cache)
		want(again, "second create", map[digest.Digest]string{base.Desc.Digest: "reused", a1.Desc.Digest: "reused"})
		if again.Platforms[0].Index != idx {
			t.Errorf("second create pushed index %s, first %s", again.Platforms[0].Index, idx)
		}
		// Human output says so too.
		out := itMustRun(t, append(flags, "--cache-dir", cache, reg.Addr+"/app:a")...)
		if !itHasLine(out.Stdout, "reused", base.Desc.Digest) || !itHasLine(out.Stdout, "reused", a1.Desc.Digest) || strings.Contains(out.Stdout, "indexed  ") {
			t.Errorf("third create, want only reused lines:\n%s", out.Stdout)
		}

		// Without the local cache the zTOCs must come from the registry.
		noCache := create("a", "--no-cache", "--cache-dir", t.TempDir())
		want(noCache, "--no-cache", map[digest.Digest]string{base.Desc.Digest: "reused", a1.Desc.Digest: "reused"})
		for _, l := range noCache.Platforms[0].Layers {
			if !strings.Contains(l.Reason, "registry") {
				t.Errorf("--no-cache: layer %s reused because %q, want the registry", short(l.Digest), l.Reason)
			}
		}
		// An empty cache and a fresh cache directory: same.
		fresh := create("a", "--cache-dir", t.TempDir())
		want(fresh, "fresh cache", map[digest.Digest]string{base.Desc.Digest: "reused", a1.Desc.Digest: "reused"})
		if n := layerGETs(); n != gets {
			t.Errorf("re-runs downloaded layers %d times; a reused layer must not be read", n-gets)
		}

		forced := create("a", "--cache-dir", cache, "--force")
		want(forced, "--force", map[digest.Digest]string{base.Desc.Digest: "indexed", a1.Desc.Digest: "indexed"})
		for i, l := range forced.Platforms[0].Layers {
			if l.Ztoc != first.Platforms[0].Layers[i].Ztoc {
				t.Errorf("--force rebuilt layer %s into zTOC %s, first build %s (not deterministic)", short(l.Digest), l.Ztoc, first.Platforms[0].Layers[i].Ztoc)
			}
		}

		// Image b shares the base layer: indexed once, reused now.
		second := create("b", "--cache-dir", cache)
		want(second, "image b", map[digest.Digest]string{base.Desc.Digest: "reused", b1.Desc.Digest: "indexed"})
		subject := imgB.Desc
		itCheckIndex(t, reg.Addr, "app", second.Platforms[0].Index, index.V1, &subject, []itWant{{base, ztoc.DefaultSpanSize}, {b1, ztoc.DefaultSpanSize}})

		// Re-runs push the same index: the image has one SOCI index.
		if refs := itSociReferrers(t, reg, "app", imgA.Desc.Digest); len(refs) != 1 || refs[0].Digest != idx {
			t.Errorf("after re-runs image a has SOCI referrers %+v, want only %s", refs, idx)
		}
		if refs := itSociReferrers(t, reg, "app", imgB.Desc.Digest); len(refs) != 1 {
			t.Errorf("image b has SOCI referrers %+v, want one", refs)
		}
		if got := itWalk(t, reg, "app"); len(got) != 2 {
			t.Errorf("SOCI indexes in the repository: %v, want 2", got)
		}
	})
}

// TestCreateSharedLayerNoCache: with --no-cache, a layer indexed for one
// image of a repository is reused from the registry for another image,
// found through the other image's SOCI index (a referrer: fallback tag or
// referrers API).
func TestCreateSharedLayerNoCache(t *testing.T) {
	base := itGzipLayer(30, 300<<10, itOCIGzip)
	a1 := itGzipLayer(31, 100<<10, itOCIGzip)
	b1 := itGzipLayer(32, 100<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		itPushImage(t, reg.Addr, "shared", "a", "linux/amd64", false, base, a1)
		imgB := itPushImage(t, reg.Addr, "shared", "b", "linux/amd64", false, base, b1)
		itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", reg.Addr+"/shared:a")
		rep := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", reg.Addr+"/shared:b")
		st := itStatuses(rep)
		if st[b1.Desc.Digest] != "indexed" {
			t.Errorf("second image: own layer %s, want indexed", st[b1.Desc.Digest])
		}
		if st[base.Desc.Digest] != "reused" {
			t.Errorf("second image without cache: base layer %s, want reused (from image a's index)", st[base.Desc.Digest])
		}
		subject := imgB.Desc
		itCheckIndex(t, reg.Addr, "shared", rep.Platforms[0].Index, index.V1, &subject, []itWant{{base, ztoc.DefaultSpanSize}, {b1, ztoc.DefaultSpanSize}})
	})
}

// TestCreatePlatforms indexes a two-platform image index: the default
// platform only, --platform, --all-platforms, and a --platform that
// matches nothing.
func TestCreatePlatforms(t *testing.T) {
	shared := itGzipLayer(40, 150<<10, itOCIGzip)
	amd := itGzipLayer(41, 200<<10, itOCIGzip)
	arm := itGzipLayer(42, 220<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		push := func(repo string) (itImage, itImage) {
			a := itPushImage(t, reg.Addr, repo, "", "linux/amd64", false, shared, amd)
			b := itPushImage(t, reg.Addr, repo, "", "linux/arm64", false, shared, arm)
			itPushIndex(t, reg.Addr, repo, "multi", false, a, b)
			return a, b
		}
		flags := []string{"create", "--plain-http", "--min-layer-size", "1000"}
		run := func(repo string, extra ...string) itOutput {
			return itRun(t, append(append(append([]string{}, flags...), "--cache-dir", t.TempDir()), append(extra, reg.Addr+"/"+repo+":multi")...)...)
		}
		count := func(repo string, a, b itImage) (int, int) {
			return len(itSociReferrers(t, reg, repo, a.Desc.Digest)), len(itSociReferrers(t, reg, repo, b.Desc.Digest))
		}

		a, b := push("default")
		out := run("default")
		if out.Err != nil {
			t.Fatal(out.Err)
		}
		lines := itIndexLine.FindAllStringSubmatch(out.Stdout, -1)
		na, nb := count("default", a, b)
		switch itDefaultPlatform() {
		case "linux/amd64":
			if len(lines) != 1 || lines[0][3] != "linux/amd64" || na != 1 || nb != 0 {
				t.Errorf("default platform: index lines %q, referrers amd64 %d arm64 %d; want amd64 only", lines, na, nb)
			}
			if itHasLine(out.Stdout, "indexed", arm.Desc.Digest) {
				t.Errorf("default platform indexed the arm64 layer")
			}
			subject := a.Desc
			subject.Platform = nil
			itCheckIndex(t, reg.Addr, "default", digest.Digest(lines[0][1]), index.V1, &subject, []itWant{{shared, ztoc.DefaultSpanSize}, {amd, ztoc.DefaultSpanSize}})
		case "linux/arm64":
			if len(lines) != 1 || lines[0][3] != "linux/arm64" || na != 0 || nb != 1 {
				t.Errorf("default platform: index lines %q, referrers amd64 %d arm64 %d; want arm64 only", lines, na, nb)
			}
		default:
			if out.Err == nil {
				t.Errorf("default platform %s is not in the image, but create succeeded", itDefaultPlatform())
			}
		}

		a, b = push("arm")
		out = run("arm", "--platform", "linux/arm64")
		if out.Err != nil {
			t.Fatal(out.Err)
		}
		lines = itIndexLine.FindAllStringSubmatch(out.Stdout, -1)
		if na, nb := count("arm", a, b); len(lines) != 1 || lines[0][3] != "linux/arm64" || na != 0 || nb != 1 {
			t.Errorf("--platform linux/arm64: index lines %q, referrers amd64 %d arm64 %d", lines, na, nb)
		} else {
			subject := b.Desc
			subject.Platform = nil
			itCheckIndex(t, reg.Addr, "arm", digest.Digest(lines[0][1]), index.V1, &subject, []itWant{{shared, ztoc.DefaultSpanSize}, {arm, ztoc.DefaultSpanSize}})
		}

		a, b = push("all")
		rep := itReport(t, append(flags, "--cache-dir", t.TempDir(), "--all-platforms", reg.Addr+"/all:multi")...)
		if len(rep.Platforms) != 2 || rep.Platforms[0].Platform != "linux/amd64" || rep.Platforms[1].Platform != "linux/arm64" {
			t.Fatalf("--all-platforms report: %+v", rep.Platforms)
		}
		if na, nb := count("all", a, b); na != 1 || nb != 1 {
			t.Errorf("--all-platforms: referrers amd64 %d arm64 %d, want 1 and 1", na, nb)
		}
		// The shared layer is built once and used by both indexes.
		if z0, z1 := rep.Platforms[0].Layers[0].Ztoc, rep.Platforms[1].Layers[0].Ztoc; z0 != z1 || z0 == "" {
			t.Errorf("shared layer zTOCs %s and %s", z0, z1)
		}
		if got := itWalk(t, reg, "all"); len(got) != 2 {
			t.Errorf("SOCI indexes: %v, want 2", got)
		}

		push("none")
		out = run("none", "--platform", "linux/s390x")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "linux/s390x") || !strings.Contains(out.Err.Error(), "no image manifest") {
			t.Errorf("--platform linux/s390x: err %v, want an error naming the platform", out.Err)
		}
		if got := itWalk(t, reg, "none"); len(got) != 0 {
			t.Errorf("failed create left SOCI indexes %v", got)
		}
		out = run("none", "--platform", "not/a/plat/form")
		if out.Err == nil {
			t.Error("--platform not/a/plat/form: no error")
		}
	})
}

// TestCreateSingleManifestPlatform: --platform on a single-manifest image
// must match the image's config.
func TestCreateSingleManifestPlatform(t *testing.T) {
	l := itGzipLayer(50, 100<<10, itOCIGzip)
	reg := itRegistry{Addr: startReferrers(t), Referrers: true}
	itPushImage(t, reg.Addr, "single", "v1", "linux/arm64", false, l)
	out := itRun(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "0", "--platform", "linux/amd64", reg.Addr+"/single:v1")
	if out.Err == nil || !strings.Contains(out.Err.Error(), "linux/arm64") {
		t.Errorf("single arm64 image with --platform linux/amd64: err %v", out.Err)
	}
	out = itMustRun(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "0", reg.Addr+"/single:v1")
	if m := itIndexLine.FindStringSubmatch(out.Stdout); m == nil || m[3] != "linux/arm64" {
		t.Errorf("single arm64 image without --platform: %q", out.Stdout)
	}
}

// TestCreateReportJSON checks the --json report's shape with the generic
// decoder too, so field names are pinned.
func TestCreateReportJSON(t *testing.T) {
	l := itGzipLayer(60, 100<<10, itOCIGzip)
	z := itZstdLayer(61, 1000)
	addr := startReferrers(t)
	itPushImage(t, addr, "json", "v1", "linux/amd64", false, l, z)
	out := itMustRun(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "0", "--json", addr+"/json:v1")
	var rep struct {
		Image     string
		Platforms []struct {
			Platform, Manifest, Index string
			Layers                    []map[string]any
		}
	}
	if err := json.Unmarshal([]byte(out.Stdout), &rep); err != nil || len(rep.Platforms) != 1 || len(rep.Platforms[0].Layers) != 2 {
		t.Fatalf("--json: %v\n%s", err, out.Stdout)
	}
	ls := rep.Platforms[0].Layers
	if ls[0]["status"] != "indexed" || ls[0]["ztoc"] == nil || ls[0]["digest"] != l.Desc.Digest.String() {
		t.Errorf("layer 0: %v", ls[0])
	}
	if ls[1]["status"] != "skipped" || !strings.Contains(fmt.Sprint(ls[1]["reason"]), "zstd") || ls[1]["ztoc"] != nil {
		t.Errorf("layer 1: %v", ls[1])
	}
}

func startReferrers(t *testing.T) string {
	t.Helper()
	return registrytest.StartReferrersRegistry(t)
}

// TestCreateFaults runs create through registrytest's fault proxy in front
// of docker-registry: transient failures are retried, persistent ones and
// a registry that stops answering fail in bounded time with a clear
// error, and a failed create leaves no SOCI index pointing at missing
// blobs.
func TestCreateFaults(t *testing.T) {
	layers := []itLayer{
		itGzipLayer(110, 300<<10, itOCIGzip),
		itGzipLayer(111, 350<<10, itOCIGzip),
		itTarLayer(112, 250<<10),
	}
	want := []itWant{{layers[0], ztoc.DefaultSpanSize}, {layers[1], ztoc.DefaultSpanSize}, {layers[2], ztoc.DefaultSpanSize}}
	upstream := registrytest.StartDistribution(t)
	reg := itRegistry{Name: "distribution", Addr: upstream}
	var mu sync.Mutex
	n := 0
	// setup pushes the image to a repository of its own and starts a
	// fault proxy for the subtest, which runs in parallel with the others
	// (most of them wait on retry backoff).
	setup := func(t *testing.T) (itImage, string, *registrytest.FaultProxy) {
		mu.Lock()
		n++
		repo := fmt.Sprintf("faults%d", n)
		mu.Unlock()
		img := itPushImage(t, upstream, repo, "v1", "linux/amd64", false, layers...)
		proxy := registrytest.StartFaultProxy(t, upstream)
		t.Parallel()
		return img, repo, proxy
	}
	layerGET := func(d digest.Digest) func(*http.Request) bool {
		return func(r *http.Request) bool {
			return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+d.String())
		}
	}
	create := func(ctx context.Context, t *testing.T, proxy *registrytest.FaultProxy, repo string) itOutput {
		return itRunContext(ctx, t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", proxy.Addr+"/"+repo+":v1")
	}
	succeeds := func(t *testing.T, proxy *registrytest.FaultProxy, img itImage, repo string) {
		t.Helper()
		out := create(context.Background(), t, proxy, repo)
		if out.Err != nil {
			t.Fatalf("create failed: %v\nproxy saw:\n%s", out.Err, strings.Join(proxy.Requests(), "\n"))
		}
		m := itIndexLine.FindStringSubmatch(out.Stdout)
		if m == nil {
			t.Fatalf("no index line:\n%s", out.Stdout)
		}
		subject := img.Desc
		itCheckIndex(t, upstream, repo, digest.Digest(m[1]), index.V1, &subject, want)
	}
	// fails checks a failed create: a non-nil error within bounds that
	// contains every string of msg, and nothing half-pushed.
	fails := func(t *testing.T, proxy *registrytest.FaultProxy, out itOutput, repo string, msg ...string) {
		t.Helper()
		if out.Err == nil {
			t.Fatalf("create succeeded:\n%s", out.Stdout)
		}
		if out.Elapsed > 60*time.Second {
			t.Errorf("create took %s to fail", out.Elapsed)
		}
		for _, s := range msg {
			if !strings.Contains(out.Err.Error(), s) {
				t.Errorf("error %q does not mention %q", out.Err, s)
			}
		}
		proxy.Set(registrytest.Faults{})
		if got := itWalk(t, reg, repo); len(got) != 0 {
			t.Errorf("failed create left SOCI indexes %v", got)
		}
	}

	t.Run("transient 5xx", func(t *testing.T) {
		img, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Status: http.StatusServiceUnavailable, StatusCount: 3})
		succeeds(t, proxy, img, repo)
		if c := proxy.CountRequests("503 (injected)"); c != 3 {
			t.Errorf("%d injected 503s, want 3", c)
		}
	})
	t.Run("transient 5xx on push", func(t *testing.T) {
		img, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: func(r *http.Request) bool { return r.Method != http.MethodGet && r.Method != http.MethodHead }, Status: http.StatusBadGateway, StatusCount: 3})
		succeeds(t, proxy, img, repo)
	})
	t.Run("reset mid-layer", func(t *testing.T) {
		img, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: layerGET(layers[1].Desc.Digest), ResetAfter: 100 << 10, ResetCount: 2})
		succeeds(t, proxy, img, repo)
		if c := proxy.CountRequests("reset after"); c != 2 {
			t.Errorf("%d resets, want 2", c)
		}
		if c := proxy.CountRequests(layers[1].Desc.Digest.String() + " [bytes="); c == 0 {
			t.Errorf("the broken download was not resumed with a Range request:\n%s", strings.Join(proxy.Requests(), "\n"))
		}
	})
	t.Run("dropped connections", func(t *testing.T) {
		img, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{DropCount: 4})
		succeeds(t, proxy, img, repo)
	})
	t.Run("persistent 5xx on a layer", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: layerGET(layers[1].Desc.Digest), Status: http.StatusInternalServerError, StatusCount: -1})
		out := create(context.Background(), t, proxy, repo)
		fails(t, proxy, out, repo, layers[1].Desc.Digest.String(), "500")
	})
	t.Run("persistent 5xx on uploads", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/blobs/uploads/") }, Status: http.StatusServiceUnavailable, StatusCount: -1})
		out := create(context.Background(), t, proxy, repo)
		fails(t, proxy, out, repo, "503")
	})
	t.Run("index manifest push fails", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: func(r *http.Request) bool {
			return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/")
		}, Status: http.StatusInternalServerError, StatusCount: -1})
		out := create(context.Background(), t, proxy, repo)
		fails(t, proxy, out, repo, "500")
	})
	t.Run("fallback tag update fails", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: func(r *http.Request) bool {
			return r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/sha256-")
		}, Status: http.StatusInternalServerError, StatusCount: -1})
		out := create(context.Background(), t, proxy, repo)
		if out.Err == nil {
			t.Errorf("create succeeded though the index could not be made discoverable:\n%s", out.Stdout)
		}
		proxy.Set(registrytest.Faults{})
		itWalk(t, reg, repo) // no dangling pointers, whatever was pushed
	})
	t.Run("registry stops answering", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 64 << 10, ResetCount: -1, StallReset: true})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out := create(ctx, t, proxy, repo)
		fails(t, proxy, out, repo)
		if out.Elapsed > 20*time.Second {
			t.Errorf("create ran %s past its 10s deadline", out.Elapsed)
		}
	})
	t.Run("registry stops answering before headers", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Latency: 5 * time.Minute})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		out := create(ctx, t, proxy, repo)
		fails(t, proxy, out, repo)
		if out.Elapsed > 15*time.Second {
			t.Errorf("create ran %s past its 5s deadline", out.Elapsed)
		}
	})
	t.Run("corrupt layer body", func(t *testing.T) {
		_, repo, proxy := setup(t)
		proxy.Set(registrytest.Faults{Match: layerGET(layers[0].Desc.Digest), Corrupt: true})
		out := create(context.Background(), t, proxy, repo)
		fails(t, proxy, out, repo, layers[0].Desc.Digest.String())
	})
}

// TestCreateCorruptLayerData flips a byte inside a file's data of an
// uncompressed tar layer on its way from the registry: the tar still
// parses, so only the digest check can catch it.
func TestCreateCorruptLayerData(t *testing.T) {
	l := itTarLayer(120, 300<<10)
	g := itGzipLayer(121, 300<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		itPushImage(t, reg.Addr, "corrupt", "v1", "linux/amd64", false, l, g)
		proxy := itStartProxy(t, reg.Addr)
		proxy.Corrupt(l.Desc.Digest, l.Desc.Size/2+1000)
		proxy.Corrupt(g.Desc.Digest, g.Desc.Size/2)
		out := itRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", proxy.Addr+"/corrupt:v1")
		if out.Err == nil {
			t.Fatalf("create of corrupted layers succeeded:\n%s", out.Stdout)
		}
		for _, d := range []digest.Digest{l.Desc.Digest, g.Desc.Digest} {
			if !strings.Contains(out.Err.Error(), d.String()) {
				t.Errorf("error %q does not name layer %s", out.Err, d)
			}
		}
		if got := itWalk(t, reg, "corrupt"); len(got) != 0 {
			t.Errorf("SOCI indexes %v pushed for corrupted layers", got)
		}
	})
}

// TestCreateBadInput: a manifest that does not parse, an image config
// that does not parse, a layer that is neither gzip nor tar.
func TestCreateBadInput(t *testing.T) {
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		create := func(ref string) itOutput {
			return itRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "0", reg.Addr+"/"+ref)
		}
		// A layer of random bytes labelled tar+gzip.
		junk := itZstdLayer(130, 50<<10)
		junk.Desc.MediaType = itOCIGzip
		good := itGzipLayer(131, 50<<10, itOCIGzip)
		itPushImage(t, reg.Addr, "bad", "junk", "linux/amd64", false, good, junk)
		out := create("bad:junk")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "layer "+junk.Desc.Digest.String()) {
			t.Errorf("junk layer: err %v, want one naming layer %s", out.Err, junk.Desc.Digest)
		}
		if got := itWalk(t, reg, "bad"); len(got) != 0 {
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
		// create needs no platform for a single manifest (a v1 index has
		// none) and indexes it; convert must refuse it, clearly.
		out = create("bad:config")
		if out.Err != nil || !strings.Contains(out.Stdout, "for unknown") {
			t.Errorf("create of an image whose config is not JSON: err %v", out.Err)
		}
		out = itRun(t, "convert", "--plain-http", "--no-cache", "--min-layer-size", "0", reg.Addr+"/bad:config", reg.Addr+"/bad:config-soci")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "config") {
			t.Errorf("convert of an image whose config is not JSON: err %v", out.Err)
		}
		out = itRun(t, "create", "--plain-http", "--no-cache", "--platform", "linux/amd64", reg.Addr+"/bad:config")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "config") {
			t.Errorf("create --platform of an image whose config is not JSON: err %v", out.Err)
		}

		// A manifest with a bad layer digest, which docker-registry
		// refuses; the in-process registry stores it.
		if reg.Referrers {
			bad := strings.Replace(string(mb), good.Desc.Digest.String(), "sha256:nothex", 1)
			registrytest.PushManifest(t, reg.Addr, "bad", "digest", m.MediaType, []byte(bad))
			out = create("bad:digest")
			if out.Err == nil || !strings.Contains(out.Err.Error(), "nothex") {
				t.Errorf("manifest with a bad layer digest: err %v", out.Err)
			}
			registrytest.PushManifest(t, reg.Addr, "bad", "json", m.MediaType, []byte(`{"schemaVersion":2,"layers":[`))
			out = create("bad:json")
			if out.Err == nil || !strings.Contains(out.Err.Error(), "manifest") {
				t.Errorf("manifest that is not JSON: err %v", out.Err)
			}
		}

		// An image index whose entry names a manifest of another kind.
		registrytest.PushManifest(t, reg.Addr, "bad", "notimage", "application/vnd.oci.image.index.v1+json",
			[]byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`))
		out = create("bad:notimage")
		if out.Err == nil {
			t.Error("empty image index: no error")
		}
		out = create("bad:missing")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "not found") {
			t.Errorf("missing tag: %v", out.Err)
		}
		if out := itRun(t, "create", "--plain-http", "--span-size", "0", reg.Addr+"/bad:junk"); out.Err == nil {
			t.Error("--span-size 0: no error")
		}
	})
}

// TestCreatePartialFailure: when one platform of an index fails, the
// others still get their index, and the command reports the failure.
func TestCreatePartialFailure(t *testing.T) {
	amd := itGzipLayer(140, 150<<10, itOCIGzip)
	arm := itGzipLayer(141, 150<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		a := itPushImage(t, reg.Addr, "partial", "", "linux/amd64", false, amd)
		b := itPushImage(t, reg.Addr, "partial", "", "linux/arm64", false, arm)
		itPushIndex(t, reg.Addr, "partial", "v1", false, a, b)
		proxy := itStartProxy(t, reg.Addr)
		proxy.Corrupt(arm.Desc.Digest, 100)
		out := itRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--all-platforms", proxy.Addr+"/partial:v1")
		if out.Err == nil || !strings.Contains(out.Err.Error(), "1 of 2 platforms failed") || !strings.Contains(out.Err.Error(), "linux/arm64") {
			t.Errorf("err %v, want one naming the failed platform", out.Err)
		}
		if m := itIndexLine.FindAllStringSubmatch(out.Stdout, -1); len(m) != 1 || m[0][3] != "linux/amd64" {
			t.Errorf("index lines %q, want linux/amd64 only", m)
		}
		if n := len(itSociReferrers(t, reg, "partial", a.Desc.Digest)); n != 1 {
			t.Errorf("amd64 has %d SOCI indexes, want 1", n)
		}
		if n := len(itSociReferrers(t, reg, "partial", b.Desc.Digest)); n != 0 {
			t.Errorf("arm64 has %d SOCI indexes, want 0", n)
		}
		itWalk(t, reg, "partial")
	})
}

// TestCreateSkipsNonImages: attestation manifests (platform
// unknown/unknown) and SOCI v2 entries of an image index are not indexed.
func TestCreateSkipsNonImages(t *testing.T) {
	l := itGzipLayer(150, 100<<10, itOCIGzip)
	att := itGzipLayer(151, 100<<10, itOCIGzip)
	addr := startReferrers(t)
	reg := itRegistry{Addr: addr, Referrers: true}
	img := itPushImage(t, addr, "att", "", "linux/amd64", false, l)
	a := itPushImage(t, addr, "att", "", "linux/amd64", false, att)
	a.Platform = ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	itPushIndex(t, addr, "att", "v1", false, img, a)
	rep := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--all-platforms", addr+"/att:v1")
	if len(rep.Platforms) != 1 || rep.Platforms[0].Manifest != img.Desc.Digest {
		t.Errorf("platforms %+v, want the image only", rep.Platforms)
	}
	if n := len(itSociReferrers(t, reg, "att", a.Desc.Digest)); n != 0 {
		t.Errorf("the attestation got %d SOCI indexes", n)
	}
}

// TestCreateSpanSizeChange: zTOCs built with another span size are not
// reused; the image then has one index per span size. The image is named
// by digest.
func TestCreateSpanSizeChange(t *testing.T) {
	l := itGzipLayer(160, 600<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		img := itPushImage(t, reg.Addr, "spans", "", "linux/amd64", false, l)
		ref := reg.Addr + "/spans@" + img.Desc.Digest.String()
		cache := t.TempDir()
		first := itReport(t, "create", "--plain-http", "--cache-dir", cache, "--min-layer-size", "1000", ref)
		second := itReport(t, "create", "--plain-http", "--cache-dir", cache, "--min-layer-size", "1000", "--span-size", "65536", ref)
		if st := itStatuses(second)[l.Desc.Digest]; st != "indexed" {
			t.Errorf("layer with a new span size is %q, want indexed", st)
		}
		if first.Platforms[0].Index == second.Platforms[0].Index {
			t.Fatal("same index for two span sizes")
		}
		subject := img.Desc
		itCheckIndex(t, reg.Addr, "spans", second.Platforms[0].Index, index.V1, &subject, []itWant{{l, 65536}})
		if n := len(itSociReferrers(t, reg, "spans", img.Desc.Digest)); n != 2 {
			t.Errorf("image has %d SOCI indexes, want 2", n)
		}
		third := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--span-size", "65536", ref)
		if st := itStatuses(third)[l.Desc.Digest]; st != "reused" {
			t.Errorf("third run: layer %q, want reused from the registry", st)
		}
	})
}

// TestCreateManyLayers: sixteen layers, one of them twice in the
// manifest, with --concurrency 1 and 3: every position of the manifest
// gets its zTOC, in order, and the repeated layer is built once.
func TestCreateManyLayers(t *testing.T) {
	var layers []itLayer
	for i := range 16 {
		layers = append(layers, itGzipLayer(uint64(200+i), int64(20+i)<<10, itOCIGzip))
	}
	layers = append(layers, layers[3])
	var want []itWant
	for _, l := range layers {
		want = append(want, itWant{l, 64 << 10})
	}
	addr := startReferrers(t)
	img := itPushImage(t, addr, "many", "v1", "linux/amd64", false, layers...)
	for _, c := range []string{"1", "3"} {
		rep := itReport(t, "create", "--plain-http", "--no-cache", "--force", "--min-layer-size", "0", "--span-size", "65536", "--concurrency", c, addr+"/many:v1")
		ls := rep.Platforms[0].Layers
		if len(ls) != 17 || ls[16].Ztoc != ls[3].Ztoc {
			t.Fatalf("--concurrency %s: layers %+v", c, ls)
		}
		subject := img.Desc
		itCheckIndex(t, addr, "many", rep.Platforms[0].Index, index.V1, &subject, want)
	}
}

// TestCreateCacheAcrossRegistries: a zTOC from the local cache is pushed
// to a registry that does not have it yet.
func TestCreateCacheAcrossRegistries(t *testing.T) {
	l := itGzipLayer(170, 300<<10, itOCIGzip)
	one := registrytest.StartDistribution(t)
	two := registrytest.StartReferrersRegistry(t)
	cache := t.TempDir()
	itPushImage(t, one, "app", "v1", "linux/amd64", false, l)
	img := itPushImage(t, two, "app", "v1", "linux/amd64", false, l)
	itReport(t, "create", "--plain-http", "--cache-dir", cache, "--min-layer-size", "1000", one+"/app:v1")
	rep := itReport(t, "create", "--plain-http", "--cache-dir", cache, "--min-layer-size", "1000", two+"/app:v1")
	if ls := rep.Platforms[0].Layers; ls[0].Status != "reused" || !strings.Contains(ls[0].Reason, "cache") {
		t.Errorf("second registry: layer %+v, want reused from the local cache", ls[0])
	}
	subject := img.Desc
	itCheckIndex(t, two, "app", rep.Platforms[0].Index, index.V1, &subject, []itWant{{l, ztoc.DefaultSpanSize}})
}

// TestCreateDockerManifestList indexes both platforms of a Docker
// manifest list.
func TestCreateDockerManifestList(t *testing.T) {
	amd := itGzipLayer(180, 120<<10, itDockerGzip)
	arm := itGzipLayer(181, 130<<10, itDockerGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		a := itPushImage(t, reg.Addr, "dlist", "", "linux/amd64", true, amd)
		b := itPushImage(t, reg.Addr, "dlist", "", "linux/arm64", true, arm)
		itPushIndex(t, reg.Addr, "dlist", "v1", true, a, b)
		rep := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--all-platforms", reg.Addr+"/dlist:v1")
		if len(rep.Platforms) != 2 {
			t.Fatalf("platforms %+v", rep.Platforms)
		}
		for i, im := range []itImage{a, b} {
			subject := im.Desc
			itCheckIndex(t, reg.Addr, "dlist", rep.Platforms[i].Index, index.V1, &subject, []itWant{{im.Layers[0], ztoc.DefaultSpanSize}})
			if refs := itSociReferrers(t, reg, "dlist", im.Desc.Digest); len(refs) != 1 || refs[0].Digest != rep.Platforms[i].Index {
				t.Errorf("%s: referrers %+v", rep.Platforms[i].Platform, refs)
			}
		}
	})
}
