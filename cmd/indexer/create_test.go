package main

// The create command's output, flags and exit status. What create does in
// the registry is tested on the engine, in package soci.

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
)

// TestCreateOutput checks create's text output: a line per layer as it
// finishes (indexed; reused, from the registry or the local cache; skipped,
// with the reason worded with the flag) and a line per index pushed.
func TestCreateOutput(t *testing.T) {
	layers := socitest.LayerKinds()
	addr := startReferrers(t)
	img := socitest.PushImage(t, addr, "kinds", "v1", "linux/amd64", false, layers...)
	cache := t.TempDir()
	args := []string{"create", "--plain-http", "--cache-dir", cache, "--min-layer-size", "200000", "--span-size", fmt.Sprint(128 << 10)}
	out := itMustRun(t, append(args, addr+"/kinds:v1")...)
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
	if out.Stderr != "" {
		t.Errorf("stderr (not a terminal: no progress line): %q", out.Stderr)
	}

	// Again: only reused lines, the zTOCs being in the registry.
	out = itMustRun(t, append(args, addr+"/kinds:v1")...)
	for _, i := range []int{0, 3, 5} {
		if l := itLineOf(out.Stdout, layers[i].Desc.Digest); !itHasLine(out.Stdout, "reused", layers[i].Desc.Digest) || !strings.Contains(l, "zTOC already in the registry") {
			t.Errorf("re-run, layer %d: want a reused line from the registry, got %q", i, l)
		}
	}
	if strings.Contains(out.Stdout, "indexed  ") {
		t.Errorf("re-run, want only reused lines:\n%s", out.Stdout)
	}
	// --force (one layer at a time) indexes them again.
	out = itMustRun(t, append(args, "--force", "--concurrency", "1", addr+"/kinds:v1")...)
	for _, i := range []int{0, 3, 5} {
		if !itHasLine(out.Stdout, "indexed", layers[i].Desc.Digest) {
			t.Errorf("--force, layer %d: no indexed line:\n%s", i, out.Stdout)
		}
	}
	// The same image in another repository: the zTOCs come from the cache.
	socitest.PushImage(t, addr, "other", "v1", "linux/amd64", false, layers...)
	out = itMustRun(t, append(args, addr+"/other:v1")...)
	if l := itLineOf(out.Stdout, layers[0].Desc.Digest); !itHasLine(out.Stdout, "reused", layers[0].Desc.Digest) || !strings.Contains(l, "zTOC from the local cache") {
		t.Errorf("other repository: want a reused line from the local cache, got %q", l)
	}
	// --no-cache: the reason of a reused layer in the report names the
	// registry.
	rep := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "200000", "--span-size", fmt.Sprint(128<<10), addr+"/kinds:v1")
	for _, l := range rep.Platforms[0].Layers {
		if l.Status == "reused" && !strings.Contains(l.Reason, "registry") {
			t.Errorf("--no-cache: layer %s reused because %q, want the registry", short(l.Digest), l.Reason)
		}
	}

}

// TestCreateOutputUnknownPlatform: a single-manifest image whose config
// names no platform is indexed "for unknown".
func TestCreateOutputUnknownPlatform(t *testing.T) {
	l := socitest.GzipLayer(1, 100<<10, socitest.OCIGzip)
	addr := startReferrers(t)
	cfg := []byte("this is not an image config")
	registrytest.PushBlob(t, addr, "bad", cfg)
	registrytest.PushBlob(t, addr, "bad", l.Data)
	bm := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
		Layers: []ocispec.Descriptor{l.Desc}}
	bm.SchemaVersion = 2
	mb, _ := json.Marshal(bm)
	registrytest.PushManifest(t, addr, "bad", "config", bm.MediaType, mb)
	if out := itMustRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "0", addr+"/bad:config"); !strings.Contains(out.Stdout, "for unknown") {
		t.Errorf("image whose config is not JSON:\n%s", out.Stdout)
	}
}

// TestCreateDefaults runs create with the default --min-layer-size (10
// MiB) and span size, and checks --json and -q output.
func TestCreateDefaults(t *testing.T) {
	big := socitest.GzipLayer(10, 11<<20+300<<10, socitest.OCIGzip)
	small := socitest.GzipLayer(11, 2<<20, socitest.OCIGzip)
	addr := startReferrers(t)
	img := socitest.PushImage(t, addr, "defaults", "latest", "linux/amd64", false, small, big)
	cache := t.TempDir()
	rep := itReport(t, "create", "--plain-http", "--cache-dir", cache, addr+"/defaults")
	if rep.Image != addr+"/defaults" || len(rep.Platforms) != 1 {
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
	if l1.Digest != big.Desc.Digest || l1.Status != "indexed" || l1.Ztoc.Validate() != nil || l1.ZtocSize <= 0 || l1.Spans != 11 || // 11.3 MiB at 1 MiB spans
		l1.Size != big.Desc.Size || l1.MediaType != socitest.OCIGzip || l1.Seconds <= 0 {
		t.Errorf("big layer: %+v", l1)
	}
	subject := img.Desc
	m := socitest.CheckIndex(t, addr, "defaults", p.Index, index.V1, &subject, []socitest.Want{{Layer: big, SpanSize: soci.DefaultSpanSize}})
	if m.Layers[0].Digest != l1.Ztoc || m.Layers[0].Size != l1.ZtocSize {
		t.Errorf("report names zTOC %s (%d bytes), index has %+v", l1.Ztoc, l1.ZtocSize, m.Layers[0])
	}

	// -q: the index digest alone (the layers are reused this time).
	out := itMustRun(t, "create", "--plain-http", "--cache-dir", cache, "-q", addr+"/defaults:latest")
	if out.Stdout != p.Index.String()+"\n" || out.Stderr != "" {
		t.Errorf("-q printed %q (stderr %q), want %q", out.Stdout, out.Stderr, p.Index.String()+"\n")
	}
}

// TestCreateReportJSON checks the --json report's shape with the generic
// decoder too, so field names are pinned.
func TestCreateReportJSON(t *testing.T) {
	l := socitest.GzipLayer(60, 100<<10, socitest.OCIGzip)
	z := socitest.ZstdLayer(61, 1000)
	addr := startReferrers(t)
	socitest.PushImage(t, addr, "json", "v1", "linux/amd64", false, l, z)
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

// TestCreatePartialFailure: when one platform of an index fails, the
// others still get their index, printed, and the command fails naming the
// failed platform.
func TestCreatePartialFailure(t *testing.T) {
	amd := socitest.GzipLayer(140, 150<<10, socitest.OCIGzip)
	arm := socitest.GzipLayer(141, 150<<10, socitest.OCIGzip)
	addr := startReferrers(t)
	socitest.PushMultiPlatform(t, addr, "partial", "v1", false, []socitest.Layer{amd}, []socitest.Layer{arm})
	proxy := socitest.StartProxy(t, addr)
	proxy.Corrupt(arm.Desc.Digest, 100)
	out := itRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--all-platforms", proxy.Addr+"/partial:v1")
	if out.Err == nil || !strings.Contains(out.Err.Error(), "1 of 2 platforms failed") || !strings.Contains(out.Err.Error(), "linux/arm64") {
		t.Errorf("err %v, want one naming the failed platform", out.Err)
	}
	if m := itIndexLine.FindAllStringSubmatch(out.Stdout, -1); len(m) != 1 || m[0][3] != "linux/amd64" {
		t.Errorf("index lines %q, want linux/amd64 only", m)
	}
}

// TestCreateFlags: flags that make no sense, or select nothing, fail the
// command with an error naming them.
func TestCreateFlags(t *testing.T) {
	addr := startReferrers(t)
	socitest.PushImage(t, addr, "flags", "v1", "linux/amd64", false, socitest.GzipLayer(40, 50<<10, socitest.OCIGzip))
	ref := addr + "/flags:v1"
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--span-size", "0"}, "--span-size"},
		{[]string{"--min-layer-size", "-1"}, "--min-layer-size"},
		{[]string{"-q", "--json"}, "--json"},
		{[]string{"--platform", "not/a/plat/form"}, "--platform"},
		{[]string{"--platform", "linux/s390x"}, "linux/s390x"},
	} {
		out := itRun(t, append(append([]string{"create", "--plain-http", "--no-cache"}, c.args...), ref)...)
		if out.Err == nil || !strings.Contains(out.Err.Error(), c.want) {
			t.Errorf("create %s: err %v, want one naming %q", strings.Join(c.args, " "), out.Err, c.want)
		}
	}
	if out := itRun(t, "create", "--plain-http", addr+"/flags:missing"); out.Err == nil || !strings.Contains(out.Err.Error(), "not found") {
		t.Errorf("missing tag: %v", out.Err)
	}
}
