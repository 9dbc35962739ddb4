package soci

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

// maxConfigSize bounds the image config read for a single-manifest image's
// platform.
const maxConfigSize = 4 << 20

// source is the image being indexed: its root (an image index or a single
// manifest) and the image manifests selected from it.
type source struct {
	Image
	targets []target
	index   *ocispec.Index // nil for a single manifest
}

// target is one image manifest selected for indexing.
type target struct {
	desc     ocispec.Descriptor
	platform ocispec.Platform
}

// manifests returns every manifest the source's root lists (itself for a
// single manifest).
func (s *source) manifests() []ocispec.Descriptor {
	if s.index != nil {
		return s.index.Manifests
	}
	return []ocispec.Descriptor{s.Descriptor}
}

// resolveSource fetches the image repo's reference names and selects the
// image manifests to index.
func resolveSource(ctx context.Context, repo *registry.Repository, o Options) (*source, error) {
	img, err := fetchImage(ctx, repo)
	if err != nil {
		return nil, err
	}
	s := &source{Image: img}
	root, raw := img.Descriptor, img.Bytes
	switch {
	case isImageIndex(root.MediaType):
		s.targets, s.index, err = selectFromIndex(raw, o)
	case isImageManifest(root.MediaType):
		s.targets, err = selectManifest(ctx, repo, root, raw, o)
	default:
		err = fmt.Errorf("%s is a %q, not an image", root.Digest, root.MediaType)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", repo.Name(), err)
	}
	return s, nil
}

// selectFromIndex picks the image manifests of an image index that match
// the requested platforms (this machine's by default), leaving out SOCI
// indexes, attestations and nested indexes.
func selectFromIndex(raw []byte, o Options) ([]target, *ocispec.Index, error) {
	idx, err := index.ParseImageIndex(raw)
	if err != nil {
		return nil, nil, err
	}
	var matcher platforms.MatchComparer
	if !o.AllPlatforms {
		matcher = platforms.Any(requestedPlatforms(o)...)
	}
	var out []target
	for _, d := range idx.Manifests {
		if d.ArtifactType != "" || d.Platform == nil || !isImageManifest(d.MediaType) || d.Platform.OS == "unknown" {
			continue
		}
		if matcher != nil && !matcher.Match(*d.Platform) {
			continue
		}
		out = append(out, target{desc: d, platform: *d.Platform})
	}
	if len(out) == 0 {
		return nil, nil, fmt.Errorf("no image manifest for the selected platforms (%s)", platformList(o))
	}
	return out, idx, nil
}

// selectManifest reads the platform of a single-manifest image from its
// config and checks it against the requested platforms, if any.
func selectManifest(ctx context.Context, repo *registry.Repository, root ocispec.Descriptor, raw []byte, o Options) ([]target, error) {
	m, err := index.ParseImageManifest(raw)
	if err != nil {
		return nil, err
	}
	rc, err := repo.FetchBlob(ctx, m.Config)
	if err != nil {
		return nil, err
	}
	cfg, err := io.ReadAll(io.LimitReader(rc, maxConfigSize))
	rc.Close()
	if err != nil {
		return nil, fmt.Errorf("read image config %s: %w", m.Config.Digest, err)
	}
	// A config without a platform is indexable (v1 needs none); Convert
	// refuses it, since a v2 index entry must name one.
	pl, err := index.PlatformFromConfig(cfg)
	if err != nil && len(o.Platforms) > 0 {
		return nil, err
	}
	if len(o.Platforms) > 0 && !o.AllPlatforms && !runsOn(pl, o.Platforms) {
		return nil, fmt.Errorf("image is %s only, not %s", platforms.Format(pl), platformList(o))
	}
	return []target{{desc: root, platform: pl}}, nil
}

// runsOn reports whether an image of platform pl runs on one of wants (an
// amd64 image matches linux/amd64/v3, for one).
func runsOn(pl ocispec.Platform, wants []ocispec.Platform) bool {
	for _, w := range wants {
		if platforms.Only(w).Match(pl) {
			return true
		}
	}
	return false
}

// requestedPlatforms returns o.Platforms, or this machine's platform.
func requestedPlatforms(o Options) []ocispec.Platform {
	if len(o.Platforms) == 0 {
		return []ocispec.Platform{platforms.DefaultSpec()}
	}
	return o.Platforms
}

func platformList(o Options) string {
	var names []string
	for _, p := range requestedPlatforms(o) {
		names = append(names, platforms.Format(p))
	}
	return strings.Join(names, ", ")
}
