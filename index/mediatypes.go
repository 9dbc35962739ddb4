// Package index builds, parses and converts SOCI index manifests: the OCI
// image manifests that list the zTOCs of one image (SOCI-FORMAT.md §1.8–1.11).
//
// A SOCI index v1 points at its image manifest through `subject` and is
// discovered with the OCI referrers API (or the `sha256-<hex>` fallback tag);
// a SOCI index v2 has no subject and is bound to a rewritten image manifest
// inside an OCI image index (a "SOCI-enabled image"). Both share one shape:
// a `{}` config whose media type carries the artifact type, and one
// application/octet-stream layer descriptor per zTOC.
//
// Everything here is a pure function over bytes and descriptors: no network,
// no files. The bytes produced are exactly what Go's encoding/json produces
// for image-spec's ocispec.Manifest / ocispec.Index, because SOCI's runtime
// re-marshals fetched indexes that way and compares digests.
package index

import (
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Artifact and blob media types, with SOCI's exact strings.
const (
	// MediaTypeIndexV1 is the config media type (and descriptor artifactType)
	// of a SOCI index v1, the one attached to an image through `subject`.
	MediaTypeIndexV1 = "application/vnd.amazon.soci.index.v1+json"
	// MediaTypeIndexV2 is the config media type (and descriptor artifactType)
	// of a SOCI index v2, the one listed in a SOCI-enabled image index.
	MediaTypeIndexV2 = "application/vnd.amazon.soci.index.v2+json"
	// MediaTypeZtoc is the media type of zTOC layer descriptors. SOCI stores
	// zTOCs as opaque bytes, so readers must tell them apart by annotation.
	MediaTypeZtoc = "application/octet-stream"
	// MediaTypePrefetch is the media type of a prefetch artifact blob
	// (SOCI-FORMAT.md §1.10), listed after the zTOCs in an index.
	MediaTypePrefetch = "application/vnd.amazon.soci.prefetch.v1+json"
)

// Docker schema 2 media types are containerd's (core/images), not
// redefined here.

// Annotation keys, with SOCI's exact strings.
const (
	// AnnotationImageLayerDigest binds a zTOC (or prefetch) descriptor to the
	// image layer it indexes. It is the ONLY binding the runtime uses.
	AnnotationImageLayerDigest = "com.amazon.soci.image-layer-digest"
	// AnnotationImageLayerMediaType records the indexed layer's media type.
	AnnotationImageLayerMediaType = "com.amazon.soci.image-layer-mediaType"
	// AnnotationSpanSize is the span size (decimal string) the zTOC was built
	// with; absent in indexes built before 2025.
	AnnotationSpanSize = "com.amazon.soci.span-size"
	// AnnotationBuildToolIdentifier names the tool that built the index.
	AnnotationBuildToolIdentifier = "com.amazon.soci.build-tool-identifier"
	// AnnotationIndexDigest is set on a rewritten (v2) image manifest and
	// names its SOCI index v2 manifest.
	AnnotationIndexDigest = "com.amazon.soci.index-digest"
	// AnnotationImageManifestDigest is set on a SOCI index v2 descriptor in
	// an image index and names the rewritten image manifest it serves.
	AnnotationImageManifestDigest = "com.amazon.soci.image-manifest-digest"
	// AnnotationDisableXattrs = "true" tells the runtime that a layer has no
	// extended attributes, so it can skip xattr lookups.
	AnnotationDisableXattrs = "com.amazon.soci.disable-xattrs"
)

// The `{}` config blob every SOCI index points at (with the artifact type as
// its media type). It must be pushed next to the index.
const (
	// EmptyConfigData is the content of the config blob.
	EmptyConfigData = "{}"
	// EmptyConfigDigest is sha256 of EmptyConfigData.
	EmptyConfigDigest digest.Digest = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
	// EmptyConfigSize is len(EmptyConfigData).
	EmptyConfigSize = 2
)

// Version is the SOCI index version: V1 (subject, referrers) or V2
// (no subject, SOCI-enabled image index).
type Version int

// Index versions.
const (
	V1 Version = 1
	V2 Version = 2
)

// ArtifactType returns the media type that identifies the version: the
// index config's media type and the artifactType of its descriptor.
func (v Version) ArtifactType() string {
	switch v {
	case V1:
		return MediaTypeIndexV1
	case V2:
		return MediaTypeIndexV2
	}
	return ""
}

// String returns "v1", "v2" or "invalid", for messages.
func (v Version) String() string {
	switch v {
	case V1:
		return "v1"
	case V2:
		return "v2"
	}
	return "invalid"
}

// versionOf maps an artifact type back to its Version (0 if unknown).
func versionOf(artifactType string) Version {
	switch artifactType {
	case MediaTypeIndexV1:
		return V1
	case MediaTypeIndexV2:
		return V2
	}
	return 0
}

// ConfigDescriptor returns the descriptor of the `{}` config blob for an
// index of version v (its media type is the artifact type).
func ConfigDescriptor(v Version) ocispec.Descriptor {
	return ocispec.Descriptor{
		MediaType: v.ArtifactType(),
		Digest:    EmptyConfigDigest,
		Size:      EmptyConfigSize,
	}
}
