//go:build linux

package snapshotter

import (
	"context"
	"errors"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"golang.org/x/sys/unix"
)

// detachFlag is MNT_DETACH: lazy unmount of a mount still in use.
const detachFlag = unix.MNT_DETACH

// ErrNoRemote is returned by a RemoteLayerResolver that cannot serve a
// layer remotely (no index, no zTOC for it, ...). The snapshotter then
// lets containerd fetch and unpack the layer as usual.
var ErrNoRemote = errors.New("layer cannot be served remotely")

// RemoteLayerResolver mounts layers that are read lazily from elsewhere.
type RemoteLayerResolver interface {
	// Mount makes the layer described by labels readable, read-only, at
	// dir (an existing empty directory). labels are those containerd's
	// unpacker passes to Prepare: containerd.io/snapshot.ref,
	// containerd.io/snapshot/cri.layer-digest, cri.image-ref, ... It
	// returns an error wrapping ErrNoRemote when the layer cannot be served
	// remotely; any other error is logged and also leads to a normal pull.
	Mount(ctx context.Context, dir string, labels map[string]string) (RemoteMount, error)
}

// RemoteMount is a mounted remote layer.
type RemoteMount interface {
	// Unmount unmounts the layer and releases what serves it.
	Unmount() error
}

// Prepare creates the active snapshot key on top of parent.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.overlay.Prepare(ctx, key, parent, opts...)
}

// restoreRemote mounts again the remote layers of committed snapshots,
// after a restart.
func (s *Snapshotter) restoreRemote(ctx context.Context) error {
	return nil
}
