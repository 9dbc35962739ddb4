//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
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
	// unpacker passes to Prepare: LabelSnapshotRef and, from clients that
	// wrap their pull with snapshotters.AppendInfoHandlerWrapper,
	// snapshotters.TargetLayerDigestLabel, TargetRefLabel, ... It
	// returns an error wrapping ErrNoRemote when the layer cannot be served
	// remotely; any other error is logged and also leads to a normal pull.
	// Either way it must leave nothing mounted on dir.
	//
	// ctx bounds the Mount call only (it is containerd's Prepare request):
	// whatever serves the layer afterwards must not depend on it. Mount is
	// called again with the snapshot's stored labels when the snapshotter
	// restarts, and may be called concurrently for different directories.
	Mount(ctx context.Context, dir string, labels map[string]string) (RemoteMount, error)
}

// RestoreNotifier is implemented by a RemoteLayerResolver that wants to
// know when the snapshotter has mounted every remembered remote layer
// again at start (for example to drop what no snapshot claimed).
type RestoreNotifier interface {
	Restored(ctx context.Context) error
}

// RemoteMount is a mounted remote layer.
type RemoteMount interface {
	// Release is called when the snapshotter closes (the daemon is
	// stopping): the mount stops its background work. A mount that the
	// next process can take over stays mounted, so containers keep
	// reading through the restart; any other is unmounted. What a later
	// Mount of the same snapshot reuses is kept.
	Release() error
	// Remove unmounts the layer and deletes what only this snapshot
	// needed, such as cached data (the snapshot was removed).
	Remove() error
	// Labels are the layer's current labels, e.g. LabelMode and
	// LabelVerified: recorded on the committed snapshot (all but
	// LabelVerified, see liveLabels), and merged into what Stat reports,
	// since some change while the layer is mounted.
	Labels() map[string]string
	// Usage is the local disk space the layer takes (cached data).
	Usage() snapshots.Usage
	// LocalDir is a local directory holding the layer as containerd's
	// overlayfs snapshotter would have unpacked it, verified against the
	// image, or "" while there is none (the layer is still lazy). Mounts
	// made from then on stack it in place of the remote mount (see
	// localize).
	LocalDir() string
}

// Labels the snapshotter reads and writes.
const (
	// LabelSnapshotRef is set by containerd's unpacker on Prepare: the name
	// (chain ID) the layer's snapshot will be committed under. containerd
	// uses this string in core/snapshots, core/unpack and core/metadata
	// but exports it from none of them.
	LabelSnapshotRef = "containerd.io/snapshot.ref"
	// LabelRemote marks committed snapshots whose layer is mounted remotely
	// (value "spanpull"); they are mounted again when the snapshotter
	// restarts. The prefix makes containerd keep it across namespaces.
	LabelRemote = "containerd.io/snapshot/remote"
	remoteValue = "spanpull"
	// LabelMode says how the snapshotter serves a remote snapshot's layer:
	// "lazy" (read on demand) or "unpacked" (downloaded and unpacked by
	// the snapshotter itself).
	LabelMode = "containerd.io/snapshot/spanpull.mode"
	// LabelVerified says whether a lazily served layer has been checked
	// against the image (its layer digest and diff_id): "unverified",
	// "verified" or "quarantined" (its index was found wrong; reads fail
	// until the layer is repaired from verified data).
	LabelVerified = "containerd.io/snapshot/spanpull.verified"
)

// liveLabels are the labels of a remote layer that change while it is
// mounted. They are not recorded on the committed snapshot, only merged
// into what Stat reports: containerd copies the recorded labels of a
// snapshot that Prepare committed into its own metadata, whose labels win
// over the snapshotter's in every Stat, so a recorded LabelVerified would
// read "unverified" forever.
var liveLabels = map[string]bool{LabelVerified: true}

// Prepare creates the active snapshot key on top of parent. When labels
// name a target snapshot (LabelSnapshotRef) and a layer digest
// (snapshotters.TargetLayerDigestLabel, set only by clients that wrap
// their pull with snapshotters.AppendInfoHandlerWrapper: nerdctl, CRI with
// snapshot annotations, "snapshotter pull") and a RemoteLayerResolver can
// mount that layer, Prepare commits the target itself and returns an error
// wrapping errdefs.ErrAlreadyExists, which tells containerd's unpacker to
// skip fetching and unpacking the layer. Otherwise it behaves like
// overlayfs' Prepare.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	if s.resolver == nil {
		return s.localize(s.overlay.Prepare(ctx, key, parent, opts...))
	}
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	target := base.Labels[LabelSnapshotRef]
	if target == "" || base.Labels[snapshotters.TargetLayerDigestLabel] == "" {
		return s.localize(s.overlay.Prepare(ctx, key, parent, opts...))
	}
	if _, err := s.overlay.Stat(ctx, target); err == nil {
		// Committed before (for another namespace, or by a concurrent
		// Prepare): containerd's metadata store finds it by its labels.
		s.metrics.prepares.WithLabelValues(resultExists).Inc()
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	}
	mounts, err := s.overlay.Prepare(ctx, key, parent, opts...)
	if err != nil {
		return nil, err
	}
	err = s.mountRemote(ctx, key, target, base.Labels, opts)
	switch {
	case err == nil:
		s.metrics.prepares.WithLabelValues(resultMounted).Inc()
		s.log.WithField("target", target).WithField("layer", base.Labels[snapshotters.TargetLayerDigestLabel]).Debug("spanpull: remote snapshot committed")
		return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	case errdefs.IsAlreadyExists(err):
		// Someone committed target meanwhile; our key is gone.
		s.metrics.prepares.WithLabelValues(resultExists).Inc()
		return nil, err
	case errors.Is(err, ErrNoRemote):
		s.metrics.prepares.WithLabelValues(resultNoRemote).Inc()
		s.log.WithError(err).WithField("layer", base.Labels[snapshotters.TargetLayerDigestLabel]).Debug("spanpull: layer is pulled normally")
	default:
		s.metrics.prepares.WithLabelValues(resultFailed).Inc()
		s.log.WithError(err).WithField("layer", base.Labels[snapshotters.TargetLayerDigestLabel]).Warn("spanpull: remote mount failed, layer is pulled normally")
	}
	// The active snapshot prepared above is still empty and unmounted:
	// containerd unpacks the layer into it.
	return mounts, nil
}

// mountRemote mounts the layer on the active snapshot key's directory and
// commits it as target. On success the key no longer exists; on failure
// it is left as it was, empty and unmounted, unless the error wraps
// ErrAlreadyExists (target was committed concurrently; key is removed).
func (s *Snapshotter) mountRemote(ctx context.Context, key, target string, labels map[string]string, opts []snapshots.Opt) error {
	id, err := s.snapshotID(ctx, key)
	if err != nil {
		return err
	}
	dir := s.upperPath(id)
	rm, err := s.resolver.Mount(ctx, dir, labels)
	if err != nil {
		if uerr := unmountUnder(dir); uerr != nil {
			// Never hand containerd a directory with a stray mount.
			return errors.Join(err, fmt.Errorf("remove stray mount: %w", uerr))
		}
		return err
	}
	if rm == nil {
		return fmt.Errorf("remote layer resolver returned no mount for %s: %w", dir, ErrNoRemote)
	}
	s.mu.Lock()
	s.mounted[id] = rm
	s.mu.Unlock()

	own := map[string]string{LabelRemote: remoteValue}
	for k, v := range rm.Labels() {
		if !liveLabels[k] {
			own[k] = v
		}
	}
	copts := append(append([]snapshots.Opt(nil), opts...), snapshots.WithLabels(own))
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// Not overlay's Commit: it would walk the whole remote tree to
		// compute disk usage, fetching nothing but stat'ing every file.
		_, err := storage.CommitActive(ctx, key, target, snapshots.Usage{}, copts...)
		return err
	})
	if err == nil {
		return nil
	}
	s.mu.Lock()
	delete(s.mounted, id)
	s.mu.Unlock()
	uerr := rm.Remove()
	if uerr == nil {
		uerr = unmountUnder(dir)
	}
	if uerr != nil {
		return errors.Join(fmt.Errorf("commit remote snapshot %s: %w", target, err), fmt.Errorf("unmount: %w", uerr))
	}
	if errdefs.IsAlreadyExists(err) {
		if rerr := s.Remove(ctx, key); rerr != nil {
			s.log.WithError(rerr).WithField("key", key).Warn("spanpull: remove unused snapshot")
		}
	}
	return fmt.Errorf("commit remote snapshot %s: %w", target, err)
}

// snapshotID returns the storage ID (directory name) of snapshot key.
func (s *Snapshotter) snapshotID(ctx context.Context, key string) (string, error) {
	id, _, err := s.storedInfo(ctx, key)
	if err != nil {
		return "", fmt.Errorf("snapshot %s: %w", key, err)
	}
	return id, nil
}

// upperPath is the directory holding snapshot id's files: overlayfs'
// upper dir while active, a lower dir once committed.
func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}

// restoreRemote mounts the remote layers of committed snapshots again, as
// after a restart (the previous process's mounts are dead or gone). A
// layer that cannot be mounted is logged and left empty: containers on it
// fail to read files rather than the whole snapshotter failing to start.
func (s *Snapshotter) restoreRemote(ctx context.Context) error {
	type remote struct {
		id   string
		info snapshots.Info
	}
	var remotes []remote
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind != snapshots.KindCommitted || info.Labels[LabelRemote] != remoteValue {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			remotes = append(remotes, remote{id: id, info: info})
			return nil
		})
	})
	if err != nil && !errdefs.IsNotFound(err) { // NotFound: a new, empty store
		return fmt.Errorf("list remote snapshots: %w", err)
	}
	// Layers are independent: mount them a few at a time, so a restart
	// with many remote layers does not wait for each in turn.
	sem := make(chan struct{}, restoreConcurrency)
	var wg sync.WaitGroup
	for _, r := range remotes {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			s.restoreOne(ctx, r.id, r.info)
		}()
	}
	wg.Wait()
	if n, ok := s.resolver.(RestoreNotifier); ok {
		if err := n.Restored(ctx); err != nil {
			s.log.WithError(err).Warn("spanpull: after mounting remote layers again")
		}
	}
	return nil
}

// restoreConcurrency bounds the remote layers mounted at once on restart.
const restoreConcurrency = 4

// restoreOne mounts the remote layer of committed snapshot id again. The
// old mount is left to the resolver: it takes the live connection over
// when it can (containers reading the layer never notice the restart), and
// replaces a dead mount otherwise.
func (s *Snapshotter) restoreOne(ctx context.Context, id string, info snapshots.Info) {
	dir := s.upperPath(id)
	l := s.log.WithField("snapshot", info.Name).WithField("layer", info.Labels[snapshotters.TargetLayerDigestLabel])
	if s.resolver == nil {
		l.Error("spanpull: remote layer cannot be mounted: no remote layer resolver configured")
		s.markUnrestored(id, info.Name)
		return
	}
	rm, err := s.resolver.Mount(ctx, dir, info.Labels)
	if err == nil && rm == nil {
		err = ErrNoRemote
	}
	if err != nil {
		l.WithError(err).Error("spanpull: remote layer cannot be mounted again; its files are unreadable")
		if uerr := unmountUnder(dir); uerr != nil {
			l.WithError(uerr).Error("spanpull: remote layer: remove old mount")
		}
		s.markUnrestored(id, info.Name)
		return
	}
	s.mu.Lock()
	s.mounted[id] = rm
	s.mu.Unlock()
}

// markUnrestored records that the remote layer of snapshot id could not be
// mounted again (see Ready).
func (s *Snapshotter) markUnrestored(id, name string) {
	s.mu.Lock()
	s.unrestored[id] = name
	s.mu.Unlock()
}
