package soci

import (
	"context"
	"fmt"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// IndexSummary describes one SOCI index of an image, for listing.
type IndexSummary struct {
	Found
	// Descriptors is the number of blobs the index lists (zTOCs and
	// prefetch artifacts), Size their total bytes.
	Descriptors int
	Size        int64
}

// List returns the SOCI indexes of the image repo's reference names (tag or
// digest; "latest" when it has none): the v2 descriptors of an image index
// and the v1 referrers of its image manifests, in Discover's order. An index
// that only an image manifest's annotation names is not listed: it is the
// v2 descriptor of the SOCI-enabled image index that holds the manifest.
func List(ctx context.Context, repo *registry.Repository) ([]IndexSummary, error) {
	b, root, err := repo.FetchManifest(ctx, referenceOrLatest(repo))
	if err != nil {
		return nil, err
	}
	return list(ctx, repo, Image{Descriptor: root, Bytes: b})
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
		out[i].Descriptors = len(ix.Manifest.Layers)
		for _, l := range ix.Manifest.Layers {
			out[i].Size += l.Size
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
	b, root, err := repo.FetchManifest(ctx, referenceOrLatest(repo))
	if err != nil {
		return nil, err
	}
	if _, err := index.Parse(b); err == nil {
		return b, nil
	}
	entries, err := list(ctx, repo, Image{Descriptor: root, Bytes: b})
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
	_, b, err = FetchIndex(ctx, repo, entries[0].Index)
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
