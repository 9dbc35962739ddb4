package soci

import (
	"context"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// Create indexes the image repo's reference names (a tag or digest, "latest"
// when it has none; an image index or a single manifest) in its registry and
// attaches a SOCI index v1 to each selected image manifest: the index names
// the manifest as its subject, so it is found through the OCI referrers API
// or the sha256-<hex> fallback tag. The image itself is not modified.
//
// Layers whose zTOC the repository (any SOCI index of any tagged image) or
// opts.Cache already has are not read again unless opts.Force is set.
// Per-platform failures are in the result; the error is for a run that
// could not start (unknown image, no matching platform, bad options).
func Create(ctx context.Context, repo *registry.Repository, opts Options) (*Result, error) {
	ix, img, err := startRun(ctx, repo, repo, opts)
	if err != nil {
		return nil, err
	}
	if err := ix.findExisting(ctx, img.Image); err != nil {
		return nil, err
	}
	jobs := ix.indexPlatforms(ctx, img.targets)
	for _, j := range jobs {
		if j.result.Err != nil {
			continue
		}
		built, err := ix.pushIndex(ctx, j, index.V1)
		if err != nil {
			j.result.Err = err
			continue
		}
		j.result.Index = built.Descriptor
	}
	return &Result{Platforms: results(jobs)}, nil
}
