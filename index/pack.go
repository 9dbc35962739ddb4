package index

import (
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// spanpull's pack (ztoc.MarshalPack): a compact companion of each zTOC, in
// two blobs listed in the index's layers after every zTOC and prefetch
// descriptor. SOCI's runtime binds blobs to layers only through
// AnnotationImageLayerDigest and reads zTOCs by MediaTypeZtoc; pack
// descriptors carry neither, so SOCI passes over them and a SOCI index
// with packs still serves SOCI as before.
const (
	// MediaTypePackHead is the media type of a pack head: the zTOC without
	// its windows, zstd-compressed. A runtime fetches it whole instead of
	// the zTOC.
	MediaTypePackHead = "application/vnd.spanpull.ztoc.head.v1+zstd"
	// MediaTypePackWindows is the media type of a pack's windows blob: the
	// checkpoint windows, each compressed on its own, read by range.
	MediaTypePackWindows = "application/vnd.spanpull.ztoc.windows.v1"
	// AnnotationPackLayerDigest binds a pack blob to the image layer its
	// zTOC indexes.
	AnnotationPackLayerDigest = "dev.spanpull.layer-digest"
	// AnnotationPackZtocDigest names the zTOC (listed in the same index)
	// that a pack blob describes.
	AnnotationPackZtocDigest = "dev.spanpull.ztoc-digest"
)

// Pack describes the pack of one zTOC of an index.
type Pack struct {
	// LayerDigest is the image layer the zTOC indexes.
	LayerDigest digest.Digest
	// Ztoc is the digest of the zTOC the pack describes; the index lists
	// that zTOC for LayerDigest.
	Ztoc digest.Digest
	// Head is the head blob: Digest and Size are required.
	Head ocispec.Descriptor
	// Windows is the windows blob; its Digest is empty when the pack has
	// no windows (a tar layer, a layer of one span), and it is then not
	// listed.
	Windows ocispec.Descriptor
}

// descriptors returns the index's descriptors of pack p: the head, then
// the windows blob when there is one.
func (p Pack) descriptors() ([]ocispec.Descriptor, error) {
	if err := p.LayerDigest.Validate(); err != nil {
		return nil, fmt.Errorf("layer digest %q: %w", p.LayerDigest, err)
	}
	if err := p.Ztoc.Validate(); err != nil {
		return nil, fmt.Errorf("zTOC digest %q: %w", p.Ztoc, err)
	}
	ann := func() map[string]string {
		return map[string]string{AnnotationPackLayerDigest: p.LayerDigest.String(), AnnotationPackZtocDigest: p.Ztoc.String()}
	}
	if err := checkDescriptor(p.Head); err != nil {
		return nil, fmt.Errorf("head: %w", err)
	}
	out := []ocispec.Descriptor{{MediaType: MediaTypePackHead, Digest: p.Head.Digest, Size: p.Head.Size, Annotations: ann()}}
	if p.Windows.Digest != "" {
		if err := checkDescriptor(p.Windows); err != nil {
			return nil, fmt.Errorf("windows: %w", err)
		}
		out = append(out, ocispec.Descriptor{MediaType: MediaTypePackWindows, Digest: p.Windows.Digest, Size: p.Windows.Size, Annotations: ann()})
	}
	return out, nil
}

// checkPacks checks that every pack describes a zTOC listed in layers for
// the same image layer, once.
func checkPacks(layers []Layer, packs []Pack) error {
	ztocs := make(map[digest.Digest]digest.Digest, len(layers)) // zTOC -> layer
	for _, l := range layers {
		ztocs[l.Ztoc.Digest] = l.LayerDigest
	}
	seen := make(map[digest.Digest]bool, len(packs))
	for _, p := range packs {
		layer, ok := ztocs[p.Ztoc]
		switch {
		case !ok:
			return fmt.Errorf("pack of zTOC %s: the index lists no such zTOC", p.Ztoc)
		case layer != p.LayerDigest:
			return fmt.Errorf("pack of zTOC %s: bound to layer %s, the zTOC to layer %s", p.Ztoc, p.LayerDigest, layer)
		case seen[p.Ztoc]:
			return fmt.Errorf("pack of zTOC %s: listed twice", p.Ztoc)
		}
		seen[p.Ztoc] = true
	}
	return nil
}

// parsePackDescriptor adds a head or windows descriptor to the packs
// parsed so far (in manifest order, a head before its windows).
func parsePackDescriptor(packs []Pack, d ocispec.Descriptor) ([]Pack, error) {
	if _, ok := d.Annotations[AnnotationImageLayerDigest]; ok {
		return nil, fmt.Errorf("pack blob carries %s: SOCI would take it for a zTOC", AnnotationImageLayerDigest)
	}
	var p Pack
	for key, dst := range map[string]*digest.Digest{AnnotationPackLayerDigest: &p.LayerDigest, AnnotationPackZtocDigest: &p.Ztoc} {
		v, ok := d.Annotations[key]
		if !ok {
			return nil, fmt.Errorf("no %s annotation", key)
		}
		*dst = digest.Digest(v)
		if err := dst.Validate(); err != nil {
			return nil, fmt.Errorf("%s %q: %w", key, v, err)
		}
	}
	blob := ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size, Annotations: d.Annotations}
	if d.MediaType == MediaTypePackHead {
		p.Head = blob
		return append(packs, p), nil
	}
	for i := range packs {
		if packs[i].Ztoc != p.Ztoc {
			continue
		}
		if packs[i].LayerDigest != p.LayerDigest {
			return nil, fmt.Errorf("windows of zTOC %s: bound to layer %s, its head to %s", p.Ztoc, p.LayerDigest, packs[i].LayerDigest)
		}
		if packs[i].Windows.Digest != "" {
			return nil, fmt.Errorf("windows of zTOC %s: listed twice", p.Ztoc)
		}
		packs[i].Windows = blob
		return packs, nil
	}
	return nil, errors.New("windows blob without a head before it")
}

// Pack returns the pack of the zTOC the index lists for an image layer
// (the one Layer returns). ok is false when the layer is not indexed or its
// zTOC has no pack (indexes built by SOCI, or with packs turned off); a
// runtime then fetches the zTOC. windows has an empty Digest when the pack
// has no windows blob.
func (ix *Index) Pack(layer digest.Digest) (head, windows ocispec.Descriptor, ok bool) {
	l, ok := ix.Layer(layer)
	if !ok {
		return ocispec.Descriptor{}, ocispec.Descriptor{}, false
	}
	for _, p := range ix.Packs {
		if p.Ztoc == l.Ztoc.Digest {
			return p.Head, p.Windows, true
		}
	}
	return ocispec.Descriptor{}, ocispec.Descriptor{}, false
}
