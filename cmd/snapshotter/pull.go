package main

import (
	"context"
	"fmt"
	"io"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/lazypull"
)

func newPullCommand() *cobra.Command {
	var (
		address     string
		namespace   string
		snapshotter string
		plainHTTP   bool
		platform    string
		hostsDir    string
	)
	cmd := &cobra.Command{
		Use:   "pull [flags] REF",
		Short: "Pull an image through containerd so that its indexed layers are served lazily",
		Long: `pull asks containerd to pull REF and unpack it into this snapshotter, passing
the layer labels (image ref, manifest and layer digests) that let the
snapshotter serve SOCI-indexed layers lazily. Afterwards
  ctr run --snapshotter spanpull REF ...
runs the image. pull prints, per layer, whether it is lazy, unpacked by the
snapshotter, or was pulled normally by containerd.`,
		Example: `  snapshotter pull --plain-http 127.0.0.1:5000/app:1.2-soci`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return pull(cmd.Context(), cmd.OutOrStdout(), pullOptions{
				address: address, namespace: namespace, snapshotter: snapshotter,
				plainHTTP: plainHTTP, platform: platform, ref: args[0], hostsDir: hostsDir,
			})
		},
	}
	f := cmd.Flags()
	f.StringVarP(&address, "address", "a", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	f.StringVarP(&namespace, "namespace", "n", namespaces.Default, "containerd namespace")
	f.StringVar(&snapshotter, "snapshotter", "spanpull", "name of this snapshotter's proxy plugin in containerd's config")
	f.BoolVar(&plainHTTP, "plain-http", false, "talk plain HTTP to the registry (always for localhost)")
	f.StringVar(&platform, "platform", "", "platform to pull (default: this machine's)")
	f.StringVar(&hostsDir, "hosts-dir", defaultRegistryConfigPath, "containerd's registry host configuration (hosts.toml per registry: mirrors, TLS); empty: none")
	return cmd
}

type pullOptions struct {
	address, namespace, snapshotter, platform, ref, hostsDir string
	plainHTTP                                                bool
}

func pull(ctx context.Context, w io.Writer, o pullOptions) error {
	client, err := containerd.New(o.address, containerd.WithDefaultNamespace(o.namespace))
	if err != nil {
		return fmt.Errorf("connect to containerd at %s: %w", o.address, err)
	}
	defer client.Close()
	ctx = namespaces.WithNamespace(ctx, o.namespace)

	start := time.Now()
	img, err := lazypull.Pull(ctx, client, o.ref, lazypull.Options{
		Snapshotter: o.snapshotter, Platform: o.platform, PlainHTTP: o.plainHTTP, HostsDir: o.hostsDir,
	})
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	layers, err := lazypull.Report(ctx, client, img, o.snapshotter)
	if err != nil {
		return err
	}
	printPullReport(w, o.ref, elapsed, layers)
	return nil
}

// printPullReport prints a line per layer (how it is served, and whether
// containerd holds its blob) and a summary line.
func printPullReport(w io.Writer, ref string, elapsed time.Duration, layers []lazypull.Layer) {
	counts := map[string]int{}
	for i, l := range layers {
		counts[l.Mode]++
		fetched := "not in containerd's content store"
		if l.InContentStore {
			fetched = "in containerd's content store"
		}
		layer := ""
		if l.Digest != "" {
			layer = l.Digest.String()
		}
		fmt.Fprintf(w, "layer %d  %s  %s (%s)\n", i+1, layer, l.Mode, fetched)
	}
	fmt.Fprintf(w, "pulled %s in %s: %d lazy, %d unpacked by spanpull, %d pulled by containerd\n",
		ref, elapsed.Round(time.Millisecond), counts[lazypull.ModeLazy], counts[lazypull.ModeUnpacked], counts[lazypull.ModeContainerd])
}
