package registry_test

import (
	"context"
	"fmt"
	"io"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// Publishing a SOCI index v1 for an image and finding it again. The
// registry must be running, so this example is compiled but not run.
func Example() {
	ctx := context.Background()
	repo, err := registry.New("127.0.0.1:5000/app:latest", registry.Options{PlainHTTP: true})
	if err != nil {
		panic(err)
	}
	image, err := repo.Resolve(ctx, repo.Reference())
	if err != nil {
		panic(err) // errors.Is(err, registry.ErrNotFound) for a missing tag
	}
	mb, err := repo.FetchManifestDescriptor(ctx, image)
	if err != nil {
		panic(err)
	}
	m, err := index.ParseImageManifest(mb)
	if err != nil {
		panic(err)
	}
	layer := m.Layers[0]

	// Stream the layer once to build its zTOC (verified at EOF).
	rc, err := repo.FetchBlob(ctx, layer)
	if err != nil {
		panic(err)
	}
	ztocBytes := buildZtoc(rc) // ztoc.Build + Marshal in real code
	rc.Close()

	zd, err := repo.PushBlobBytes(ctx, index.MediaTypeZtoc, ztocBytes)
	if err != nil {
		panic(err)
	}
	if _, err := repo.PushBlobBytes(ctx, index.MediaTypeIndexV1, []byte(index.EmptyConfigData)); err != nil {
		panic(err)
	}
	built, err := index.Build(index.BuildOptions{Version: index.V1, Subject: &image,
		Layers: []index.Layer{{LayerDigest: layer.Digest, LayerMediaType: layer.MediaType, SpanSize: 4 << 20, Ztoc: zd}}})
	if err != nil {
		panic(err)
	}
	// The subject makes it a referrer: referrers API or sha256-<hex> tag.
	if err := repo.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		panic(err)
	}

	// Runtime side: discover the index, then read spans lazily.
	refs, err := repo.Referrers(ctx, image, index.MediaTypeIndexV1)
	if err != nil || len(refs) == 0 {
		panic(fmt.Sprint("no index: ", err))
	}
	blob, err := repo.BlobReader(layer)
	if err != nil {
		panic(err)
	}
	span := make([]byte, 64<<10)
	if _, err := blob.ReadAt(ctx, span, 1<<20); err != nil && err != io.EOF {
		panic(err)
	}
}

func buildZtoc(io.Reader) []byte { return []byte("ztoc") }
