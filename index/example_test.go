package index_test

import (
	"fmt"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
)

// Building a SOCI index v1 for an image with one indexed layer, and reading
// it back as the runtime does. To publish it, push the zTOC blobs, the `{}`
// config blob (media type = Version.ArtifactType()) and then Bytes as a
// manifest with Descriptor: the subject makes it a referrer of the image.
func ExampleBuild() {
	image := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("manifest"), Size: 512}
	layer := digest.FromString("layer")
	built, err := index.Build(index.BuildOptions{
		Version: index.V1,
		Subject: &image,
		Layers: []index.Layer{{
			LayerDigest:    layer,
			LayerMediaType: ocispec.MediaTypeImageLayerGzip,
			SpanSize:       4 << 20,
			Ztoc:           ocispec.Descriptor{Digest: digest.FromString("ztoc"), Size: 1000},
		}},
		BuildTool: "AWS SOCI CLI v0.2",
	})
	if err != nil {
		panic(err)
	}
	fmt.Println(built.Descriptor.MediaType, built.Descriptor.ArtifactType)

	ix, err := index.Parse(built.Bytes)
	if err != nil {
		panic(err)
	}
	z, _ := ix.Ztoc(layer)
	span, _ := ix.SpanSize(layer)
	fmt.Println(ix.Version, z.Size, span, ix.Canonical)
	// Output:
	// application/vnd.oci.image.manifest.v1+json application/vnd.amazon.soci.index.v1+json
	// v1 1000 4194304 true
}
