package main

import (
	"context"
	"fmt"
	"io"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	hostsconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"github.com/spf13/cobra"
	"oras.land/oras-go/v2/registry/remote/credentials"

	"github.com/spanpull/spanpull/snapshotter"
)

// LabelMode is set by the snapshotter on the snapshots it serves itself:
// "lazy" (mounted from the zTOC) or "unpacked" (downloaded and unpacked
// by the snapshotter because the layer has no zTOC).
const labelMode = snapshotter.LabelMode

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

	// The same hosts (mirrors first) the snapshotter and containerd use.
	hosts := func(host string) ([]docker.RegistryHost, error) {
		ho := hostsconfig.HostOptions{Credentials: dockerCredentials}
		if o.hostsDir != "" {
			ho.HostDir = hostsconfig.HostDirFromRoot(o.hostsDir)
		}
		if o.plainHTTP || docker.IsLocalhost(host) {
			ho.DefaultScheme = "http"
		}
		return hostsconfig.ConfigureHosts(ctx, ho)(host)
	}
	opts := []containerd.RemoteOpt{
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.snapshotter),
		containerd.WithResolver(docker.NewResolver(docker.ResolverOptions{Hosts: hosts})),
		// The labels that let the snapshotter find the layer's zTOC.
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(o.ref)),
	}
	if o.platform != "" {
		opts = append(opts, containerd.WithPlatform(o.platform))
	}
	start := time.Now()
	img, err := client.Pull(ctx, o.ref, opts...)
	if err != nil {
		return fmt.Errorf("pull %s: %w", o.ref, err)
	}
	elapsed := time.Since(start)
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return err
	}
	m, err := images.Manifest(ctx, client.ContentStore(), img.Target(), img.Platform())
	if err != nil {
		return fmt.Errorf("read manifest of %s: %w", o.ref, err)
	}
	var layers []digest.Digest
	for _, l := range m.Layers {
		layers = append(layers, l.Digest)
	}
	sn := client.SnapshotService(o.snapshotter)
	cs := client.ContentStore()
	chain := identity.ChainIDs(diffIDs)
	counts := map[string]int{}
	for i, id := range chain {
		mode := "pulled by containerd"
		if info, err := sn.Stat(ctx, id.String()); err == nil && info.Labels[labelMode] != "" {
			mode = info.Labels[labelMode]
		}
		fetched := "not in containerd's content store"
		if i < len(layers) {
			if _, err := cs.Info(ctx, layers[i]); err == nil {
				fetched = "in containerd's content store"
			} else if !errdefs.IsNotFound(err) {
				return err
			}
		}
		counts[mode]++
		layer := ""
		if i < len(layers) {
			layer = layers[i].String()
		}
		fmt.Fprintf(w, "layer %d  %s  %s (%s)\n", i+1, layer, mode, fetched)
	}
	fmt.Fprintf(w, "pulled %s in %s: %d lazy, %d unpacked by spanpull, %d pulled by containerd\n",
		o.ref, elapsed.Round(time.Millisecond), counts["lazy"], counts["unpacked"], counts["pulled by containerd"])
	return nil
}

// dockerCredentials looks a registry host up in Docker's config.json and
// its credential helpers.
func dockerCredentials(host string) (string, string, error) {
	store, err := credentials.NewStoreFromDocker(credentials.StoreOptions{})
	if err != nil {
		return "", "", err
	}
	c, err := store.Get(context.Background(), host)
	if err != nil {
		return "", "", err
	}
	if c.RefreshToken != "" {
		return "", c.RefreshToken, nil
	}
	return c.Username, c.Password, nil
}
