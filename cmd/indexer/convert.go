package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/soci"
)

func newConvertCommand() *cobra.Command {
	var o indexFlags
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
			src, dst, err := convertRepositories(args[0], args[1], o.registryOptions())
			if err != nil {
				return err
			}
			return o.run(cmd, runReport{Image: args[0], Target: args[1], version: "v2"}, func(ctx context.Context, opts soci.Options) (*soci.Result, error) {
				return soci.Convert(ctx, src, dst, opts)
			})
		},
	}
	addIndexFlags(cmd, &o)
	return cmd
}

// convertRepositories returns the repositories of convert's SRC and DST;
// DST must name a tag to push the converted image to.
func convertRepositories(srcRef, dstRef string, opts registry.Options) (src, dst *registry.Repository, err error) {
	if src, err = registry.New(srcRef, opts); err != nil {
		return nil, nil, err
	}
	if dst, err = registry.New(dstRef, opts); err != nil {
		return nil, nil, err
	}
	if dst.Reference() == "" || strings.HasPrefix(dst.Reference(), "sha256:") {
		return nil, nil, fmt.Errorf("DST %s needs a tag to push the converted image to", dstRef)
	}
	return src, dst, nil
}
