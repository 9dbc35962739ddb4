package soci

import (
	"context"
	"errors"
	"fmt"
	"iter"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// ErrNoIndex says that an image names no SOCI index at all.
var ErrNoIndex = errors.New("no SOCI index")

// Image is an image's root as fetched from its registry: an image manifest
// or an image index, its descriptor and its exact bytes.
type Image struct {
	Descriptor ocispec.Descriptor
	Bytes      []byte
}

// Source says where Discover found an index.
type Source int

// Sources, in the order Discover consults them.
const (
	// SourceExplicit: named by the caller (SOCI's snapshot label).
	SourceExplicit Source = iota + 1
	// SourceAnnotation: named by the v2 annotation of an image manifest.
	SourceAnnotation
	// SourceImageIndex: a SOCI index v2 descriptor of an image index.
	SourceImageIndex
	// SourceReferrers: a SOCI index v1 referrer of an image manifest, from
	// the referrers API or the sha256-<hex> fallback tag.
	SourceReferrers
)

// Found is one SOCI index an image names.
type Found struct {
	// Index is the index manifest's descriptor. Its Size is zero when the
	// source did not give it (explicit digest, annotation).
	Index ocispec.Descriptor
	// Version is the index's version when the source tells it (zero for an
	// explicit digest).
	Version index.Version
	// Manifest is the image manifest the index serves (for a v2 descriptor,
	// the one its annotation names, possibly empty).
	Manifest digest.Digest
	// Platform is that manifest's platform when an image index names it.
	Platform *ocispec.Platform
	// Source says where the index was found.
	Source Source
}

// DiscoverOptions tune Discover.
type DiscoverOptions struct {
	// Explicit is an index digest named out of band, tried first.
	Explicit digest.Digest
	// SkipReferrers leaves out the v1 referrers, which cost one registry
	// request per image manifest, and which anyone who can push to the
	// repository can add without changing the image's digest.
	SkipReferrers bool
	// SkipV2 leaves out the v2 indexes the image names (the annotation of
	// an image manifest, the SOCI index descriptors of an image index).
	SkipV2 bool
}

// Discover yields the SOCI indexes of img, in this order:
//
//  1. opts.Explicit, when set;
//  2. for an image manifest, the v2 index its annotation names; for an
//     image index, its SOCI index v2 descriptors in index order;
//  3. the v1 referrers of the image manifest, or of every image manifest the
//     image index lists, in index order (the registry's order within one),
//     leaving out those another referrer supersedes (a v1 index that
//     "indexer prefetch attach" replaced: index.AnnotationSupersedes, which
//     registries copy into referrers descriptors).
//
// This is the order a runtime tries them in. The sequence is lazy: the
// referrers are asked for only when the consumer gets that far, so a runtime
// that takes the first usable index makes no referrers request for a
// SOCI-enabled image. An error (a malformed root or annotation, a failed
// referrers request) is yielded last and ends the sequence.
func Discover(ctx context.Context, repo *registry.Repository, img Image, opts DiscoverOptions) iter.Seq2[Found, error] {
	return func(yield func(Found, error) bool) {
		root := img.Descriptor.Digest
		if opts.Explicit != "" {
			f := Found{Index: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: opts.Explicit}, Manifest: root, Source: SourceExplicit}
			if !yield(f, nil) {
				return
			}
		}
		named, images, err := namedIndexes(img)
		if err != nil {
			yield(Found{}, err)
			return
		}
		for _, f := range named {
			if opts.SkipV2 {
				break
			}
			if !yield(f, nil) {
				return
			}
		}
		if opts.SkipReferrers {
			return
		}
		for _, im := range images {
			subject := ocispec.Descriptor{MediaType: im.MediaType, Digest: im.Digest, Size: im.Size}
			refs, err := repo.Referrers(ctx, subject, index.V1.ArtifactType())
			if err != nil {
				yield(Found{}, fmt.Errorf("find SOCI indexes: %w", err))
				return
			}
			superseded := supersededBy(refs)
			for _, r := range refs {
				if superseded[r.Digest] {
					continue
				}
				f := Found{Index: r, Version: index.V1, Manifest: im.Digest, Platform: im.Platform, Source: SourceReferrers}
				if !yield(f, nil) {
					return
				}
			}
		}
	}
}

// supersededBy returns the referrers that another of refs names as
// superseded.
func supersededBy(refs []ocispec.Descriptor) map[digest.Digest]bool {
	out := make(map[digest.Digest]bool)
	for _, r := range refs {
		if d, err := digest.Parse(r.Annotations[index.AnnotationSupersedes]); err == nil && d != r.Digest {
			out[d] = true
		}
	}
	return out
}

// namedIndexes returns the indexes img names itself (the annotation of an
// image manifest, the v2 descriptors of an image index) and the image
// manifests whose referrers may hold more.
func namedIndexes(img Image) ([]Found, []ocispec.Descriptor, error) {
	if isImageIndex(img.Descriptor.MediaType) {
		idx, err := index.ParseImageIndex(img.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("image index %s: %w", img.Descriptor.Digest, err)
		}
		var named []Found
		var images []ocispec.Descriptor
		for _, d := range idx.Manifests {
			switch {
			case d.ArtifactType == index.V2.ArtifactType():
				named = append(named, Found{Index: d, Version: index.V2, Platform: d.Platform, Source: SourceImageIndex,
					Manifest: digest.Digest(d.Annotations[index.AnnotationImageManifestDigest])})
			case d.ArtifactType == "" && isImageManifest(d.MediaType):
				images = append(images, d)
			}
		}
		return named, images, nil
	}
	m, err := index.ParseImageManifest(img.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("image manifest %s: %w", img.Descriptor.Digest, err)
	}
	d, ok, err := index.IndexDigestOf(m)
	if err != nil {
		return nil, nil, fmt.Errorf("image manifest %s: %w", img.Descriptor.Digest, err)
	}
	var named []Found
	if ok {
		named = append(named, Found{Index: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: d},
			Version: index.V2, Manifest: img.Descriptor.Digest, Source: SourceAnnotation})
	}
	return named, []ocispec.Descriptor{img.Descriptor}, nil
}

// FindIndex returns the index a runtime mounts for the image manifest img:
// the first that Discover yields which loads and serves img (a v1 index
// whose subject is another manifest does not). It returns ErrNoIndex when
// the image names no index at all.
func FindIndex(ctx context.Context, repo *registry.Repository, img Image, opts DiscoverOptions) (Found, *index.Index, error) {
	var errs []error
	n := 0
	for f, err := range Discover(ctx, repo, img, opts) {
		if err != nil {
			return Found{}, nil, err
		}
		n++
		ix, _, err := FetchIndex(ctx, repo, f.Index)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if s := ix.Subject(); s != nil && s.Digest != img.Descriptor.Digest {
			errs = append(errs, fmt.Errorf("index %s is for manifest %s, not %s", f.Index.Digest, s.Digest, img.Descriptor.Digest))
			continue
		}
		return f, ix, nil
	}
	if n == 0 {
		return Found{}, nil, ErrNoIndex
	}
	return Found{}, nil, fmt.Errorf("no usable SOCI index: %w", errors.Join(errs...))
}

// FetchIndex fetches and parses the SOCI index manifest d names (verified
// against d's size too when it has one) and returns it with its bytes.
func FetchIndex(ctx context.Context, repo *registry.Repository, d ocispec.Descriptor) (*index.Index, []byte, error) {
	var b []byte
	var err error
	if d.Size > 0 {
		b, err = repo.FetchManifestDescriptor(ctx, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: d.Digest, Size: d.Size})
	} else {
		b, _, err = repo.FetchManifest(ctx, d.Digest.String())
	}
	if err != nil {
		return nil, nil, err
	}
	ix, err := index.Parse(b)
	if err != nil {
		return nil, nil, fmt.Errorf("index %s: %w", d.Digest, err)
	}
	return ix, b, nil
}
