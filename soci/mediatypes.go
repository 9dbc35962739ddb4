package soci

import (
	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/ztoc"
)

// OCI's non-distributable layer types, deprecated by image-spec (hence not
// its constants) but still found in Windows images.
const (
	mediaTypeOCINondistributable     = "application/vnd.oci.image.layer.nondistributable.v1.tar"
	mediaTypeOCINondistributableGzip = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
)

// layerCompression returns how a layer of mediaType is compressed, or why
// it cannot be indexed.
func layerCompression(mediaType string) (ztoc.Compression, error) {
	switch mediaType {
	case ocispec.MediaTypeImageLayerGzip, mediaTypeOCINondistributableGzip,
		images.MediaTypeDockerSchema2LayerGzip, images.MediaTypeDockerSchema2LayerForeignGzip:
		return ztoc.Gzip, nil
	case ocispec.MediaTypeImageLayer, mediaTypeOCINondistributable, images.MediaTypeDockerSchema2Layer:
		return ztoc.Uncompressed, nil
	}
	return 0, &UnsupportedLayerError{MediaType: mediaType}
}

// isImageIndex reports whether mediaType is an OCI image index or a Docker
// manifest list.
func isImageIndex(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex || mediaType == images.MediaTypeDockerSchema2ManifestList
}

// isImageManifest reports whether mediaType is an OCI or Docker schema 2
// image manifest.
func isImageManifest(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageManifest || mediaType == images.MediaTypeDockerSchema2Manifest
}
