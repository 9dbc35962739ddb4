package soci

import (
	"context"
	"fmt"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// IndexSummary describes one SOCI index of an image, for listing.
type IndexSummary struct {
	Found
	// Descriptors is the number of SOCI's blobs the index lists (zTOCs and
	// prefetch artifacts), Size their total bytes.
	Descriptors int
	Size        int64
	// Prefetches is how many of those are prefetch artifacts, and
	// PrefetchNames their names (index.Index.PrefetchNames).
	Prefetches    int
	PrefetchNames []string
	// Packs is the number of spanpull's pack blobs the index lists (heads
	// and windows), PackSize their total bytes.
	Packs    int
	PackSize int64
}

// List returns the SOCI indexes of the image repo's reference names (tag or
// digest; "latest" when it has none): the v2 descriptors of an image index
// and the v1 referrers of its image manifests, in Discover's order. An index
// that only an image manifest's annotation names is not listed: it is the
// v2 descriptor of the SOCI-enabled image index that holds the manifest.
func List(ctx context.Context, repo *registry.Repository) ([]IndexSummary, error) {
	img, err := fetchImage(ctx, repo)
	if err != nil {
		return nil, err
	}
	return list(ctx, repo, img)
}

func list(ctx context.Context, repo *registry.Repository, img Image) ([]IndexSummary, error) {
	var out []IndexSummary
	for f, err := range Discover(ctx, repo, img, DiscoverOptions{}) {
		if err != nil {
			return nil, err
		}
		if f.Source != SourceAnnotation {
			out = append(out, IndexSummary{Found: f})
		}
	}
	for i := range out {
		ix, _, err := FetchIndex(ctx, repo, out[i].Index)
		if err != nil {
			return nil, err
		}
		for _, l := range ix.Layers {
			out[i].Descriptors++
			out[i].Size += l.Ztoc.Size
		}
		for _, p := range ix.Prefetches {
			out[i].Descriptors++
			out[i].Prefetches++
			out[i].Size += p.Blob.Size
		}
		out[i].PrefetchNames = ix.PrefetchNames()
		for _, p := range ix.Packs {
			for _, d := range []ocispec.Descriptor{p.Head, p.Windows} {
				if d.Digest != "" {
					out[i].Packs++
					out[i].PackSize += d.Size
				}
			}
		}
	}
	return out, nil
}

// AmbiguousError is Info's error for an image with several SOCI indexes.
type AmbiguousError struct {
	// Indexes is how many indexes the image has.
	Indexes int
}

// Error says how many indexes the image has.
func (e *AmbiguousError) Error() string {
	return fmt.Sprintf("the image has %d SOCI indexes", e.Indexes)
}

// Info returns the bytes of the SOCI index manifest repo's reference names:
// the index itself, or the only index of the image it names. It returns
// ErrNoIndex for an image without index and an *AmbiguousError for one with
// several.
func Info(ctx context.Context, repo *registry.Repository) ([]byte, error) {
	img, err := fetchImage(ctx, repo)
	if err != nil {
		return nil, err
	}
	if _, err := index.Parse(img.Bytes); err == nil {
		return img.Bytes, nil
	}
	entries, err := list(ctx, repo, img)
	if err != nil {
		return nil, err
	}
	switch len(entries) {
	case 0:
		return nil, ErrNoIndex
	case 1:
	default:
		return nil, &AmbiguousError{Indexes: len(entries)}
	}
	_, b, err := FetchIndex(ctx, repo, entries[0].Index)
	return b, err
}

// referenceOrLatest returns repo's tag or digest, "latest" when it has none
// (as docker pull does).
func referenceOrLatest(r *registry.Repository) string {
	if r.Reference() == "" {
		return "latest"
	}
	return r.Reference()
}

// fetchImage fetches the manifest repo's reference names ("latest" when it
// has none).
func fetchImage(ctx context.Context, repo *registry.Repository) (Image, error) {
	b, root, err := repo.FetchManifest(ctx, referenceOrLatest(repo))
	if err != nil {
		return Image{}, err
	}
	return Image{Descriptor: root, Bytes: b}, nil
}
