package main

import (
	"context"
	"fmt"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
)

func newConvertCommand() *cobra.Command {
	var o indexOptions
	cmd := &cobra.Command{
		Use:   "convert [flags] SRC DST",
		Short: "Push a SOCI-enabled copy of an image (SOCI index manifest v2)",
		Long: `convert indexes SRC like create, then pushes DST: an OCI image index whose
image manifests are SRC's, re-serialized as OCI manifests that name their SOCI
index (annotation com.amazon.soci.index-digest), plus one SOCI index v2
descriptor per indexed platform. Layer blobs are never modified; within one
registry they are mounted across repositories, never copied through the
indexer.`,
		Example: `  indexer convert registry.example.com/app:1.2 registry.example.com/app:1.2-soci`,
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			ctx := cmd.Context()
			src, err := registry.New(args[0], o.registryOptions())
			if err != nil {
				return err
			}
			dst, err := registry.New(args[1], o.registryOptions())
			if err != nil {
				return err
			}
			if dst.Reference() == "" || strings.HasPrefix(dst.Reference(), "sha256:") {
				return fmt.Errorf("DST %s needs a tag to push the converted image to", args[1])
			}
			p, done, err := newPublisher(o, src, dst, cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			img, err := p.resolveSource(ctx)
			if err != nil {
				return err
			}
			root, rootBytes, targets, imageIndex := img.root, img.raw, img.targets, img.index
			if imageIndex == nil && targets[0].platform.OS == "" {
				return fmt.Errorf("%s: the image config names no platform (os/architecture), which a SOCI v2 index entry needs", args[0])
			}
			if err := p.findExistingConverted(ctx, targets, imageIndex); err != nil {
				return err
			}
			results := p.indexPlatforms(ctx, targets)

			// Everything the new image index points at must be in DST
			// before the index itself: every source manifest and its blobs.
			var manifests []ocispec.Descriptor
			if imageIndex != nil {
				manifests = imageIndex.Manifests
			} else {
				manifests = []ocispec.Descriptor{root}
			}
			if err := p.copyManifests(ctx, manifests); err != nil {
				return err
			}
			var converted []index.Converted
			for _, r := range results {
				if r.Error != "" {
					continue
				}
				c, err := p.convertPlatform(ctx, r)
				if err != nil {
					r.Error = err.Error()
					continue
				}
				converted = append(converted, c)
			}
			rep := runReport{Image: args[0], Target: args[1], Platforms: results}
			if len(converted) == 0 {
				return finish(cmd, o, rep, "v2")
			}
			var out []byte
			var outDesc ocispec.Descriptor
			if imageIndex != nil {
				out, outDesc, err = index.ConvertIndex(rootBytes, converted)
			} else {
				out, outDesc, err = index.WrapManifest(targets[0].platform, converted[0])
			}
			if err != nil {
				return err
			}
			if err := dst.PushManifest(ctx, outDesc, out, dst.Reference()); err != nil {
				return err
			}
			rep.TargetDigest = outDesc.Digest
			if err := finish(cmd, o, rep, "v2"); err != nil {
				return err
			}
			if !o.Quiet && !o.JSON {
				fmt.Fprintf(cmd.OutOrStdout(), "image    %s  %s\n", outDesc.Digest, args[1])
			}
			return nil
		},
	}
	addIndexFlags(cmd, &o)
	return cmd
}

// convertPlatform pushes the SOCI index v2 of one platform and its
// rewritten image manifest to DST.
func (p *publisher) convertPlatform(ctx context.Context, r *platformResult) (index.Converted, error) {
	built, err := p.buildIndex(ctx, r, index.V2)
	if err != nil {
		return index.Converted{}, err
	}
	if err := p.dst.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		return index.Converted{}, err
	}
	rewritten, desc, err := index.RewriteManifest(r.raw, built.Descriptor.Digest)
	if err != nil {
		return index.Converted{}, err
	}
	if err := p.dst.PushManifest(ctx, desc, rewritten, ""); err != nil {
		return index.Converted{}, err
	}
	r.Index = built.Descriptor.Digest
	return index.Converted{Source: r.desc.Digest, Manifest: desc, Index: &built.Descriptor}, nil
}

// copyManifests makes every manifest in ms, with its config and layers,
// available in DST: nothing to do in the same repository, cross-repository
// mounts within one registry, a streamed copy between registries.
func (p *publisher) copyManifests(ctx context.Context, ms []ocispec.Descriptor) error {
	if p.src.Name() == p.dst.Name() {
		return nil
	}
	srcHost, srcRepo, _ := strings.Cut(p.src.Name(), "/")
	dstHost, _, _ := strings.Cut(p.dst.Name(), "/")
	for _, md := range ms {
		b, err := p.src.FetchManifestDescriptor(ctx, md)
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
			if srcHost == dstHost {
				err = p.dst.MountBlob(ctx, blob, srcRepo)
			} else {
				err = p.copyBlob(ctx, blob)
			}
			if err != nil {
				return err
			}
		}
		if err := p.dst.PushManifest(ctx, md, b, ""); err != nil {
			return err
		}
	}
	return nil
}

func (p *publisher) copyBlob(ctx context.Context, d ocispec.Descriptor) error {
	if ok, err := p.dst.Exists(ctx, d); err == nil && ok {
		return nil
	}
	rc, err := p.src.FetchBlob(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	return p.dst.PushBlob(ctx, d, rc)
}

// findExistingConverted looks for zTOCs to reuse in DST's current image (a
// re-run of convert) as well as SRC's own indexes and DST's repository.
func (p *publisher) findExistingConverted(ctx context.Context, targets []target, srcIndex *ocispec.Index) error {
	if err := p.findExisting(ctx, targetDescs(targets), srcIndex); err != nil {
		return err
	}
	b, d, err := p.dst.FetchManifest(ctx, p.dst.Reference())
	if err != nil || d.MediaType != ocispec.MediaTypeImageIndex {
		return nil // DST does not exist yet (or is no index): nothing more to reuse
	}
	dstIndex, err := index.ParseImageIndex(b)
	if err != nil {
		return nil
	}
	for _, e := range v2Entries(dstIndex) {
		p.addExisting(ctx, e)
	}
	return nil
}
