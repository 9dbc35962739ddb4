package soci

import (
	"context"
	"fmt"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// Convert indexes the image src's reference names like Create, then pushes
// a SOCI-enabled copy of it to dst and tags it with dst's tag: an OCI image
// index whose image manifests are src's, re-serialized as OCI manifests that
// name their SOCI index v2 (annotation com.amazon.soci.index-digest), plus
// one SOCI index v2 descriptor per indexed platform. Layer blobs are never
// modified; within one registry they are mounted across repositories, never
// copied through the indexer.
//
// Platforms that fail are left out of the copy and reported in the result;
// when none can be converted nothing is pushed (Result.Image is zero). The
// error is for a run that could not start or could not push the copy.
func Convert(ctx context.Context, src, dst *registry.Repository, opts Options) (*Result, error) {
	if dst.Reference() == "" || strings.HasPrefix(dst.Reference(), "sha256:") {
		return nil, fmt.Errorf("convert to %s: the destination needs a tag", dst.Name())
	}
	ix, img, err := startRun(ctx, src, dst, opts)
	if err != nil {
		return nil, err
	}
	if img.index == nil && img.targets[0].platform.OS == "" {
		return nil, fmt.Errorf("%s: the image config names no platform (os/architecture), which a SOCI v2 index entry needs", reference(src))
	}
	// A re-run of convert finds the zTOCs of dst's current image too.
	roots := []Image{img.Image}
	if b, d, err := dst.FetchManifest(ctx, dst.Reference()); err == nil {
		roots = append(roots, Image{Descriptor: d, Bytes: b})
	}
	if err := ix.findExisting(ctx, roots...); err != nil {
		return nil, err
	}
	jobs := ix.indexPlatforms(ctx, img.targets)
	// Everything the new image index points at must be in dst before the
	// index itself: every source manifest and its blobs.
	if err := ix.copyManifests(ctx, img.manifests()); err != nil {
		return nil, err
	}
	converted := ix.convertPlatforms(ctx, jobs)
	res := &Result{Platforms: results(jobs)}
	if len(converted) == 0 {
		return res, nil
	}
	if res.Image, err = ix.pushImage(ctx, img, converted); err != nil {
		return nil, err
	}
	return res, nil
}

// convertPlatforms pushes the SOCI index v2 and the rewritten image
// manifest of every platform that was indexed.
func (ix *indexer) convertPlatforms(ctx context.Context, jobs []*platformJob) []index.Converted {
	var converted []index.Converted
	for _, j := range jobs {
		if j.result.Err != nil {
			continue
		}
		c, err := ix.convertPlatform(ctx, j)
		if err != nil {
			j.result.Err = err
			continue
		}
		converted = append(converted, c)
	}
	return converted
}

func (ix *indexer) convertPlatform(ctx context.Context, j *platformJob) (index.Converted, error) {
	built, err := ix.pushIndex(ctx, j, index.V2)
	if err != nil {
		return index.Converted{}, err
	}
	rewritten, desc, err := index.RewriteManifest(j.raw, built.Descriptor.Digest)
	if err != nil {
		return index.Converted{}, err
	}
	if err := ix.dst.PushManifest(ctx, desc, rewritten, ""); err != nil {
		return index.Converted{}, err
	}
	j.result.Index = built.Descriptor
	return index.Converted{Source: j.result.Manifest.Digest, Manifest: desc, Index: &built.Descriptor}, nil
}

// pushImage pushes and tags the SOCI-enabled image index: the source's
// image index converted, or a single manifest wrapped into one.
func (ix *indexer) pushImage(ctx context.Context, img *source, converted []index.Converted) (ocispec.Descriptor, error) {
	var out []byte
	var desc ocispec.Descriptor
	var err error
	if img.index != nil {
		out, desc, err = index.ConvertIndex(img.Bytes, converted)
	} else {
		out, desc, err = index.WrapManifest(img.targets[0].platform, converted[0])
	}
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if err := ix.dst.PushManifest(ctx, desc, out, ix.dst.Reference()); err != nil {
		return ocispec.Descriptor{}, err
	}
	return desc, nil
}

// copyManifests makes every manifest in ms, with its config and layers,
// available in dst: nothing to do in the same repository, cross-repository
// mounts within one registry, a streamed copy between registries.
func (ix *indexer) copyManifests(ctx context.Context, ms []ocispec.Descriptor) error {
	if ix.src.Name() == ix.dst.Name() {
		return nil
	}
	for _, md := range ms {
		b, err := ix.src.FetchManifestDescriptor(ctx, md)
		if err != nil {
			return err
		}
		m, err := index.ParseImageManifest(b)
		if err != nil {
			if md.ArtifactType != "" || md.MediaType == ocispec.MediaTypeImageIndex {
				continue // not an image manifest: left out of the copy
			}
			return fmt.Errorf("manifest %s: %w", md.Digest, err)
		}
		for _, blob := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
			if err := ix.copyBlob(ctx, blob); err != nil {
				return err
			}
		}
		if err := ix.dst.PushManifest(ctx, md, b, ""); err != nil {
			return err
		}
	}
	return nil
}

// copyBlob makes one blob of src available in dst: mounted within one
// registry, streamed between registries.
func (ix *indexer) copyBlob(ctx context.Context, d ocispec.Descriptor) error {
	srcHost, srcRepo, _ := strings.Cut(ix.src.Name(), "/")
	dstHost, _, _ := strings.Cut(ix.dst.Name(), "/")
	if srcHost == dstHost {
		return ix.dst.MountBlob(ctx, d, srcRepo)
	}
	if ok, err := ix.dst.Exists(ctx, d); err == nil && ok {
		return nil
	}
	rc, err := ix.src.FetchBlob(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	return ix.dst.PushBlob(ctx, d, rc)
}

// reference formats repo's name and reference for messages.
func reference(repo *registry.Repository) string {
	switch ref := repo.Reference(); {
	case ref == "":
		return repo.Name()
	case strings.Contains(ref, ":"):
		return repo.Name() + "@" + ref
	default:
		return repo.Name() + ":" + ref
	}
}
