package index

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Fixed inputs shared by the tests; digests of small literal strings so the
// golden files can be checked by hand.
var (
	layer1 = digest.FromString("layer1")
	layer2 = digest.FromString("layer2")
	ztoc1  = digest.FromString("ztoc1")
	ztoc2  = digest.FromString("ztoc2")
	image  = digest.FromString("image-manifest")
)

func testSubject() *ocispec.Descriptor {
	return &ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageManifest,
		Digest:    image,
		Size:      1234,
		// Must not be copied into the index.
		Platform:    &ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Annotations: map[string]string{"x": "y"},
	}
}

func testLayers() []Layer {
	return []Layer{
		{LayerDigest: layer1, LayerMediaType: ocispec.MediaTypeImageLayerGzip, SpanSize: 4 << 20,
			Ztoc: ocispec.Descriptor{Digest: ztoc1, Size: 1000}},
		{LayerDigest: layer2, LayerMediaType: "application/vnd.docker.image.rootfs.diff.tar.gzip",
			Ztoc: ocispec.Descriptor{Digest: ztoc2, Size: 2000}, DisableXattrs: true},
	}
}

func TestEmptyConfigDigest(t *testing.T) {
	if got := digest.FromString(EmptyConfigData); got != EmptyConfigDigest || len(EmptyConfigData) != EmptyConfigSize {
		t.Fatalf("digest of %q = %s, constant %s", EmptyConfigData, got, EmptyConfigDigest)
	}
	if ocispec.DescriptorEmptyJSON.Digest != EmptyConfigDigest {
		t.Fatalf("image-spec empty JSON digest %s != %s", ocispec.DescriptorEmptyJSON.Digest, EmptyConfigDigest)
	}
}

// The index bytes must equal encoding/json of the equivalent ocispec.Manifest
// written out by hand here (not via Build), since SOCI's runtime re-marshals.
func TestBuildV1MatchesOCISpecMarshal(t *testing.T) {
	b, err := Build(BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers(), BuildTool: "AWS SOCI CLI v0.2"})
	if err != nil {
		t.Fatal(err)
	}
	want := ocispec.Manifest{
		MediaType: "application/vnd.oci.image.manifest.v1+json",
		Config: ocispec.Descriptor{
			MediaType: "application/vnd.amazon.soci.index.v1+json",
			Digest:    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
			Size:      2,
		},
		Layers: []ocispec.Descriptor{
			{MediaType: "application/octet-stream", Digest: ztoc1, Size: 1000, Annotations: map[string]string{
				"com.amazon.soci.image-layer-digest":    layer1.String(),
				"com.amazon.soci.image-layer-mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
				"com.amazon.soci.span-size":             "4194304",
			}},
			{MediaType: "application/octet-stream", Digest: ztoc2, Size: 2000, Annotations: map[string]string{
				"com.amazon.soci.image-layer-digest":    layer2.String(),
				"com.amazon.soci.image-layer-mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
				"com.amazon.soci.disable-xattrs":        "true",
			}},
		},
		Subject:     &ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: image, Size: 1234},
		Annotations: map[string]string{"com.amazon.soci.build-tool-identifier": "AWS SOCI CLI v0.2"},
	}
	want.SchemaVersion = 2
	wb, err := json.Marshal(want)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Bytes, wb) {
		t.Fatalf("index bytes differ from json.Marshal(ocispec.Manifest):\n got %s\nwant %s", b.Bytes, wb)
	}
	if b.Descriptor.Digest != digest.FromBytes(wb) || b.Descriptor.Size != int64(len(wb)) ||
		b.Descriptor.MediaType != ocispec.MediaTypeImageManifest || b.Descriptor.ArtifactType != MediaTypeIndexV1 {
		t.Fatalf("descriptor %+v", b.Descriptor)
	}
	if bytes.Contains(b.Bytes, []byte(`"artifactType"`)) {
		t.Fatal("index must not carry a top-level artifactType")
	}
	// Round trip through the same decode+re-marshal SOCI's runtime does.
	var m ocispec.Manifest
	if err := json.Unmarshal(b.Bytes, &m); err != nil {
		t.Fatal(err)
	}
	re, _ := json.Marshal(m)
	if !bytes.Equal(re, b.Bytes) {
		t.Fatal("re-marshaled index differs")
	}
}

// The golden files were written once from Build and checked by hand against
// SOCI-FORMAT.md §1.8/§1.9 (field order schemaVersion, mediaType, config,
// layers, subject, annotations; sorted annotation keys; no artifactType).
// Set SPANPULL_UPDATE_GOLDEN=1 to rewrite them after an intended change.
func TestBuildGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts BuildOptions
	}{
		{"index-v1.golden.json", BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers(), BuildTool: "AWS SOCI CLI v0.2"}},
		{"index-v2.golden.json", BuildOptions{Version: V2, Layers: testLayers(), BuildTool: "AWS SOCI CLI v0.2",
			Prefetches: []Prefetch{{LayerDigest: layer1, Blob: ocispec.Descriptor{Digest: digest.FromString("prefetch"), Size: 77}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Build(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			compareGolden(t, tc.name, b.Bytes)
		})
	}
}

func compareGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if os.Getenv("SPANPULL_UPDATE_GOLDEN") != "" {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s differs:\n got %s\nwant %s", name, got, want)
	}
}

func TestBuildErrors(t *testing.T) {
	bad := func(mut func(*BuildOptions)) BuildOptions {
		o := BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers()}
		mut(&o)
		return o
	}
	for name, tc := range map[string]struct {
		opts BuildOptions
		want string
	}{
		"empty":           {bad(func(o *BuildOptions) { o.Layers = nil }), "no zTOCs"},
		"v1 no subject":   {bad(func(o *BuildOptions) { o.Subject = nil }), "subject"},
		"v2 with subject": {bad(func(o *BuildOptions) { o.Version = V2 }), "no subject"},
		"bad version":     {bad(func(o *BuildOptions) { o.Version = 3 }), "unknown version"},
		"bad layer digest": {bad(func(o *BuildOptions) { o.Layers[0].LayerDigest = "sha256:xyz" }),
			"layer digest"},
		"no layer media type": {bad(func(o *BuildOptions) { o.Layers[1].LayerMediaType = "" }), "media type"},
		"bad ztoc digest":     {bad(func(o *BuildOptions) { o.Layers[0].Ztoc.Digest = "" }), "ztoc"},
		"zero ztoc size":      {bad(func(o *BuildOptions) { o.Layers[0].Ztoc.Size = 0 }), "size"},
		"negative span":       {bad(func(o *BuildOptions) { o.Layers[0].SpanSize = -1 }), "span size"},
		"subject digest":      {bad(func(o *BuildOptions) { o.Subject.Digest = "md5:00" }), "subject"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Build(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want containing %q", err, tc.want)
			}
		})
	}
	_, err := Build(BuildOptions{Version: V2})
	if !errors.Is(err, ErrEmptyIndex) {
		t.Fatalf("empty v2: err = %v, want ErrEmptyIndex", err)
	}
}

func TestParseRoundTrip(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		opts := BuildOptions{Version: v, Layers: testLayers()}
		if v == V1 {
			opts.Subject = testSubject()
		}
		b, err := Build(opts)
		if err != nil {
			t.Fatal(err)
		}
		ix, err := Parse(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if ix.Version != v || !ix.Canonical || len(ix.Layers) != 2 {
			t.Fatalf("%s: version %s canonical %v layers %d", v, ix.Version, ix.Canonical, len(ix.Layers))
		}
		if (ix.Subject() != nil) != (v == V1) {
			t.Fatalf("%s: subject %v", v, ix.Subject())
		}
		if ix.BuildTool() == "" {
			t.Fatal("no build tool")
		}
		d, ok := ix.Ztoc(layer2)
		if !ok || d.Digest != ztoc2 || d.Size != 2000 {
			t.Fatalf("Ztoc(layer2) = %v %v", d, ok)
		}
		if l, _ := ix.Layer(layer2); !l.DisableXattrs || l.LayerMediaType != "application/vnd.docker.image.rootfs.diff.tar.gzip" {
			t.Fatalf("Layer(layer2) = %+v", l)
		}
		if s, ok := ix.SpanSize(layer1); !ok || s != 4<<20 {
			t.Fatalf("SpanSize(layer1) = %d %v", s, ok)
		}
		if _, ok := ix.SpanSize(layer2); ok {
			t.Fatal("layer2 has no span size annotation")
		}
		if _, ok := ix.Ztoc(digest.FromString("other")); ok {
			t.Fatal("unindexed layer found")
		}
	}
}

func TestParseGolden(t *testing.T) {
	b, err := os.ReadFile("testdata/index-v2.golden.json")
	if err != nil {
		t.Fatal(err)
	}
	ix, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if ix.Version != V2 || len(ix.Prefetches) != 1 || ix.Prefetches[0].LayerDigest != layer1 || !ix.Canonical {
		t.Fatalf("parsed %+v", ix)
	}
	// Non-canonical (indented) bytes parse but are flagged.
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		t.Fatal(err)
	}
	ix, err = Parse(buf.Bytes())
	if err != nil || ix.Canonical {
		t.Fatalf("indented: %v canonical=%v", err, ix != nil && ix.Canonical)
	}
}

func TestParseErrors(t *testing.T) {
	good, err := Build(BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers()})
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good.Bytes, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	layer := func(m map[string]any, i int) map[string]any { return m["layers"].([]any)[i].(map[string]any) }
	for name, tc := range map[string]struct {
		in   []byte
		want string
	}{
		"not json":       {[]byte("{"), "unexpected end"},
		"empty input":    {nil, "unexpected end"},
		"json array":     {[]byte("[]"), "cannot unmarshal"},
		"schema 1":       {edit(func(m map[string]any) { m["schemaVersion"] = 1 }), "schemaVersion"},
		"index type":     {edit(func(m map[string]any) { m["mediaType"] = ocispec.MediaTypeImageIndex }), "not an OCI image manifest"},
		"image config":   {edit(func(m map[string]any) { m["config"].(map[string]any)["mediaType"] = ocispec.MediaTypeImageConfig }), "not a SOCI index artifact type"},
		"no layers":      {edit(func(m map[string]any) { m["layers"] = []any{} }), "no zTOCs"},
		"bad ztoc dgst":  {edit(func(m map[string]any) { layer(m, 0)["digest"] = "sha256:1234" }), "digest"},
		"neg size":       {edit(func(m map[string]any) { layer(m, 0)["size"] = -5 }), "invalid size"},
		"no layer annot": {edit(func(m map[string]any) { delete(layer(m, 1), "annotations") }), "no com.amazon.soci.image-layer-digest"},
		"bad layer dgst": {edit(func(m map[string]any) {
			layer(m, 1)["annotations"].(map[string]any)[AnnotationImageLayerDigest] = "sha256:zz"
		}), "layer digest"},
		"bad span size": {edit(func(m map[string]any) {
			layer(m, 0)["annotations"].(map[string]any)[AnnotationSpanSize] = "4MiB"
		}), "bad com.amazon.soci.span-size"},
		"bad subject":   {edit(func(m map[string]any) { m["subject"].(map[string]any)["digest"] = "x" }), "subject"},
		"config digest": {edit(func(m map[string]any) { m["config"].(map[string]any)["digest"] = "" }), "config digest"},
		"too big":       {make([]byte, MaxIndexSize+1), "exceeds"},
	} {
		t.Run(name, func(t *testing.T) {
			ix, err := Parse(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Parse = %v, %v; want error containing %q", ix, err, tc.want)
			}
		})
	}
}

// FuzzParseIndex checks that Parse never panics and that whatever it accepts
// is self-consistent: every zTOC is findable by its layer digest, every
// pack describes a zTOC listed for its layer, and a canonical index
// re-marshals to the same bytes.
func FuzzParseIndex(f *testing.F) {
	for _, name := range []string{"index-v1.golden.json", "index-v2.golden.json", "index-v1-packs.golden.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := Parse(b)
		if err != nil {
			return
		}
		if ix.Version != V1 && ix.Version != V2 {
			t.Fatalf("accepted version %v", ix.Version)
		}
		if len(ix.Layers) == 0 {
			t.Fatal("accepted an index without zTOCs")
		}
		for _, l := range ix.Layers {
			if err := l.LayerDigest.Validate(); err != nil {
				t.Fatalf("accepted bad layer digest: %v", err)
			}
			if _, ok := ix.Ztoc(l.LayerDigest); !ok {
				t.Fatalf("layer %s not found", l.LayerDigest)
			}
		}
		for _, p := range ix.Packs {
			if !slices.ContainsFunc(ix.Layers, func(l Layer) bool { return l.Ztoc.Digest == p.Ztoc && l.LayerDigest == p.LayerDigest }) {
				t.Fatalf("pack of zTOC %s for layer %s, which the index does not list", p.Ztoc, p.LayerDigest)
			}
		}
		if ix.Canonical {
			re, err := json.Marshal(ix.Manifest)
			if err != nil || !bytes.Equal(re, b) {
				t.Fatal("canonical index does not re-marshal to its bytes")
			}
		}
	})
}
