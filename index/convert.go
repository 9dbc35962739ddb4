package index

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// This file implements the SOCI v2 "convert" output (SOCI-FORMAT.md §1.9):
// a SOCI-enabled image is an OCI image index whose platform manifests are
// re-serialized with an annotation naming their SOCI index v2, followed by
// one SOCI index descriptor per indexed platform. The flow for a caller is:
//
//  1. ParseImageIndex (or ParseImageManifest + PlatformFromConfig for a
//     single-manifest image) to learn the platform manifests;
//  2. per platform: build and push zTOCs and a v2 index (Build with V2),
//     then RewriteManifest with the index digest and push the result;
//  3. ConvertIndex (or WrapManifest) to produce the new image index, and
//     push it under the target tag.

// ParseImageIndex decodes an image index: an OCI image index or a Docker
// manifest list (whose descriptors have the same JSON shape).
func ParseImageIndex(b []byte) (*ocispec.Index, error) {
	return decodeChecked("parse image index", b, checkImageIndex)
}

// ParseImageManifest decodes an image manifest: OCI or Docker schema2.
func ParseImageManifest(b []byte) (*ocispec.Manifest, error) {
	return decodeChecked("parse image manifest", b, checkImageManifest)
}

// decodeChecked decodes b as JSON into a new T and validates it with check;
// what prefixes the errors of both.
func decodeChecked[T any](what string, b []byte, check func(*T) error) (*T, error) {
	v := new(T)
	if err := json.Unmarshal(b, v); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := check(v); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return v, nil
}

// checkImageIndex checks the schema and media type of an image index and
// the descriptors of its manifests.
func checkImageIndex(idx *ocispec.Index) error {
	if err := checkSchema(idx.SchemaVersion, idx.MediaType, "an OCI image index or Docker manifest list",
		ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList); err != nil {
		return err
	}
	for i, d := range idx.Manifests {
		if err := checkDescriptor(d); err != nil {
			return fmt.Errorf("manifests[%d]: %w", i, err)
		}
	}
	return nil
}

// checkImageManifest checks the schema and media type of an image manifest
// and the digests of its config and layers.
func checkImageManifest(m *ocispec.Manifest) error {
	if err := checkSchema(m.SchemaVersion, m.MediaType, "an OCI or Docker schema2 image manifest",
		ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest); err != nil {
		return err
	}
	if err := m.Config.Digest.Validate(); err != nil {
		return fmt.Errorf("config digest %q: %w", m.Config.Digest, err)
	}
	for i, d := range m.Layers {
		if err := d.Digest.Validate(); err != nil {
			return fmt.Errorf("layers[%d]: digest %q: %w", i, d.Digest, err)
		}
	}
	return nil
}

// PlatformFromConfig reads the platform of an image from its config blob
// (OCI or Docker), for wrapping a single-manifest image into an index.
func PlatformFromConfig(config []byte) (ocispec.Platform, error) {
	var img ocispec.Image
	if err := json.Unmarshal(config, &img); err != nil {
		return ocispec.Platform{}, fmt.Errorf("parse image config: %w", err)
	}
	if img.OS == "" || img.Architecture == "" {
		return ocispec.Platform{}, fmt.Errorf("parse image config: no platform (os %q, architecture %q)", img.OS, img.Architecture)
	}
	return img.Platform, nil
}

// RewriteManifest re-serializes an image manifest for a SOCI-enabled image:
// media type forced to OCI manifest, config media type forced to the OCI
// image config type, annotation AnnotationIndexDigest set to indexDigest
// (removed when indexDigest is empty, for platforms without an index).
// Layers are untouched, so Docker layer media types stay as they are.
// Unknown JSON fields are dropped (the manifest is decoded into
// ocispec.Manifest and re-marshaled). It returns the bytes and their
// descriptor, whose annotations are the manifest's.
func RewriteManifest(manifest []byte, indexDigest digest.Digest) ([]byte, ocispec.Descriptor, error) {
	m, err := ParseImageManifest(manifest)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("rewrite manifest: %w", err)
	}
	m.MediaType = ocispec.MediaTypeImageManifest
	m.Config.MediaType = ocispec.MediaTypeImageConfig
	if indexDigest != "" {
		if err := indexDigest.Validate(); err != nil {
			return nil, ocispec.Descriptor{}, fmt.Errorf("rewrite manifest: index digest %q: %w", indexDigest, err)
		}
		if m.Annotations == nil {
			m.Annotations = map[string]string{}
		}
		m.Annotations[AnnotationIndexDigest] = indexDigest.String()
	} else {
		delete(m.Annotations, AnnotationIndexDigest)
		if len(m.Annotations) == 0 {
			m.Annotations = nil
		}
	}
	b, d, err := marshalDescribed("rewrite manifest: marshal", m, ocispec.MediaTypeImageManifest)
	if err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	d.Annotations = maps.Clone(m.Annotations)
	return b, d, nil
}

// IndexDescriptorV2 returns the descriptor under which a SOCI index v2 is
// listed in a SOCI-enabled image index: OCI manifest media type,
// artifactType v2, the platform it serves, and annotation
// AnnotationImageManifestDigest naming the rewritten image manifest.
func IndexDescriptorV2(idx ocispec.Descriptor, platform ocispec.Platform, imageManifest digest.Digest) ocispec.Descriptor {
	p := platform
	p.OSFeatures = slices.Clone(platform.OSFeatures)
	return ocispec.Descriptor{
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: MediaTypeIndexV2,
		Digest:       idx.Digest,
		Size:         idx.Size,
		Platform:     &p,
		Annotations:  map[string]string{AnnotationImageManifestDigest: imageManifest.String()},
	}
}

// Converted is one platform manifest after conversion.
type Converted struct {
	// Source is the digest of the manifest in the source image.
	Source digest.Digest
	// Manifest is the rewritten manifest's descriptor, as returned by
	// RewriteManifest.
	Manifest ocispec.Descriptor
	// Index is the SOCI index v2 built for this manifest (Built.Descriptor),
	// or nil if the platform was re-serialized without an index.
	Index *ocispec.Descriptor
}

func (c Converted) check() error {
	if err := checkDescriptor(c.Manifest); err != nil {
		return fmt.Errorf("rewritten manifest of %s: %w", c.Source, err)
	}
	got := c.Manifest.Annotations[AnnotationIndexDigest]
	if c.Index == nil {
		if got != "" {
			return fmt.Errorf("rewritten manifest %s names index %s but no index was given", c.Manifest.Digest, got)
		}
		return nil
	}
	if err := checkDescriptor(*c.Index); err != nil {
		return fmt.Errorf("soci index of %s: %w", c.Source, err)
	}
	if got != c.Index.Digest.String() {
		return fmt.Errorf("rewritten manifest %s names index %q, want %s (rewrite it with RewriteManifest)", c.Manifest.Digest, got, c.Index.Digest)
	}
	return nil
}

// ConvertIndex produces the OCI image index of a SOCI-enabled image from a
// source image index (OCI index or Docker manifest list, relabeled as OCI).
// Every source manifest listed in converted is replaced by its rewritten
// manifest (same platform; annotations of the rewritten manifest copied onto
// the descriptor); manifests not listed are copied unchanged. For each
// converted manifest with an index, a SOCI index descriptor is appended,
// replacing any existing v2 index descriptor for the same platform.
func ConvertIndex(source []byte, converted []Converted) ([]byte, ocispec.Descriptor, error) {
	src, err := ParseImageIndex(source)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("convert image index: %w", err)
	}
	bySource := make(map[digest.Digest]Converted, len(converted))
	for _, c := range converted {
		if err := c.check(); err != nil {
			return nil, ocispec.Descriptor{}, fmt.Errorf("convert image index: %w", err)
		}
		if _, dup := bySource[c.Source]; dup {
			return nil, ocispec.Descriptor{}, fmt.Errorf("convert image index: manifest %s converted twice", c.Source)
		}
		bySource[c.Source] = c
	}

	var platforms []ocispec.Platform // platforms getting a new SOCI index
	seen := make(map[digest.Digest]bool, len(bySource))
	for _, d := range src.Manifests {
		c, ok := bySource[d.Digest]
		if !ok || c.Index == nil || d.ArtifactType == MediaTypeIndexV2 {
			continue
		}
		if d.Platform == nil {
			return nil, ocispec.Descriptor{}, fmt.Errorf("convert image index: manifest %s has no platform", d.Digest)
		}
		platforms = append(platforms, *d.Platform)
	}

	out := ocispec.Index{
		MediaType:    ocispec.MediaTypeImageIndex,
		ArtifactType: src.ArtifactType,
		Manifests:    make([]ocispec.Descriptor, 0, len(src.Manifests)+len(platforms)),
		Subject:      src.Subject,
		Annotations:  src.Annotations,
	}
	out.SchemaVersion = 2
	var added []ocispec.Descriptor
	for _, d := range src.Manifests {
		if d.ArtifactType == MediaTypeIndexV2 && d.Platform != nil &&
			slices.ContainsFunc(platforms, func(p ocispec.Platform) bool { return samePlatform(p, *d.Platform) }) {
			continue // replaced below
		}
		c, ok := bySource[d.Digest]
		if !ok || d.ArtifactType == MediaTypeIndexV2 {
			out.Manifests = append(out.Manifests, d)
			continue
		}
		seen[d.Digest] = true
		nd := d
		nd.MediaType = ocispec.MediaTypeImageManifest
		nd.Digest = c.Manifest.Digest
		nd.Size = c.Manifest.Size
		ann := maps.Clone(d.Annotations)
		delete(ann, AnnotationIndexDigest)
		if ann == nil && len(c.Manifest.Annotations) > 0 {
			ann = map[string]string{}
		}
		maps.Copy(ann, c.Manifest.Annotations)
		if len(ann) == 0 {
			ann = nil
		}
		nd.Annotations = ann
		out.Manifests = append(out.Manifests, nd)
		if c.Index != nil {
			added = append(added, IndexDescriptorV2(*c.Index, *d.Platform, c.Manifest.Digest))
		}
	}
	for _, c := range converted {
		if !seen[c.Source] {
			return nil, ocispec.Descriptor{}, fmt.Errorf("convert image index: manifest %s is not in the source index", c.Source)
		}
	}
	out.Manifests = append(out.Manifests, added...)
	return marshalDescribed("marshal image index", out, ocispec.MediaTypeImageIndex)
}

// WrapManifest produces the OCI image index of a SOCI-enabled image whose
// source is a single image manifest: the rewritten manifest with the given
// platform (from PlatformFromConfig), then its SOCI index descriptor.
func WrapManifest(platform ocispec.Platform, c Converted) ([]byte, ocispec.Descriptor, error) {
	if err := c.check(); err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("wrap manifest: %w", err)
	}
	if c.Index == nil {
		return nil, ocispec.Descriptor{}, errors.New("wrap manifest: no soci index to add")
	}
	p := platform
	p.OSFeatures = slices.Clone(platform.OSFeatures)
	md := ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageManifest,
		Digest:      c.Manifest.Digest,
		Size:        c.Manifest.Size,
		Annotations: maps.Clone(c.Manifest.Annotations),
		Platform:    &p,
	}
	out := ocispec.Index{
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{md, IndexDescriptorV2(*c.Index, platform, c.Manifest.Digest)},
	}
	out.SchemaVersion = 2
	return marshalDescribed("marshal image index", out, ocispec.MediaTypeImageIndex)
}

// samePlatform compares two platforms field by field.
func samePlatform(a, b ocispec.Platform) bool {
	return a.OS == b.OS && a.Architecture == b.Architecture && a.Variant == b.Variant &&
		a.OSVersion == b.OSVersion && slices.Equal(a.OSFeatures, b.OSFeatures)
}

// IndexDigestOf returns the SOCI index v2 a (rewritten) image manifest
// names through AnnotationIndexDigest: false when it names none, an error
// when the annotation is not a valid digest. This is how a runtime finds
// the index of a SOCI-enabled image.
func IndexDigestOf(m *ocispec.Manifest) (digest.Digest, bool, error) {
	s, ok := m.Annotations[AnnotationIndexDigest]
	if !ok {
		return "", false, nil
	}
	d, err := digest.Parse(s)
	if err != nil {
		return "", false, fmt.Errorf("annotation %s: %w", AnnotationIndexDigest, err)
	}
	return d, true, nil
}
