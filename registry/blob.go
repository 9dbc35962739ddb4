package registry

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ResolveBlob returns the descriptor (size included) of a blob known only
// by digest, such as a zTOC named on the command line.
func (r *Repository) ResolveBlob(ctx context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	var desc ocispec.Descriptor
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		var err error
		desc, err = e.repo.Blobs().Resolve(ctx, d.String())
		return r.wrap("resolve blob", d.String(), err)
	})
	return desc, err
}

// Tags lists the repository's tags, at most max of them (max <= 0: all).
func (r *Repository) Tags(ctx context.Context, max int) ([]string, error) {
	var out []string
	err := r.each(ctx, docker.HostCapabilityResolve, func(e *endpoint) error {
		out = nil
		err := e.repo.Tags(ctx, "", func(tags []string) error {
			out = append(out, tags...)
			if max > 0 && len(out) >= max {
				out = out[:max]
				return errStopListing
			}
			return nil
		})
		if errors.Is(err, errStopListing) {
			err = nil
		}
		return r.wrap("list tags of", "", err)
	})
	return out, err
}

var errStopListing = errors.New("enough tags")

// FetchBlobBytes reads a whole blob into memory, verified against desc,
// refusing blobs larger than max bytes (a bound on what a descriptor from
// the network can make us allocate).
func (r *Repository) FetchBlobBytes(ctx context.Context, desc ocispec.Descriptor, max int64) ([]byte, error) {
	if desc.Size > max {
		return nil, fmt.Errorf("blob %s: %d bytes is more than the %d allowed", r.at(desc.Digest.String()), desc.Size, max)
	}
	rc, err := r.FetchBlob(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}
