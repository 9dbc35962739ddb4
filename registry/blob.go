package registry

import (
	"context"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ResolveBlob returns the descriptor (size included) of a blob known only
// by digest, such as a zTOC named on the command line.
func (r *Repository) ResolveBlob(ctx context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	desc, err := r.repo.Blobs().Resolve(ctx, d.String())
	return desc, r.wrap("resolve blob", d.String(), err)
}
