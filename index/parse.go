package index

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// MaxIndexSize bounds the manifest bytes Parse accepts. Registries commonly
// cap manifests at 4 MiB; an index lists one small descriptor per layer.
const MaxIndexSize = 4 << 20

// Index is a parsed SOCI index manifest.
type Index struct {
	// Version is V1 or V2, from the config media type.
	Version Version
	// Manifest is the decoded manifest.
	Manifest ocispec.Manifest
	// Layers are the zTOCs in manifest order.
	Layers []Layer
	// Prefetches are the prefetch artifacts in manifest order, the first
	// per name and layer (PrefetchNames, Prefetch, SelectPrefetch).
	Prefetches []Prefetch
	// Packs are spanpull's packs of the zTOCs, in manifest order; none in
	// indexes built by SOCI or with packs turned off.
	Packs []Pack
	// Canonical reports whether the input bytes equal json.Marshal of
	// Manifest. A non-canonical index cannot be stored under its digest by
	// SOCI's runtime (it re-marshals before committing), so SOCI silently
	// falls back to a full pull for it.
	Canonical bool

	byLayer map[digest.Digest]int
}

// Parse decodes and validates a SOCI index manifest (v1 or v2). It rejects
// malformed JSON, config media types other than the two SOCI artifact types,
// layer descriptors without a valid layer-digest annotation, bad digests,
// sizes or span sizes, indexes without any zTOC, and packs that do not
// describe a zTOC the index lists for their layer.
func Parse(b []byte) (*Index, error) {
	if len(b) > MaxIndexSize {
		return nil, fmt.Errorf("parse soci index: %d bytes exceeds the %d byte limit", len(b), MaxIndexSize)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("parse soci index: %w", err)
	}
	v, err := checkManifest(m)
	if err != nil {
		return nil, fmt.Errorf("parse soci index: %w", err)
	}
	ix := &Index{Version: v, Manifest: m, byLayer: make(map[digest.Digest]int)}
	for i, d := range m.Layers {
		if err := ix.add(d); err != nil {
			return nil, fmt.Errorf("parse soci index: layers[%d] (%s): %w", i, d.Digest, err)
		}
	}
	if len(ix.Layers) == 0 {
		return nil, fmt.Errorf("parse soci index: %w", ErrEmptyIndex)
	}
	if err := checkPacks(ix.Layers, ix.Packs); err != nil {
		return nil, fmt.Errorf("parse soci index: %w", err)
	}
	if re, err := json.Marshal(m); err == nil {
		ix.Canonical = bytes.Equal(re, b)
	}
	return ix, nil
}

// checkManifest checks what an index manifest says of itself (schema,
// media types, config and subject) and returns its SOCI index version.
func checkManifest(m ocispec.Manifest) (Version, error) {
	if err := checkSchema(m.SchemaVersion, m.MediaType, "an OCI image manifest", ocispec.MediaTypeImageManifest); err != nil {
		return 0, err
	}
	v := versionOf(m.Config.MediaType)
	if v == 0 {
		return 0, fmt.Errorf("config media type %q is not a SOCI index artifact type", m.Config.MediaType)
	}
	if err := m.Config.Digest.Validate(); err != nil {
		return 0, fmt.Errorf("config digest %q: %w", m.Config.Digest, err)
	}
	if m.Subject != nil {
		if err := checkDescriptor(*m.Subject); err != nil {
			return 0, fmt.Errorf("subject: %w", err)
		}
	}
	return v, nil
}

// checkSchema checks what an image index or manifest (a SOCI index
// included) says of its own format: schemaVersion 2 and a media type that is
// absent or one of allowed, which kind describes in the error.
func checkSchema(schemaVersion int, mediaType, kind string, allowed ...string) error {
	if schemaVersion != 2 {
		return fmt.Errorf("schemaVersion %d, want 2", schemaVersion)
	}
	if mediaType != "" && !slices.Contains(allowed, mediaType) {
		return fmt.Errorf("media type %q is not %s", mediaType, kind)
	}
	return nil
}

// add checks one of the manifest's layer descriptors and adds what it
// describes (a zTOC, a prefetch list, a part of a pack) to ix.
func (ix *Index) add(d ocispec.Descriptor) error {
	if err := checkDescriptor(d); err != nil {
		return err
	}
	if d.MediaType == MediaTypePackHead || d.MediaType == MediaTypePackWindows {
		packs, err := parsePackDescriptor(ix.Packs, d)
		if err != nil {
			return err
		}
		ix.Packs = packs
		return nil
	}
	ld, ok := d.Annotations[AnnotationImageLayerDigest]
	if !ok {
		return fmt.Errorf("no %s annotation", AnnotationImageLayerDigest)
	}
	layer := digest.Digest(ld)
	if err := layer.Validate(); err != nil {
		return fmt.Errorf("layer digest %q: %w", ld, err)
	}
	desc := ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size, Annotations: d.Annotations}
	switch d.MediaType {
	case MediaTypeZtoc:
		l := Layer{
			LayerDigest:    layer,
			LayerMediaType: d.Annotations[AnnotationImageLayerMediaType],
			Ztoc:           desc,
			DisableXattrs:  d.Annotations[AnnotationDisableXattrs] == "true",
		}
		if s, ok := d.Annotations[AnnotationSpanSize]; ok {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil || n <= 0 {
				return fmt.Errorf("bad %s %q", AnnotationSpanSize, s)
			}
			l.SpanSize = n
		}
		if _, dup := ix.byLayer[layer]; !dup {
			ix.byLayer[layer] = len(ix.Layers)
		}
		ix.Layers = append(ix.Layers, l)
	case MediaTypePrefetch:
		p := Prefetch{LayerDigest: layer, Name: d.Annotations[AnnotationPrefetchName], Blob: desc}
		// A second artifact of one name for one layer is passed over:
		// the first one is the one Prefetch returns.
		if _, dup := ix.Prefetch(p.Name, layer); !dup {
			ix.Prefetches = append(ix.Prefetches, p)
		}
	default:
		// Unknown artifacts bound to a layer are kept in Manifest but
		// not interpreted, so newer indexes still load.
	}
	return nil
}

// Ztoc returns the zTOC descriptor for an image layer, and false when the
// layer is not indexed (the runtime then pulls it normally).
func (ix *Index) Ztoc(layer digest.Digest) (ocispec.Descriptor, bool) {
	l, ok := ix.Layer(layer)
	return l.Ztoc, ok
}

// Layer returns everything the index says about an image layer's zTOC.
func (ix *Index) Layer(layer digest.Digest) (Layer, bool) {
	i, ok := ix.byLayer[layer]
	if !ok {
		return Layer{}, false
	}
	return ix.Layers[i], true
}

// SpanSize returns the span size annotated for a layer's zTOC; false when
// the layer is not indexed or the annotation is absent (older indexes).
func (ix *Index) SpanSize(layer digest.Digest) (int64, bool) {
	l, ok := ix.Layer(layer)
	return l.SpanSize, ok && l.SpanSize > 0
}

// Subject returns the image manifest a v1 index is attached to (nil for v2
// indexes and for v1 indexes without a subject).
func (ix *Index) Subject() *ocispec.Descriptor { return ix.Manifest.Subject }

// BuildTool returns the build-tool-identifier annotation ("" if absent).
func (ix *Index) BuildTool() string { return ix.Manifest.Annotations[AnnotationBuildToolIdentifier] }
