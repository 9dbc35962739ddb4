package soci_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// attachOpts index the test images: every layer, small spans.
var attachOpts = soci.Options{MinLayerSize: 1000, SpanSize: packSpanSize}

func tryAttach(t *testing.T, r *registry.Repository, opts soci.AttachOptions) (*soci.AttachResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return soci.Attach(ctx, r, opts)
}

func attach(t *testing.T, r *registry.Repository, opts soci.AttachOptions) *soci.AttachResult {
	t.Helper()
	start := time.Now()
	res, err := tryAttach(t, r, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attach %s to %s: %s", opts.Name, r.Name(), time.Since(start).Round(time.Millisecond))
	for _, n := range res.Notes {
		t.Logf("attach: %s", n)
	}
	return res
}

// numSpans returns the span count of layer l's zTOC in index ix.
func numSpans(t *testing.T, addr, repo string, ix *index.Index, l socitest.Layer) int {
	t.Helper()
	zd, ok := ix.Ztoc(l.Desc.Digest)
	if !ok {
		t.Fatalf("layer %s not indexed", l.Desc.Digest)
	}
	return socitest.FetchZtoc(t, addr, repo, zd).NumSpans()
}

// checkPrefetches checks the prefetch artifacts of index ix named name:
// one per layer of want, each readable by SOCI's rules, each giving back
// its order.
func checkPrefetches(t *testing.T, addr string, r *registry.Repository, ix *index.Index, name string, want []soci.LayerSpans) {
	t.Helper()
	n := 0
	for _, p := range ix.Prefetches {
		if p.Name == name {
			n++
		}
	}
	if n != len(want) {
		t.Errorf("index has %d prefetch artifacts named %q, want %d", n, name, len(want))
	}
	for _, w := range want {
		p, ok := ix.Prefetch(name, w.Layer)
		if !ok {
			t.Errorf("no prefetch artifact %q for layer %s", name, w.Layer)
			continue
		}
		socitest.CheckPrefetchBlob(t, socitest.Blob(t, addr, strings.SplitN(r.Name(), "/", 2)[1], p.Blob.Digest))
		ids, err := soci.LoadPrefetch(context.Background(), r, ix, w.Layer, name, 1000)
		if err != nil || !slices.Equal(ids, w.Spans) {
			t.Errorf("LoadPrefetch(%q, %s) = %v, %v; want %v", name, w.Layer, ids, err, w.Spans)
		}
	}
}

// fetchIndex fetches and parses an index.
func fetchIndex(t *testing.T, r *registry.Repository, d digest.Digest) *index.Index {
	t.Helper()
	ix, _, err := soci.FetchIndex(context.Background(), r, ocispec.Descriptor{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	return ix
}

// nonPrefetch returns an index's descriptors other than prefetch ones.
func nonPrefetch(ix *index.Index) []ocispec.Descriptor {
	return slices.DeleteFunc(slices.Clone(ix.Manifest.Layers), func(d ocispec.Descriptor) bool { return d.MediaType == index.MediaTypePrefetch })
}

// TestAttachV1 attaches records to an image with a SOCI index v1: each
// attach pushes a new referrer with the same zTOCs and packs (no layer is
// read) that supersedes the previous one, so discovery sees only the
// newest; names accumulate, a name attached again is replaced.
func TestAttachV1(t *testing.T) {
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		proxy := socitest.StartProxy(t, reg.Addr)
		layers := packLayers()
		img := socitest.PushImage(t, proxy.Addr, "app", "v1", socitest.DefaultPlatform(), false, layers...)
		old := create(t, proxy.Addr+"/app:v1", attachOpts).Platforms[0].Index
		r := repo(t, proxy.Addr+"/app:v1")
		oldIx := fetchIndex(t, r, old.Digest)
		if n := numSpans(t, proxy.Addr, "app", oldIx, layers[0]); n < 5 {
			t.Fatalf("layer 0 has %d spans; the test needs 5", n)
		}
		before := len(proxy.Requests())

		web := []soci.LayerSpans{{Layer: layers[0].Desc.Digest, Spans: []ztoc.SpanID{3, 4, 0}}, {Layer: layers[1].Desc.Digest, Spans: []ztoc.SpanID{2, 1}}}
		res := attach(t, r, soci.AttachOptions{Name: "web", Layers: web, Manifest: img.Desc.Digest})
		if res.Version != index.V1 || res.Previous.Digest != old.Digest || res.Image.Digest != "" || res.Manifest.Digest != img.Desc.Digest {
			t.Fatalf("attach result %+v", res)
		}
		if len(res.Prefetches) != 2 || res.Prefetches[0].Ranges != 2 || res.Prefetches[0].Spans != 3 || res.Prefetches[1].Ranges != 2 || res.Prefetches[1].Spans != 2 {
			t.Fatalf("prefetches %+v", res.Prefetches)
		}
		for _, req := range proxy.Requests()[before:] {
			for _, l := range layers {
				if strings.HasPrefix(req, "GET /v2/app/blobs/"+l.Desc.Digest.String()) {
					t.Errorf("attach read layer %s: %s", l.Desc.Digest, req)
				}
			}
		}
		socitest.CheckIndex(t, proxy.Addr, "app", res.Index.Digest, index.V1, &img.Desc, packWant(layers))
		ix := fetchIndex(t, r, res.Index.Digest)
		if !slices.EqualFunc(nonPrefetch(ix), nonPrefetch(oldIx), func(a, b ocispec.Descriptor) bool { return a.Digest == b.Digest && a.Size == b.Size }) {
			t.Errorf("the new index does not list the old zTOCs and packs")
		}
		if ix.Supersedes() != old.Digest {
			t.Errorf("new index supersedes %q, want %s", ix.Supersedes(), old.Digest)
		}
		checkPrefetches(t, proxy.Addr, r, ix, "web", web)
		checkDiscovery(t, r, img, res.Index.Digest)

		// A second workload.
		batch := []soci.LayerSpans{{Layer: layers[2].Desc.Digest, Spans: []ztoc.SpanID{0}}}
		res2 := attach(t, r, soci.AttachOptions{Name: "batch", Layers: batch, Manifest: img.Desc.Digest})
		ix2 := fetchIndex(t, r, res2.Index.Digest)
		if names := ix2.PrefetchNames(); !slices.Equal(names, []string{"web", "batch"}) || res2.Previous.Digest != res.Index.Digest {
			t.Fatalf("names %q, previous %s", names, res2.Previous.Digest)
		}
		checkPrefetches(t, proxy.Addr, r, ix2, "web", web)
		checkPrefetches(t, proxy.Addr, r, ix2, "batch", batch)
		checkDiscovery(t, r, img, res2.Index.Digest)

		// The first workload again: replaced, in its place.
		web2 := []soci.LayerSpans{{Layer: layers[0].Desc.Digest, Spans: []ztoc.SpanID{1}}}
		res3 := attach(t, r, soci.AttachOptions{Name: "web", Layers: web2, Manifest: img.Desc.Digest})
		ix3 := fetchIndex(t, r, res3.Index.Digest)
		if names := ix3.PrefetchNames(); !slices.Equal(names, []string{"web", "batch"}) {
			t.Fatalf("names %q", names)
		}
		checkPrefetches(t, proxy.Addr, r, ix3, "web", web2)
		checkPrefetches(t, proxy.Addr, r, ix3, "batch", batch)
		checkDiscovery(t, r, img, res3.Index.Digest)
		socitest.Walk(t, reg, "app")
	})
}

// checkDiscovery checks that the image's only visible index is want.
func checkDiscovery(t *testing.T, r *registry.Repository, img socitest.Image, want digest.Digest) {
	t.Helper()
	ctx := context.Background()
	list, err := soci.List(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Index.Digest != want {
		t.Errorf("List = %+v, want only %s", list, want)
	}
	f, _, err := soci.FindIndex(ctx, r, soci.Image{Descriptor: img.Desc, Bytes: img.Manifest}, soci.DiscoverOptions{})
	if err != nil || f.Index.Digest != want {
		t.Errorf("FindIndex = %s, %v; want %s", f.Index.Digest, err, want)
	}
}

// TestAttachV2 attaches records to a SOCI-enabled image: a new index v2,
// a rewritten manifest naming it and a new image index under the same
// tag. A second record made with the previous manifest (same layers) is
// accepted; one made with an image of other layers is not, unless forced.
func TestAttachV2(t *testing.T) {
	addr := registrytest.StartDistribution(t)
	layers := packLayers()
	src := socitest.PushImage(t, addr, "app", "src", socitest.DefaultPlatform(), false, layers...)
	convert(t, addr+"/app:src", addr+"/app:soci", attachOpts)
	oldRaw, _, _ := socitest.Manifest(t, addr, "app", "soci")
	var oldIdx ocispec.Index
	if err := json.Unmarshal(oldRaw, &oldIdx); err != nil {
		t.Fatal(err)
	}
	recorded := oldIdx.Manifests[0].Digest // the manifest a node ran
	r := repo(t, addr+"/app:soci")

	web := []soci.LayerSpans{{Layer: layers[0].Desc.Digest, Spans: []ztoc.SpanID{2, 0, 1}}}
	res := attach(t, r, soci.AttachOptions{Name: "web", Layers: web, Manifest: recorded})
	if res.Version != index.V2 || res.Previous.Digest != oldIdx.Manifests[1].Digest || res.Image.Digest == "" || res.Image.Digest == digest.FromBytes(oldRaw) {
		t.Fatalf("attach result %+v", res)
	}
	idx := socitest.CheckConverted(t, addr, "app", "soci", []socitest.Image{src}, [][]socitest.Want{packWant(layers)})
	if newRaw, _, _ := socitest.Manifest(t, addr, "app", "soci"); digest.FromBytes(newRaw) != res.Image.Digest {
		t.Fatalf("tag soci is not the new image %s", res.Image.Digest)
	}
	if idx.Manifests[0].Digest != res.Manifest.Digest || idx.Manifests[1].Digest != res.Index.Digest {
		t.Fatalf("image index %+v, result %+v", idx.Manifests, res)
	}
	mb, _, _ := socitest.Manifest(t, addr, "app", res.Manifest.Digest.String())
	f, ix, err := soci.FindIndex(context.Background(), r, soci.Image{Descriptor: res.Manifest, Bytes: mb}, soci.DiscoverOptions{})
	if err != nil || f.Index.Digest != res.Index.Digest {
		t.Fatalf("FindIndex of the new manifest = %s, %v", f.Index.Digest, err)
	}
	checkPrefetches(t, addr, r, ix, "web", web)

	// A record of the previous manifest: same layers, accepted.
	batch := []soci.LayerSpans{{Layer: layers[1].Desc.Digest, Spans: []ztoc.SpanID{1}}}
	res2 := attach(t, r, soci.AttachOptions{Name: "batch", Layers: batch, Manifest: recorded})
	if len(res2.Notes) != 1 || !strings.Contains(res2.Notes[0], "same layers") {
		t.Fatalf("notes %q", res2.Notes)
	}
	ix2 := fetchIndex(t, r, res2.Index.Digest)
	checkPrefetches(t, addr, r, ix2, "web", web)
	checkPrefetches(t, addr, r, ix2, "batch", batch)
	socitest.CheckConverted(t, addr, "app", "soci", []socitest.Image{src}, [][]socitest.Want{packWant(layers)})

	// A record of an image with other layers.
	other := socitest.PushImage(t, addr, "app", "other", socitest.DefaultPlatform(), false, socitest.GzipLayer(99, 50<<10, socitest.OCIGzip))
	if _, err := tryAttach(t, r, soci.AttachOptions{Name: "web", Layers: web, Manifest: other.Desc.Digest}); err == nil || !strings.Contains(err.Error(), "the record is for image manifest "+other.Desc.Digest.String()) {
		t.Fatalf("record of another image: %v", err)
	}
	res3 := attach(t, r, soci.AttachOptions{Name: "web", Layers: web, Manifest: other.Desc.Digest, Force: true})
	if len(res3.Notes) != 1 || !strings.Contains(res3.Notes[0], "force") {
		t.Fatalf("notes %q", res3.Notes)
	}
	socitest.Walk(t, socitest.Registry{Addr: addr}, "app")
}

// TestAttachRefused: records that cannot be right are refused before
// anything is pushed.
func TestAttachRefused(t *testing.T) {
	addr := registrytest.StartDistribution(t)
	layers := packLayers()
	img := socitest.PushImage(t, addr, "app", "v1", socitest.DefaultPlatform(), false, layers...)
	// The small third layer is left unindexed.
	idx := create(t, addr+"/app:v1", soci.Options{MinLayerSize: 200 << 10, SpanSize: packSpanSize}).Platforms[0].Index
	r := repo(t, addr+"/app:v1")
	n0 := numSpans(t, addr, "app", fetchIndex(t, r, idx.Digest), layers[0])
	l0 := layers[0].Desc.Digest
	for _, tc := range []struct {
		name string
		opts soci.AttachOptions
		want string
	}{
		{"beyond the layer", soci.AttachOptions{Layers: []soci.LayerSpans{{Layer: l0, Spans: []ztoc.SpanID{0, ztoc.SpanID(n0)}}}},
			"span " + itoa(n0) + " is beyond the layer's " + itoa(n0) + " spans"},
		{"not in the image", soci.AttachOptions{Layers: []soci.LayerSpans{{Layer: digest.FromString("x"), Spans: []ztoc.SpanID{0}}}},
			"is not a layer of image manifest " + img.Desc.Digest.String()},
		{"not indexed", soci.AttachOptions{Layers: []soci.LayerSpans{{Layer: layers[2].Desc.Digest, Spans: []ztoc.SpanID{0}}}},
			"has no zTOC in SOCI index " + idx.Digest.String()},
		{"empty", soci.AttachOptions{Layers: []soci.LayerSpans{{Layer: l0}}}, "the record is empty"},
		{"nothing", soci.AttachOptions{}, "the record is empty"},
		{"bad name", soci.AttachOptions{Name: "a b", Layers: []soci.LayerSpans{{Layer: l0, Spans: []ztoc.SpanID{0}}}}, "prefetch name"},
		{"record and files", soci.AttachOptions{Layers: []soci.LayerSpans{{Layer: l0, Spans: []ztoc.SpanID{0}}}, Files: []string{"/x"}}, "exclude each other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.opts.Name == "" {
				tc.opts.Name = "default"
			}
			if _, err := tryAttach(t, r, tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Attach = %v, want %q", err, tc.want)
			}
		})
	}
	if list, err := soci.List(context.Background(), r); err != nil || len(list) != 1 || list[0].Index.Digest != idx.Digest {
		t.Fatalf("after refusals: %+v %v", list, err)
	}
	socitest.PushImage(t, addr, "plain", "1", socitest.DefaultPlatform(), false, layers[2])
	if _, err := tryAttach(t, repo(t, addr+"/plain:1"), soci.AttachOptions{Name: "default", Layers: []soci.LayerSpans{{Layer: layers[2].Desc.Digest, Spans: []ztoc.SpanID{0}}}}); err == nil || !strings.Contains(err.Error(), "has no SOCI index") {
		t.Fatalf("image without index: %v", err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// fileLayer builds a gzip layer of tar entries (regular files when data
// is set, else what the header says).
func fileLayer(t *testing.T, entries []tar.Header, data map[string][]byte) socitest.Layer {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	files := map[string][]byte{}
	for _, h := range entries {
		h.Mode, h.Format = 0o644, tar.FormatPAX
		if b, ok := data[h.Name]; ok {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(b))
			files[h.Name] = b
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		tw.Write(data[h.Name])
	}
	tw.Close()
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	zw.Write(raw.Bytes())
	zw.Close()
	return socitest.NewLayer(socitest.OCIGzip, gz.Bytes(), digest.FromBytes(raw.Bytes()), files)
}

func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// TestAttachFiles attaches a SOCI-style file list: each path in the
// top-most layer that has it, unless deleted or hidden above; its tar
// header and data spans, in list order.
func TestAttachFiles(t *testing.T) {
	addr := registrytest.StartDistribution(t)
	dir := func(n string) tar.Header { return tar.Header{Name: n, Typeflag: tar.TypeDir} }
	reg := func(n string) tar.Header { return tar.Header{Name: n} }
	bottom := fileLayer(t, []tar.Header{dir("app/"), reg("app/big.bin"), reg("app/lib.so"),
		{Name: "app/hl", Typeflag: tar.TypeLink, Linkname: "app/big.bin"}, dir("etc/"), reg("etc/conf"), dir("data/"), reg("data/x")},
		map[string][]byte{"app/big.bin": randomBytes(1, 400<<10), "app/lib.so": randomBytes(2, 200<<10), "etc/conf": []byte("c"), "data/x": []byte("x")})
	top := fileLayer(t, []tar.Header{dir("app/"), reg("app/lib.so"), dir("data/"), reg("data/.wh..wh..opq"), dir("etc/"), reg("etc/.wh.conf")},
		map[string][]byte{"app/lib.so": randomBytes(3, 100<<10), "data/.wh..wh..opq": {}, "etc/.wh.conf": {}})
	socitest.PushImage(t, addr, "app", "v1", socitest.DefaultPlatform(), false, bottom, top)
	idx := create(t, addr+"/app:v1", attachOpts).Platforms[0].Index
	r := repo(t, addr+"/app:v1")

	_, err := tryAttach(t, r, soci.AttachOptions{Name: "default", Files: []string{"/etc/conf", "/data/x", "/nope", "/app", "/app/lib.so"}})
	for _, want := range []string{"4 of 5 listed files", "/etc/conf: deleted by a whiteout in layer " + top.Desc.Digest.String(),
		"/data/x: hidden by opaque directory /data", "/nope: no indexed layer has it", "/app: a dir in layer"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Attach error %v, want %q", err, want)
		}
	}

	res := attach(t, r, soci.AttachOptions{Name: "default", Files: []string{"/app/lib.so", "app/big.bin", "/app/hl"}})
	ix := fetchIndex(t, r, res.Index.Digest)
	// Oracle: big.bin's single header block and its data.
	zd, _ := ix.Ztoc(bottom.Desc.Digest)
	z := socitest.FetchZtoc(t, addr, "app", zd)
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	big, err := z.Lookup("app/big.bin")
	if err != nil {
		t.Fatal(err)
	}
	first, _ := ztoc.SpanForOffset(spans, big.UncompressedOffset-512)
	last, _ := ztoc.SpanForOffset(spans, big.UncompressedOffset+big.UncompressedSize-1)
	var bigSpans []ztoc.SpanID
	for id := first; id <= last; id++ {
		bigSpans = append(bigSpans, id)
	}
	if len(bigSpans) < 3 {
		t.Fatalf("big.bin covers spans %v; the test needs several", bigSpans)
	}
	checkPrefetches(t, addr, r, ix, "default", []soci.LayerSpans{
		{Layer: bottom.Desc.Digest, Spans: bigSpans},
		{Layer: top.Desc.Digest, Spans: []ztoc.SpanID{0}},
	})
	if res.Previous.Digest != idx.Digest {
		t.Fatalf("previous %s, want %s", res.Previous.Digest, idx.Digest)
	}
}

// TestLoadPrefetchErrors: a prefetch artifact that is corrupt in transit,
// of another version, empty or past the layer fails to load with an error
// that says so; a missing name is ErrNoPrefetch.
func TestLoadPrefetchErrors(t *testing.T) {
	up := registrytest.StartDistribution(t)
	proxy := socitest.StartProxy(t, up)
	layers := packLayers()
	socitest.PushImage(t, proxy.Addr, "app", "v1", socitest.DefaultPlatform(), false, layers...)
	idx := create(t, proxy.Addr+"/app:v1", attachOpts).Platforms[0].Index
	r := repo(t, proxy.Addr+"/app:v1")
	ctx := context.Background()
	old := fetchIndex(t, r, idx.Digest)
	l0 := layers[0].Desc.Digest
	blobs := map[string]string{
		"good":   `{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":2}]}`,
		"v2":     `{"version":"2.0","prefetch_spans":[{"start_span":1,"end_span":2}]}`,
		"empty":  `{"version":"1.0","prefetch_spans":[]}`,
		"beyond": `{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":99}]}`,
		"junk":   `{"version":`,
	}
	var ps []index.Prefetch
	for _, name := range []string{"good", "v2", "empty", "beyond", "junk"} {
		d, err := r.PushBlobBytes(ctx, index.MediaTypePrefetch, []byte(blobs[name]))
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, index.Prefetch{LayerDigest: l0, Name: name, Blob: d})
	}
	built, err := index.Build(index.BuildOptions{Version: index.V1, Subject: old.Subject(), Layers: old.Layers, Packs: old.Packs, Prefetches: ps})
	if err != nil {
		t.Fatal(err)
	}
	ix, err := index.Parse(built.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if ids, err := soci.LoadPrefetch(ctx, r, ix, l0, "good", 10); err != nil || !slices.Equal(ids, []ztoc.SpanID{1, 2}) {
		t.Fatalf("good: %v %v", ids, err)
	}
	for name, want := range map[string]string{"v2": `version "2.0"`, "empty": "no spans", "beyond": "beyond the layer's 10 spans", "junk": "unexpected end"} {
		if _, err := soci.LoadPrefetch(ctx, r, ix, l0, name, 10); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), l0.String()) {
			t.Errorf("%s: %v, want %q and the layer", name, err, want)
		}
	}
	if _, err := soci.LoadPrefetch(ctx, r, ix, l0, "missing", 10); !errors.Is(err, soci.ErrNoPrefetch) {
		t.Errorf("missing name: %v", err)
	}
	proxy.Corrupt(ps[0].Blob.Digest, 5)
	if _, err := soci.LoadPrefetch(ctx, r, ix, l0, "good", 10); err == nil || !strings.Contains(err.Error(), "digest") {
		t.Errorf("corrupt blob: %v", err)
	}
}
