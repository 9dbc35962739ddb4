package index

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/ztoc"
)

// Layer describes the zTOC of one image layer, as listed in an index.
type Layer struct {
	// LayerDigest is the digest of the indexed image layer blob.
	LayerDigest digest.Digest
	// LayerMediaType is the media type of the indexed image layer.
	LayerMediaType string
	// SpanSize is the span size the zTOC was built with. Zero means unknown:
	// the span-size annotation is then omitted (as in pre-2025 indexes).
	SpanSize int64
	// Ztoc is the zTOC blob: Digest and Size are required; MediaType is
	// forced to MediaTypeZtoc and other fields are ignored when building.
	Ztoc ocispec.Descriptor
	// DisableXattrs marks a layer without extended attributes.
	DisableXattrs bool
}

// Prefetch describes a prefetch artifact (SOCI-FORMAT.md §1.10) for one
// layer. Prefetch descriptors follow the zTOCs in the index.
type Prefetch struct {
	// LayerDigest is the digest of the image layer the spans belong to.
	LayerDigest digest.Digest
	// Name is the workload the artifact was made for
	// (AnnotationPrefetchName); "" for SOCI's unnamed artifacts.
	Name string
	// Blob is the prefetch JSON blob: Digest and Size are required.
	Blob ocispec.Descriptor
}

// BuildOptions are the inputs of Build.
type BuildOptions struct {
	// Version selects v1 (requires Subject) or v2 (forbids Subject).
	Version Version
	// Subject is the image manifest a v1 index is attached to. Only its
	// MediaType, Digest and Size are written.
	Subject *ocispec.Descriptor
	// Layers are the zTOCs in image-layer order; unindexed layers are simply
	// absent. At least one is required.
	Layers []Layer
	// Prefetches are optional prefetch artifacts, in layer order (one
	// name after the other when there are several), at most one per name
	// and layer.
	Prefetches []Prefetch
	// Packs are optional packs of the zTOCs in Layers, listed after
	// everything SOCI reads (SOCI-FORMAT.md §1.8 keeps zTOCs first, in
	// layer order), each as its head then its windows blob. Without packs
	// the index is exactly SOCI's.
	Packs []Pack
	// BuildTool is written as the build-tool-identifier annotation; empty
	// means ztoc.DefaultBuildToolIdentifier.
	BuildTool string
	// Supersedes, for a v1 index, names the index v1 of the same subject
	// that this one replaces (AnnotationSupersedes).
	Supersedes digest.Digest
}

// Built is a serialized SOCI index manifest.
type Built struct {
	// Manifest is the decoded form of Bytes.
	Manifest ocispec.Manifest
	// Bytes is the exact manifest content to push (canonical Go JSON).
	Bytes []byte
	// Descriptor describes Bytes: OCI manifest media type, digest, size, and
	// artifactType set to the index version's artifact type (the form SOCI
	// keeps locally; registries ignore artifactType on push).
	Descriptor ocispec.Descriptor
}

// ErrEmptyIndex is returned by Build when no layer was indexed: SOCI treats
// an index without zTOCs as an error, not as an empty artifact.
var ErrEmptyIndex = errors.New("soci index has no zTOCs")

// Build produces a SOCI index manifest. The bytes are json.Marshal of an
// ocispec.Manifest with no top-level artifactType, which is what SOCI's
// runtime reproduces when it re-marshals a fetched index.
func Build(opts BuildOptions) (*Built, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	tool := opts.BuildTool
	if tool == "" {
		tool = ztoc.DefaultBuildToolIdentifier
	}
	m := ocispec.Manifest{
		MediaType:   ocispec.MediaTypeImageManifest,
		Config:      ConfigDescriptor(opts.Version),
		Layers:      make([]ocispec.Descriptor, 0, len(opts.Layers)+len(opts.Prefetches)+2*len(opts.Packs)),
		Annotations: map[string]string{AnnotationBuildToolIdentifier: tool},
	}
	m.SchemaVersion = 2
	if opts.Supersedes != "" {
		m.Annotations[AnnotationSupersedes] = opts.Supersedes.String()
	}
	if s := opts.Subject; s != nil {
		m.Subject = &ocispec.Descriptor{MediaType: s.MediaType, Digest: s.Digest, Size: s.Size}
	}
	for i, l := range opts.Layers {
		d, err := l.descriptor()
		if err != nil {
			return nil, fmt.Errorf("build soci index: layer %d (%s): %w", i, l.LayerDigest, err)
		}
		m.Layers = append(m.Layers, d)
	}
	for i, p := range opts.Prefetches {
		d, err := p.descriptor()
		if err != nil {
			return nil, fmt.Errorf("build soci index: prefetch %d (%s): %w", i, p.LayerDigest, err)
		}
		m.Layers = append(m.Layers, d)
	}
	for i, p := range opts.Packs {
		ds, err := p.descriptors()
		if err != nil {
			return nil, fmt.Errorf("build soci index: pack %d (%s): %w", i, p.Ztoc, err)
		}
		m.Layers = append(m.Layers, ds...)
	}
	b, d, err := marshalDescribed("build soci index: marshal", m, ocispec.MediaTypeImageManifest)
	if err != nil {
		return nil, err
	}
	d.ArtifactType = opts.Version.ArtifactType()
	return &Built{Manifest: m, Bytes: b, Descriptor: d}, nil
}

// check validates the version, the subject it needs (v1) or forbids (v2),
// and that there is something to index.
func (opts BuildOptions) check() error {
	switch opts.Version {
	case V1:
		if opts.Subject == nil {
			return errors.New("build soci index v1: subject (image manifest descriptor) is required")
		}
	case V2:
		if opts.Subject != nil {
			return errors.New("build soci index v2: a v2 index has no subject")
		}
	default:
		return fmt.Errorf("build soci index: unknown version %d", opts.Version)
	}
	if len(opts.Layers) == 0 {
		return fmt.Errorf("build soci index %s: %w", opts.Version, ErrEmptyIndex)
	}
	if err := checkPacks(opts.Layers, opts.Packs); err != nil {
		return fmt.Errorf("build soci index: %w", err)
	}
	if err := checkPrefetches(opts.Prefetches); err != nil {
		return fmt.Errorf("build soci index: %w", err)
	}
	if opts.Supersedes != "" {
		if opts.Version != V1 {
			return errors.New("build soci index: only a v1 index supersedes another")
		}
		if err := opts.Supersedes.Validate(); err != nil {
			return fmt.Errorf("build soci index: superseded index %q: %w", opts.Supersedes, err)
		}
	}
	if s := opts.Subject; s != nil {
		if err := checkDescriptor(*s); err != nil {
			return fmt.Errorf("build soci index: subject: %w", err)
		}
		if s.MediaType == "" {
			return errors.New("build soci index: subject has no media type")
		}
	}
	return nil
}

// descriptor returns the index's descriptor of the zTOC of l.
func (l Layer) descriptor() (ocispec.Descriptor, error) {
	if err := l.LayerDigest.Validate(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer digest %q: %w", l.LayerDigest, err)
	}
	if l.LayerMediaType == "" {
		return ocispec.Descriptor{}, errors.New("no layer media type")
	}
	if l.SpanSize < 0 {
		return ocispec.Descriptor{}, fmt.Errorf("negative span size %d", l.SpanSize)
	}
	if err := checkDescriptor(l.Ztoc); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("ztoc: %w", err)
	}
	ann := map[string]string{
		AnnotationImageLayerDigest:    l.LayerDigest.String(),
		AnnotationImageLayerMediaType: l.LayerMediaType,
	}
	if l.SpanSize > 0 {
		ann[AnnotationSpanSize] = strconv.FormatInt(l.SpanSize, 10)
	}
	if l.DisableXattrs {
		ann[AnnotationDisableXattrs] = "true"
	}
	return ocispec.Descriptor{MediaType: MediaTypeZtoc, Digest: l.Ztoc.Digest, Size: l.Ztoc.Size, Annotations: ann}, nil
}

// descriptor returns the index's descriptor of prefetch artifact p.
func (p Prefetch) descriptor() (ocispec.Descriptor, error) {
	if err := p.LayerDigest.Validate(); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer digest %q: %w", p.LayerDigest, err)
	}
	if err := checkDescriptor(p.Blob); err != nil {
		return ocispec.Descriptor{}, err
	}
	ann := map[string]string{AnnotationImageLayerDigest: p.LayerDigest.String()}
	if p.Name != "" {
		ann[AnnotationPrefetchName] = p.Name
	}
	return ocispec.Descriptor{MediaType: MediaTypePrefetch, Digest: p.Blob.Digest, Size: p.Blob.Size, Annotations: ann}, nil
}

// checkPrefetches checks that names are valid and that no layer has two
// artifacts of one name.
func checkPrefetches(ps []Prefetch) error {
	type key struct {
		name  string
		layer digest.Digest
	}
	seen := make(map[key]bool, len(ps))
	for _, p := range ps {
		if p.Name != "" {
			if err := ValidatePrefetchName(p.Name); err != nil {
				return err
			}
		}
		k := key{p.Name, p.LayerDigest}
		if seen[k] {
			return fmt.Errorf("two prefetch artifacts named %q for layer %s", p.Name, p.LayerDigest)
		}
		seen[k] = true
	}
	return nil
}

// checkDescriptor validates the digest and size of a content descriptor.
func checkDescriptor(d ocispec.Descriptor) error {
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("digest %q: %w", d.Digest, err)
	}
	if d.Size <= 0 {
		return fmt.Errorf("%s: invalid size %d", d.Digest, d.Size)
	}
	return nil
}

// marshalDescribed returns the JSON bytes of v and a descriptor of them
// with media type mediaType; what prefixes a marshal error.
func marshalDescribed(what string, v any, mediaType string) ([]byte, ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("%s: %w", what, err)
	}
	return b, ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}, nil
}
