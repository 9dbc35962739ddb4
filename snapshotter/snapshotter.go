//go:build linux

// Package snapshotter is spanpull's containerd snapshotter: an overlayfs
// snapshotter (containerd's own, wrapped) that can also serve a layer
// remotely. When containerd's unpacker prepares a layer and a
// RemoteLayerResolver can mount that layer lazily, the snapshot is committed
// on the spot and Prepare answers ErrAlreadyExists, so containerd neither
// fetches nor unpacks the blob.
//
// The package knows nothing about registries or FUSE: it only mounts what a
// RemoteLayerResolver gives it and unmounts it again when the snapshot goes.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// Snapshotter implements containerd's snapshots.Snapshotter and
// snapshots.Cleaner on top of overlayfs. Local layers behave exactly like
// containerd's "overlayfs" snapshotter (it is used underneath, sharing one
// metadata store); remote layers are mounted on the snapshot's "fs"
// directory, which overlayfs then stacks as a lower dir like any other,
// until the layer has a verified local tree, which mounts made from then
// on stack instead (localize).
type Snapshotter struct {
	root        string
	ms          *storage.MetaStore
	overlay     snapshots.Snapshotter
	asyncRemove bool
	resolver    RemoteLayerResolver
	log         *log.Entry

	// mu guards mounted and closed.
	mu sync.Mutex
	// mounted holds the remote mounts this process made, by snapshot ID.
	mounted map[string]RemoteMount
	// unrestored names the committed remote snapshots whose layer could
	// not be mounted again at start, by snapshot ID (see Ready).
	unrestored map[string]string
	closed     bool
	readiness  []func() error

	metrics *metrics
}

// The Snapshotter must be usable wherever containerd expects a snapshotter
// with asynchronous cleanup (the snapshots gRPC service checks for Cleaner).
var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

type config struct {
	asyncRemove  bool
	mountOptions []string
	resolver     RemoteLayerResolver
	registerer   prometheus.Registerer
	logger       *log.Entry
	readiness    []func() error
}

// Opt configures a Snapshotter in New.
type Opt func(*config) error

// WithAsyncRemove defers freeing disk space (and unmounting remote layers)
// from Remove to the next Cleanup, as containerd's overlayfs plugin does by
// default: Remove then only touches metadata and stays fast.
func WithAsyncRemove() Opt {
	return func(c *config) error {
		c.asyncRemove = true
		return nil
	}
}

// WithMountOptions adds overlayfs mount options to every overlay mount the
// snapshotter returns (for example "volatile").
func WithMountOptions(options ...string) Opt {
	return func(c *config) error {
		c.mountOptions = append(c.mountOptions, options...)
		return nil
	}
}

// WithRemoteLayerResolver lets Prepare serve layers remotely: see
// RemoteLayerResolver. Without it the snapshotter is a plain overlayfs one.
func WithRemoteLayerResolver(r RemoteLayerResolver) Opt {
	return func(c *config) error {
		if r == nil {
			return errors.New("nil remote layer resolver")
		}
		c.resolver = r
		return nil
	}
}

// WithMetrics registers the snapshotter's metrics (remote layer outcomes,
// live remote mounts) with reg, so a silent fallback to full pulls shows.
func WithMetrics(reg prometheus.Registerer) Opt {
	return func(c *config) error {
		c.registerer = reg
		return nil
	}
}

// WithLogger sets the logger of the snapshotter's own lines (remote layer
// mounts, fallbacks, cleanup failures). Without it they go to a logger of
// its own on stderr at info level. containerd code the snapshotter calls
// logs through log.G(ctx): a daemon puts the same logger in the contexts
// it passes (log.WithLogger).
func WithLogger(l *log.Entry) Opt {
	return func(c *config) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.logger = l
		return nil
	}
}

// New opens (creating if needed) a snapshotter whose metadata and snapshot
// directories live under root. It must run as root on a kernel with
// overlayfs; root's file system must support d_type.
func New(ctx context.Context, root string, opts ...Opt) (*Snapshotter, error) {
	var c config
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, fmt.Errorf("snapshotter option: %w", err)
		}
	}
	if root == "" {
		return nil, errors.New("snapshotter root directory is empty")
	}
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("snapshotter root %q: %w", root, err)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create snapshotter root: %w", err)
	}
	// Mount points are matched against the mount table by path.
	if root, err = filepath.EvalSymlinks(root); err != nil {
		return nil, fmt.Errorf("snapshotter root: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("open snapshot metadata in %s: %w", root, err)
	}
	// The overlay snapshotter shares our metadata store (so we can find a
	// snapshot's directory by ID) and never removes directories itself: we
	// do, because a directory may hold a remote mount that must go first.
	oopts := []overlay.Opt{overlay.WithMetaStore(ms), overlay.AsynchronousRemove}
	if len(c.mountOptions) > 0 {
		oopts = append(oopts, overlay.WithMountOptions(c.mountOptions))
	}
	o, err := overlay.NewSnapshotter(root, oopts...)
	if err != nil {
		ms.Close()
		return nil, fmt.Errorf("overlay snapshotter in %s: %w", root, err)
	}
	if c.logger == nil {
		c.logger = logrus.NewEntry(logrus.New())
	}
	s := &Snapshotter{
		root:        root,
		ms:          ms,
		overlay:     o,
		asyncRemove: c.asyncRemove,
		resolver:    c.resolver,
		log:         c.logger,
		mounted:     make(map[string]RemoteMount),
		unrestored:  make(map[string]string),
		readiness:   c.readiness,
	}
	s.metrics = newMetrics(s)
	if c.registerer != nil {
		if err := s.metrics.register(c.registerer); err != nil {
			ms.Close()
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	if err := s.restoreRemote(ctx); err != nil {
		ms.Close()
		return nil, err
	}
	return s, nil
}

// Stat returns the info of the active or committed snapshot key. The
// labels of a remote layer this process serves include its current ones
// (RemoteMount.Labels), such as whether it has been verified.
func (s *Snapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	id, info, err := s.storedInfo(ctx, key)
	if err != nil {
		return snapshots.Info{}, err
	}
	if rm := s.remote(id); rm != nil {
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		maps.Copy(info.Labels, rm.Labels())
	}
	return info, nil
}

// storedInfo reads the storage ID (directory name) and the stored info of
// snapshot key in a read-only transaction of the metadata store: Stat,
// Usage and snapshotID each need one or both, and this is the one lookup
// they share.
func (s *Snapshotter) storedInfo(ctx context.Context, key string) (string, snapshots.Info, error) {
	var (
		id   string
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return id, info, err
}

// remote returns the remote mount this process made for snapshot id, or
// nil.
func (s *Snapshotter) remote(id string) RemoteMount {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mounted[id]
}

// Update updates the labels (the only mutable field) of a snapshot.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	return s.overlay.Update(ctx, info, fieldpaths...)
}

// Usage returns the disk usage of a snapshot. For a remote layer it is
// what the layer keeps on local disk now (cached data, which grows as the
// layer is read and shrinks when the cache evicts), so that containerd's
// image filesystem statistics and the kubelet's image GC see it.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	id, _, err := s.storedInfo(ctx, key)
	if err != nil {
		return snapshots.Usage{}, err
	}
	if rm := s.remote(id); rm != nil {
		return rm.Usage(), nil
	}
	return s.overlay.Usage(ctx, key)
}

// Mounts returns the mounts of the active or view snapshot key again.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	return s.localize(s.overlay.Mounts(ctx, key))
}

// View creates a read-only view of parent named key.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.localize(s.overlay.View(ctx, key, parent, opts...))
}

// Commit turns the active snapshot key into the committed snapshot name.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return s.overlay.Commit(ctx, name, key, opts...)
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.overlay.Walk(ctx, fn, filters...)
}

// Remove removes the snapshot key. Unless the snapshotter was created with
// WithAsyncRemove, its directory is unmounted and deleted before Remove
// returns; otherwise that happens in Cleanup.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	if err := s.overlay.Remove(ctx, key); err != nil {
		return err
	}
	if s.asyncRemove {
		return nil
	}
	// Like containerd's snapshotters: the metadata is gone, so failing to
	// free the disk space is logged, not returned; Cleanup retries.
	if err := s.Cleanup(ctx); err != nil {
		s.log.WithError(err).WithField("key", key).Warn("spanpull: cleanup after remove")
	}
	return nil
}

// Cleanup unmounts and deletes the directories of removed snapshots.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	dirs, err := s.orphanDirs(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, d := range dirs {
		if err := s.removeDir(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// orphanDirs lists the snapshot directories that no snapshot refers to.
// It holds a write transaction so no snapshot is created meanwhile.
func (s *Snapshotter) orphanDirs(ctx context.Context) ([]string, error) {
	var dirs []string
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return fmt.Errorf("list snapshot ids: %w", err)
		}
		names, err := readDirNames(filepath.Join(s.root, "snapshots"))
		if err != nil {
			return err
		}
		for _, n := range names {
			if _, ok := ids[n]; !ok {
				dirs = append(dirs, n)
			}
		}
		return nil
	})
	return dirs, err
}

func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open snapshots dir: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(0)
	if err != nil {
		return nil, fmt.Errorf("read snapshots dir %s: %w", dir, err)
	}
	return names, nil
}

// removeDir releases the remote mount of snapshot id (if this process made
// one), unmounts anything still mounted below its directory and deletes
// it. It never deletes through a mount point.
func (s *Snapshotter) removeDir(id string) error {
	dir := filepath.Join(s.root, "snapshots", id)
	s.mu.Lock()
	rm, ok := s.mounted[id]
	delete(s.mounted, id)
	delete(s.unrestored, id)
	s.mu.Unlock()
	if ok {
		if err := rm.Remove(); err != nil {
			s.log.WithError(err).WithField("snapshot", id).Warn("spanpull: remove remote layer")
		}
	}
	if err := unmountUnder(dir); err != nil {
		return fmt.Errorf("remove snapshot dir %s: %w", dir, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove snapshot dir: %w", err)
	}
	return nil
}

// unmountUnder unmounts every mount at or below dir, deepest first, and
// checks that none is left.
func unmountUnder(dir string) error {
	left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	if len(left) == 0 {
		return nil
	}
	if err := mount.UnmountRecursive(dir, 0); err != nil {
		// A mount still in use (a container running on it): detach it
		// so it goes once the last user does.
		if err := mount.UnmountRecursive(dir, detachFlag); err != nil {
			return fmt.Errorf("unmount: %w", err)
		}
	}
	left, err = mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	if len(left) > 0 {
		return fmt.Errorf("%d mounts left below %s (first %s)", len(left), dir, left[0].Mountpoint)
	}
	return nil
}

// Close releases the remote mounts this process made (RemoteMount.Release:
// lazy layers stay mounted for the next process to take over) and closes
// the metadata store. Snapshots survive: a new Snapshotter on the same root
// serves remote layers again.
func (s *Snapshotter) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	mounted := s.mounted
	s.mounted = map[string]RemoteMount{}
	s.mu.Unlock()

	var errs []error
	for id, rm := range mounted {
		if err := rm.Release(); err != nil {
			errs = append(errs, fmt.Errorf("release remote layer of snapshot %s: %w", id, err))
		}
	}
	if err := s.overlay.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close snapshot metadata: %w", err))
	}
	return errors.Join(errs...)
}
