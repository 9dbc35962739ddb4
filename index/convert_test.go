package index

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Docker schema2 manifest and manifest list, as registries serve them
// (including a field unknown to ocispec.Manifest, which must be dropped).
const dockerManifestAMD64 = `{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1469,
      "digest": "sha256:9a0ff41dccad7a96f324a4655a715c623ed3511c7336361ffa9dadcecbdb99e5"
   },
   "layers": [
      {
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 3623807,
         "digest": "sha256:77ea7eee3d80b1a38f83906dd3048e2689457eb90e18a7d12f839c5ae37106a2"
      }
   ]
}`

const dockerManifestARM64 = `{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":1470,"digest":"sha256:3f0ffcb1a9618265da590188fee62538f8e1937d91bd79569a8b682adc3edcfe"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":3000000,"digest":"sha256:95cf1a2e1698fe3ca1fcc3f653119146b271d0b62e487ec264441e886a11bd06"}]}`

func dockerList(t *testing.T) []byte {
	t.Helper()
	return []byte(`{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
   "manifests": [
      {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": ` + itoa(len(dockerManifestAMD64)) +
		`, "digest": "` + digest.FromString(dockerManifestAMD64).String() + `", "platform": {"architecture": "amd64", "os": "linux"}},
      {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": ` + itoa(len(dockerManifestARM64)) +
		`, "digest": "` + digest.FromString(dockerManifestARM64).String() + `", "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}
   ]
}`)
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func buildV2(t *testing.T, layer digest.Digest, mediaType string) *Built {
	t.Helper()
	b, err := Build(BuildOptions{Version: V2, Layers: []Layer{{LayerDigest: layer, LayerMediaType: mediaType, SpanSize: 4 << 20,
		Ztoc: ocispec.Descriptor{Digest: digest.FromString("z" + layer.String()), Size: 99}}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRewriteDockerManifest(t *testing.T) {
	idx := buildV2(t, layer1, "application/vnd.docker.image.rootfs.diff.tar.gzip")
	b, desc, err := RewriteManifest([]byte(dockerManifestAMD64), idx.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",` +
		`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:9a0ff41dccad7a96f324a4655a715c623ed3511c7336361ffa9dadcecbdb99e5","size":1469},` +
		`"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"sha256:77ea7eee3d80b1a38f83906dd3048e2689457eb90e18a7d12f839c5ae37106a2","size":3623807}],` +
		`"annotations":{"com.amazon.soci.index-digest":"` + idx.Descriptor.Digest.String() + `"}}`
	if string(b) != want {
		t.Fatalf("rewritten manifest:\n got %s\nwant %s", b, want)
	}
	if desc.Digest != digest.FromBytes(b) || desc.Size != int64(len(b)) || desc.MediaType != ocispec.MediaTypeImageManifest ||
		desc.Annotations[AnnotationIndexDigest] != idx.Descriptor.Digest.String() {
		t.Fatalf("descriptor %+v", desc)
	}
	m, err := ParseImageManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	if d, ok, err := IndexDigestOf(m); err != nil || !ok || d != idx.Descriptor.Digest {
		t.Fatalf("IndexDigestOf = %s %v %v", d, ok, err)
	}
	m.Annotations[AnnotationIndexDigest] = "sha256:bad"
	if _, _, err := IndexDigestOf(m); err == nil {
		t.Fatal("bad annotation accepted")
	}
	// Rewriting again without an index drops the annotation.
	b2, d2, err := RewriteManifest(b, "")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b2, []byte(AnnotationIndexDigest)) || d2.Annotations != nil {
		t.Fatalf("annotation kept: %s", b2)
	}
	for name, in := range map[string]string{
		"list":       string(dockerList(t)),
		"schema1":    `{"schemaVersion":1}`,
		"bad json":   `{"schemaVersion":2,`,
		"bad config": `{"schemaVersion":2,"config":{"digest":"sha256:00"}}`,
	} {
		if _, _, err := RewriteManifest([]byte(in), idx.Descriptor.Digest); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, _, err := RewriteManifest([]byte(dockerManifestAMD64), "sha256:short"); err == nil {
		t.Error("bad index digest accepted")
	}
}

// A Docker manifest list becomes an OCI index: the converted platform's
// manifest is replaced by its rewritten form, the other is copied, and a
// SOCI index v2 descriptor is appended. Converting the result again
// replaces that descriptor instead of adding a second one.
func TestConvertDockerManifestList(t *testing.T) {
	list := dockerList(t)
	idx := buildV2(t, layer1, "application/vnd.docker.image.rootfs.diff.tar.gzip")
	mb, mdesc, err := RewriteManifest([]byte(dockerManifestAMD64), idx.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	src := digest.FromString(dockerManifestAMD64)
	out, odesc, err := ConvertIndex(list, []Converted{{Source: src, Manifest: mdesc, Index: &idx.Descriptor}})
	if err != nil {
		t.Fatal(err)
	}
	armDigest := digest.FromString(dockerManifestARM64)
	want := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[` +
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + mdesc.Digest.String() + `","size":` + itoa(len(mb)) +
		`,"annotations":{"com.amazon.soci.index-digest":"` + idx.Descriptor.Digest.String() + `"},"platform":{"architecture":"amd64","os":"linux"}},` +
		`{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"` + armDigest.String() + `","size":` + itoa(len(dockerManifestARM64)) +
		`,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},` +
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + idx.Descriptor.Digest.String() + `","size":` + itoa(int(idx.Descriptor.Size)) +
		`,"annotations":{"com.amazon.soci.image-manifest-digest":"` + mdesc.Digest.String() + `"},"platform":{"architecture":"amd64","os":"linux"},` +
		`"artifactType":"application/vnd.amazon.soci.index.v2+json"}]}`
	if string(out) != want {
		t.Fatalf("converted index:\n got %s\nwant %s", out, want)
	}
	if odesc.Digest != digest.FromBytes(out) || odesc.MediaType != ocispec.MediaTypeImageIndex {
		t.Fatalf("descriptor %+v", odesc)
	}

	// Re-convert: new index for amd64 (source is now the rewritten manifest)
	// and a first index for arm64.
	idx2 := buildV2(t, layer1, ocispec.MediaTypeImageLayerGzip)
	_, mdesc2, err := RewriteManifest(mb, idx2.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	idx3 := buildV2(t, layer2, "application/vnd.docker.image.rootfs.diff.tar.gzip")
	_, mdesc3, err := RewriteManifest([]byte(dockerManifestARM64), idx3.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	out2, _, err := ConvertIndex(out, []Converted{
		{Source: mdesc.Digest, Manifest: mdesc2, Index: &idx2.Descriptor},
		{Source: armDigest, Manifest: mdesc3, Index: &idx3.Descriptor},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseImageIndex(out2)
	if err != nil {
		t.Fatal(err)
	}
	var sociFor []string
	for _, d := range got.Manifests {
		if d.ArtifactType == MediaTypeIndexV2 {
			sociFor = append(sociFor, d.Platform.Architecture+"="+d.Annotations[AnnotationImageManifestDigest])
			if d.Digest == idx.Descriptor.Digest {
				t.Fatal("old SOCI index descriptor kept")
			}
		} else if d.MediaType != ocispec.MediaTypeImageManifest || d.Annotations[AnnotationIndexDigest] == "" {
			t.Fatalf("manifest not converted: %+v", d)
		}
	}
	if len(got.Manifests) != 4 || strings.Join(sociFor, ",") != "amd64="+mdesc2.Digest.String()+",arm64="+mdesc3.Digest.String() {
		t.Fatalf("manifests %d, soci descriptors %v", len(got.Manifests), sociFor)
	}
}

func TestConvertErrors(t *testing.T) {
	list := dockerList(t)
	idx := buildV2(t, layer1, ocispec.MediaTypeImageLayerGzip)
	_, mdesc, err := RewriteManifest([]byte(dockerManifestAMD64), idx.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	_, plain, err := RewriteManifest([]byte(dockerManifestAMD64), "")
	if err != nil {
		t.Fatal(err)
	}
	src := digest.FromString(dockerManifestAMD64)
	for name, tc := range map[string]struct {
		src  []byte
		conv []Converted
		want string
	}{
		"unknown source": {list, []Converted{{Source: digest.FromString("x"), Manifest: mdesc, Index: &idx.Descriptor}}, "not in the source index"},
		"twice": {list, []Converted{{Source: src, Manifest: mdesc, Index: &idx.Descriptor},
			{Source: src, Manifest: mdesc, Index: &idx.Descriptor}}, "converted twice"},
		"annotation mismatch": {list, []Converted{{Source: src, Manifest: plain, Index: &idx.Descriptor}}, "names index"},
		"stale annotation":    {list, []Converted{{Source: src, Manifest: mdesc}}, "no index was given"},
		"not an index":        {[]byte(dockerManifestAMD64), nil, "not an OCI image index"},
		"bad json":            {[]byte("nope"), nil, "invalid character"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := ConvertIndex(tc.src, tc.conv)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want containing %q", err, tc.want)
			}
		})
	}
	// Re-serializing a platform without an index is allowed.
	out, _, err := ConvertIndex(list, []Converted{{Source: src, Manifest: plain}})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte(MediaTypeIndexV2)) {
		t.Fatal("SOCI descriptor added without an index")
	}
}

// A single-manifest image is wrapped into a new OCI index whose manifest
// descriptor carries the platform read from the image config.
func TestWrapSingleManifest(t *testing.T) {
	config := []byte(`{"architecture":"arm","os":"linux","variant":"v7","rootfs":{"type":"layers","diff_ids":[]}}`)
	p, err := PlatformFromConfig(config)
	if err != nil {
		t.Fatal(err)
	}
	if p.Architecture != "arm" || p.OS != "linux" || p.Variant != "v7" {
		t.Fatalf("platform %+v", p)
	}
	oci := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` +
		digest.FromBytes(config).String() + `","size":` + itoa(len(config)) + `},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"` +
		layer1.String() + `","size":5}],"annotations":{"org.opencontainers.image.title":"x"}}`
	idx := buildV2(t, layer1, ocispec.MediaTypeImageLayerGzip)
	mb, mdesc, err := RewriteManifest([]byte(oci), idx.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	out, odesc, err := WrapManifest(p, Converted{Source: digest.FromString(oci), Manifest: mdesc, Index: &idx.Descriptor})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[` +
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + mdesc.Digest.String() + `","size":` + itoa(len(mb)) +
		`,"annotations":{"com.amazon.soci.index-digest":"` + idx.Descriptor.Digest.String() + `","org.opencontainers.image.title":"x"},` +
		`"platform":{"architecture":"arm","os":"linux","variant":"v7"}},` +
		`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + idx.Descriptor.Digest.String() + `","size":` + itoa(int(idx.Descriptor.Size)) +
		`,"annotations":{"com.amazon.soci.image-manifest-digest":"` + mdesc.Digest.String() + `"},"platform":{"architecture":"arm","os":"linux","variant":"v7"},` +
		`"artifactType":"application/vnd.amazon.soci.index.v2+json"}]}`
	if string(out) != want {
		t.Fatalf("wrapped index:\n got %s\nwant %s", out, want)
	}
	if odesc.Digest != digest.FromBytes(out) {
		t.Fatal("descriptor digest")
	}
	if _, err := PlatformFromConfig([]byte(`{"os":"linux"}`)); err == nil {
		t.Fatal("config without architecture accepted")
	}
	if _, _, err := WrapManifest(p, Converted{Source: digest.FromString(oci), Manifest: mdesc}); err == nil {
		t.Fatal("wrap without index accepted")
	}
}

// FuzzParseImage checks that ParseImageIndex and ParseImageManifest, which
// read what a registry serves, never panic and that what they accept holds
// what their callers rely on: schema version 2, an image media type (or
// none), valid descriptors in an index, valid config and layer digests in
// a manifest.
func FuzzParseImage(f *testing.F) {
	for _, name := range []string{"index-v1.golden.json", "index-v2.golden.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:3e5316d5336b1834209f78e962ae755a2ea438af32192802b198a9bb6dbf6607","size":7,"platform":{"architecture":"amd64","os":"linux"}}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if idx, err := ParseImageIndex(b); err == nil {
			if idx.SchemaVersion != 2 || !slices.Contains([]string{"", ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList}, idx.MediaType) {
				t.Fatalf("accepted image index schema %d, media type %q", idx.SchemaVersion, idx.MediaType)
			}
			for _, d := range idx.Manifests {
				if d.Digest.Validate() != nil || d.Size <= 0 {
					t.Fatalf("accepted manifest descriptor %+v", d)
				}
			}
		}
		if m, err := ParseImageManifest(b); err == nil {
			if m.SchemaVersion != 2 || !slices.Contains([]string{"", ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest}, m.MediaType) {
				t.Fatalf("accepted image manifest schema %d, media type %q", m.SchemaVersion, m.MediaType)
			}
			if m.Config.Digest.Validate() != nil {
				t.Fatalf("accepted config digest %q", m.Config.Digest)
			}
			for _, d := range m.Layers {
				if d.Digest.Validate() != nil {
					t.Fatalf("accepted layer digest %q", d.Digest)
				}
			}
		}
	})
}
