package soci

import (
	"context"
	"errors"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// maxScannedTags bounds how many tags of the destination repository are
// looked at for the SOCI indexes of other images.
const maxScannedTags = 256

// findExisting collects the zTOCs that SOCI indexes in dst already hold:
// the indexes of the given images (the source, a previous conversion) and
// those of the other images in the repository, so that a base layer shared
// by many images is indexed once.
func (ix *indexer) findExisting(ctx context.Context, images ...Image) error {
	var found []ocispec.Descriptor
	for _, img := range images {
		for f, err := range Discover(ctx, ix.dst, img, DiscoverOptions{}) {
			if errors.Is(err, registry.ErrNotFound) {
				break // dst does not exist yet: nothing to reuse
			}
			if err != nil {
				return err
			}
			found = append(found, f.Index)
		}
	}
	others, err := ix.scanRepository(ctx)
	if err != nil {
		return err
	}
	seen := make(map[digest.Digest]bool)
	for _, d := range append(found, others...) {
		if !seen[d.Digest] {
			seen[d.Digest] = true
			ix.addExisting(ctx, d)
		}
	}
	return nil
}

// scanRepository returns the SOCI indexes of the images dst's tags name,
// and those its referrers fallback tags (sha256-<hex>) list. Where the
// registry has the referrers API there are no fallback tags, and the
// tagged images' referrers are asked for instead.
func (ix *indexer) scanRepository(ctx context.Context) ([]ocispec.Descriptor, error) {
	tags, err := ix.dst.Tags(ctx, maxScannedTags)
	if err != nil && !errors.Is(err, registry.ErrNotFound) {
		return nil, err
	}
	api, err := ix.dst.ReferrersAPI(ctx)
	if err != nil {
		api = false
	}
	var out []ocispec.Descriptor
	for _, tag := range tags {
		b, d, err := ix.dst.FetchManifest(ctx, tag)
		if err != nil {
			continue
		}
		if strings.HasPrefix(tag, "sha256-") && isImageIndex(d.MediaType) {
			out = append(out, fallbackReferrers(b)...)
			continue
		}
		for f, err := range Discover(ctx, ix.dst, Image{Descriptor: d, Bytes: b}, DiscoverOptions{SkipReferrers: !api}) {
			if err != nil {
				break // not an image, or no referrers: nothing to reuse
			}
			out = append(out, f.Index)
		}
	}
	return out, nil
}

// fallbackReferrers returns the SOCI index v1 entries of a referrers
// fallback tag's image index.
func fallbackReferrers(b []byte) []ocispec.Descriptor {
	idx, err := index.ParseImageIndex(b)
	if err != nil {
		return nil
	}
	var out []ocispec.Descriptor
	for _, d := range idx.Manifests {
		if d.ArtifactType == index.V1.ArtifactType() {
			out = append(out, d)
		}
	}
	return out
}

// addExisting records the zTOCs of SOCI index d, and their packs, whose
// blobs are in dst. An index that cannot be read is not ours to fix: it is
// passed over.
func (ix *indexer) addExisting(ctx context.Context, d ocispec.Descriptor) {
	sx, _, err := FetchIndex(ctx, ix.dst, d)
	if err != nil {
		return
	}
	if !ix.opts.NoPack {
		ix.addExistingPacks(ctx, sx)
	}
	for _, l := range sx.Layers {
		if l.SpanSize == 0 {
			continue // no recorded span size: cannot tell if it matches
		}
		key := ztocKey{l.LayerDigest, l.SpanSize}
		if _, seen := ix.existing[key]; seen {
			continue
		}
		if ok, err := ix.dst.Exists(ctx, l.Ztoc); err == nil && ok {
			ix.existing[key] = l.Ztoc
		}
	}
}
