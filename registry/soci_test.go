package registry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry"
)

// The SOCI v2 flow end to end on a real registry: a Docker manifest list is
// converted into a SOCI-enabled OCI image index (index package), every piece
// is pushed (registry package), and a fresh client finds the zTOC of a
// layer by following tag -> image index -> platform manifest annotation ->
// SOCI index -> zTOC.
func TestSOCIv2ConvertAndPush(t *testing.T) {
	registries(t, func(t *testing.T, addr string, _ bool) {
		ctx := testCtx(t)
		r := newRepo(t, addr, "spanpull/v2", registry.Options{})
		layers := pushDockerList(t, ctx, r, "multi")

		// Convert the amd64 platform only.
		srcBytes, _, err := r.FetchManifest(ctx, "multi")
		if err != nil {
			t.Fatal(err)
		}
		src, err := index.ParseImageIndex(srcBytes)
		if err != nil {
			t.Fatal(err)
		}
		var converted []index.Converted
		ztocBytes := layertest.Random(99, 3000)
		for _, d := range src.Manifests {
			if d.Platform.Architecture != "amd64" {
				continue
			}
			converted = append(converted, convertPlatform(t, ctx, r, d, ztocBytes))
		}
		ib, id, err := index.ConvertIndex(srcBytes, converted)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.PushManifest(ctx, id, ib, "multi-soci"); err != nil {
			t.Fatal(err)
		}

		// A fresh client discovers the zTOC from the tag.
		c := newRepo(t, addr, "spanpull/v2", registry.Options{})
		top, topDesc, err := c.FetchManifest(ctx, "multi-soci")
		if err != nil {
			t.Fatal(err)
		}
		if topDesc.MediaType != ocispec.MediaTypeImageIndex {
			t.Fatalf("tag resolves to %s", topDesc.MediaType)
		}
		idx, err := index.ParseImageIndex(top)
		if err != nil {
			t.Fatal(err)
		}
		var found bool
		for _, d := range idx.Manifests {
			if d.ArtifactType == index.MediaTypeIndexV2 || d.Platform.Architecture != "amd64" {
				continue
			}
			checkDiscoveredZtoc(t, ctx, c, top, idx, d, layers["amd64"].Digest, ztocBytes)
			found = true
		}
		if !found {
			t.Fatalf("amd64 manifest missing from %s", top)
		}
	})
}

// pushDockerList pushes the source image of TestSOCIv2ConvertAndPush: two
// Docker schema2 manifests (amd64, arm64) in a Docker manifest list tagged
// tag. It returns each platform's layer descriptor by architecture.
func pushDockerList(t *testing.T, ctx context.Context, r *registry.Repository, tag string) map[string]ocispec.Descriptor {
	t.Helper()
	const dockerLayer = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	var listEntries []ocispec.Descriptor
	layers := map[string]ocispec.Descriptor{}
	for i, arch := range []string{"amd64", "arm64"} {
		layer, err := r.PushBlobBytes(ctx, dockerLayer, layertest.Random(uint64(i), 10_000+i))
		if err != nil {
			t.Fatal(err)
		}
		layers[arch] = layer
		config, err := r.PushBlobBytes(ctx, images.MediaTypeDockerSchema2Config, []byte(`{"architecture":"`+arch+`","os":"linux"}`))
		if err != nil {
			t.Fatal(err)
		}
		m := ocispec.Manifest{MediaType: images.MediaTypeDockerSchema2Manifest, Config: config, Layers: []ocispec.Descriptor{layer}}
		m.SchemaVersion = 2
		b, _ := json.Marshal(m)
		d := ocispec.Descriptor{MediaType: images.MediaTypeDockerSchema2Manifest, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := r.PushManifest(ctx, d, b, ""); err != nil {
			t.Fatal(err)
		}
		d.Platform = &ocispec.Platform{OS: "linux", Architecture: arch}
		listEntries = append(listEntries, d)
	}
	list := ocispec.Index{MediaType: images.MediaTypeDockerSchema2ManifestList, Manifests: listEntries}
	list.SchemaVersion = 2
	lb, _ := json.Marshal(list)
	if err := r.PushManifest(ctx, ocispec.Descriptor{MediaType: images.MediaTypeDockerSchema2ManifestList, Digest: digest.FromBytes(lb), Size: int64(len(lb))}, lb, tag); err != nil {
		t.Fatal(err)
	}
	return layers
}

// convertPlatform converts the platform manifest d: it pushes ztocBytes as
// the zTOC of its first layer, a SOCI index v2 naming it (with its config
// blob) and the manifest rewritten to name that index.
func convertPlatform(t *testing.T, ctx context.Context, r *registry.Repository, d ocispec.Descriptor, ztocBytes []byte) index.Converted {
	t.Helper()
	mb, m := fetchImageManifest(t, ctx, r, d)
	zd, err := r.PushBlobBytes(ctx, index.MediaTypeZtoc, ztocBytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.PushBlobBytes(ctx, index.MediaTypeIndexV2, []byte(index.EmptyConfigData)); err != nil {
		t.Fatal(err)
	}
	built, err := index.Build(index.BuildOptions{Version: index.V2, Layers: []index.Layer{{
		LayerDigest: m.Layers[0].Digest, LayerMediaType: m.Layers[0].MediaType, SpanSize: 4 << 20, Ztoc: zd}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		t.Fatal(err)
	}
	rb, rd, err := index.RewriteManifest(mb, built.Descriptor.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, rd, rb, ""); err != nil {
		t.Fatal(err)
	}
	return index.Converted{Source: d.Digest, Manifest: rd, Index: &built.Descriptor}
}

// checkDiscoveredZtoc follows the platform manifest d of the SOCI-enabled
// image index idx (whose bytes are top) to its SOCI index v2 and checks
// that the zTOC it lists for layer holds want.
func checkDiscoveredZtoc(t *testing.T, ctx context.Context, c *registry.Repository, top []byte, idx *ocispec.Index,
	d ocispec.Descriptor, layer digest.Digest, want []byte) {
	t.Helper()
	_, m := fetchImageManifest(t, ctx, c, d)
	sociDigest, ok, err := index.IndexDigestOf(m)
	if err != nil || !ok {
		t.Fatalf("no index annotation: %v", err)
	}
	var sociDesc ocispec.Descriptor
	for _, e := range idx.Manifests {
		if e.Digest == sociDigest && e.ArtifactType == index.MediaTypeIndexV2 && e.Annotations[index.AnnotationImageManifestDigest] == d.Digest.String() {
			sociDesc = e
		}
	}
	if sociDesc.Digest == "" {
		t.Fatalf("SOCI index descriptor for %s not in %s", d.Digest, top)
	}
	ixb, err := c.FetchManifestDescriptor(ctx, sociDesc)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := index.Parse(ixb)
	if err != nil || ix.Version != index.V2 {
		t.Fatalf("parse index: %v", err)
	}
	zd, ok := ix.Ztoc(layer)
	if !ok {
		t.Fatal("layer not indexed")
	}
	rc, err := c.FetchBlob(ctx, zd)
	if err != nil {
		t.Fatal(err)
	}
	zb, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(zb, want) {
		t.Fatalf("zTOC: %v", err)
	}
}

// fetchImageManifest fetches the image manifest d describes and parses it.
func fetchImageManifest(t *testing.T, ctx context.Context, r *registry.Repository, d ocispec.Descriptor) ([]byte, *ocispec.Manifest) {
	t.Helper()
	mb, err := r.FetchManifestDescriptor(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	m, err := index.ParseImageManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	return mb, m
}
