// Package lazypull pulls an image through containerd so that a remote
// snapshotter can serve its indexed layers lazily, and reports how each
// layer ended up being served. "snapshotter pull" and "snapshotter record
// run" share it.
//
// containerd only hands a remote snapshotter what it needs to find a
// layer's zTOC (the image reference, the manifest and layer digests) when
// the pull adds them as snapshot labels (snapshotters.
// AppendInfoHandlerWrapper); a client-side pull through containerd's Go
// client with that wrapper does, on every containerd version.
package lazypull

import (
	"context"
	"fmt"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	hostsconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"oras.land/oras-go/v2/registry/remote/credentials"

	"github.com/spanpull/spanpull/snapshotter"
)

// Options tune Pull.
type Options struct {
	// Snapshotter is the name of the snapshotter's proxy plugin in
	// containerd's config.
	Snapshotter string
	// Platform is the platform to pull; empty: this machine's.
	Platform string
	// PlainHTTP talks plain HTTP to the registry (always for localhost).
	PlainHTTP bool
	// HostsDir is containerd's registry host configuration (a hosts.toml
	// per registry: mirrors, TLS); empty: none.
	HostsDir string
}

// Pull pulls ref through client and unpacks it into o.Snapshotter with the
// labels that let a remote snapshotter serve indexed layers lazily.
// Credentials come from Docker's config and its credential helpers. ctx
// carries the containerd namespace.
func Pull(ctx context.Context, client *containerd.Client, ref string, o Options) (containerd.Image, error) {
	// The same hosts (mirrors first) the snapshotter and containerd use.
	hosts := func(host string) ([]docker.RegistryHost, error) {
		ho := hostsconfig.HostOptions{Credentials: dockerCredentials}
		if o.HostsDir != "" {
			ho.HostDir = hostsconfig.HostDirFromRoot(o.HostsDir)
		}
		if o.PlainHTTP || docker.IsLocalhost(host) {
			ho.DefaultScheme = "http"
		}
		return hostsconfig.ConfigureHosts(ctx, ho)(host)
	}
	opts := []containerd.RemoteOpt{
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.Snapshotter),
		containerd.WithResolver(docker.NewResolver(docker.ResolverOptions{Hosts: hosts})),
		// The labels that let the snapshotter find the layer's zTOC.
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	}
	if o.Platform != "" {
		opts = append(opts, containerd.WithPlatform(o.Platform))
	}
	img, err := client.Pull(ctx, ref, opts...)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	return img, nil
}

// How a layer is served, as Report says.
const (
	// ModeLazy: mounted by the snapshotter from its zTOC.
	ModeLazy = "lazy"
	// ModeUnpacked: downloaded and unpacked by the snapshotter (an indexed
	// image's layer without zTOC).
	ModeUnpacked = "unpacked"
	// ModeContainerd: pulled and unpacked by containerd.
	ModeContainerd = "pulled by containerd"
)

// Layer is how one layer of a pulled image is served.
type Layer struct {
	// Digest is the layer blob's digest.
	Digest digest.Digest
	// Mode is ModeLazy, ModeUnpacked or ModeContainerd.
	Mode string
	// InContentStore says that containerd's content store holds the blob
	// (it does not for layers the snapshotter served).
	InContentStore bool
}

// Report returns how each layer of img, bottom first, is served by the
// snapshotter named snapshotterName, from the mode label the snapshotter
// sets on the snapshots it serves itself.
func Report(ctx context.Context, client *containerd.Client, img containerd.Image, snapshotterName string) ([]Layer, error) {
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return nil, err
	}
	m, err := images.Manifest(ctx, client.ContentStore(), img.Target(), img.Platform())
	if err != nil {
		return nil, fmt.Errorf("read manifest of %s: %w", img.Name(), err)
	}
	sn := client.SnapshotService(snapshotterName)
	cs := client.ContentStore()
	out := make([]Layer, len(diffIDs))
	for i, id := range identity.ChainIDs(diffIDs) {
		out[i].Mode = ModeContainerd
		if info, err := sn.Stat(ctx, id.String()); err == nil && info.Labels[snapshotter.LabelMode] != "" {
			out[i].Mode = info.Labels[snapshotter.LabelMode]
		}
		if i >= len(m.Layers) {
			continue
		}
		out[i].Digest = m.Layers[i].Digest
		if _, err := cs.Info(ctx, m.Layers[i].Digest); err == nil {
			out[i].InContentStore = true
		} else if !errdefs.IsNotFound(err) {
			return nil, err
		}
	}
	return out, nil
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
