//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/testutil/dirtest"
	"github.com/spanpull/spanpull/internal/testutil/snaptest"
)

// bindResolver serves "remote" layers by bind-mounting local directories
// read-only: a real mount, so unmounting on Remove, Cleanup and Close is
// tested for real, without a registry.
type bindResolver struct {
	mu     sync.Mutex
	layers map[string]string // layer digest -> directory
	err    error             // returned by Mount when set
	calls  int
	live   map[string]bool   // mounted dirs
	local  map[string]string // layer digest -> its LocalDir
}

func newBindResolver() *bindResolver {
	return &bindResolver{layers: map[string]string{}, live: map[string]bool{}, local: map[string]string{}}
}

func (r *bindResolver) Mount(ctx context.Context, dir string, labels map[string]string) (RemoteMount, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	if r.err != nil {
		return nil, r.err
	}
	src, ok := r.layers[labels[snapshotters.TargetLayerDigestLabel]]
	if !ok {
		return nil, fmt.Errorf("layer %s: %w", labels[snapshotters.TargetLayerDigestLabel], ErrNoRemote)
	}
	// Like a real resolver: a mount left on dir by a previous process is
	// the resolver's to take over or replace.
	for unix.Unmount(dir, unix.MNT_DETACH) == nil {
	}
	if err := unix.Mount(src, dir, "", unix.MS_BIND, ""); err != nil {
		return nil, fmt.Errorf("bind %s: %w", src, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		unix.Unmount(dir, 0)
		return nil, fmt.Errorf("remount ro: %w", err)
	}
	r.live[dir] = true
	return &bindMount{r: r, dir: dir, layer: labels[snapshotters.TargetLayerDigestLabel]}, nil
}

func (r *bindResolver) liveMounts() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.live)
}

type bindMount struct {
	r     *bindResolver
	dir   string
	layer string
}

func (m *bindMount) Remove() error { return m.Release() }

func (m *bindMount) Labels() map[string]string { return map[string]string{LabelMode: "lazy"} }

func (m *bindMount) Usage() snapshots.Usage { return snapshots.Usage{Size: 4096} }

func (m *bindMount) LocalDir() string {
	m.r.mu.Lock()
	defer m.r.mu.Unlock()
	return m.r.local[m.layer]
}

// Release unmounts: a bind mount cannot outlive the test's resolver.
func (m *bindMount) Release() error {
	m.r.mu.Lock()
	defer m.r.mu.Unlock()
	if !m.r.live[m.dir] {
		return fmt.Errorf("%s unmounted twice", m.dir)
	}
	delete(m.r.live, m.dir)
	return unix.Unmount(m.dir, 0)
}

// layerDir makes a directory with files (name -> content).
func layerDir(t *testing.T, files map[string]string) string {
	t.Helper()
	d := t.TempDir()
	for name, data := range files {
		p := filepath.Join(d, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// newRemote starts a snapshotter under root over the remote layer
// resolver r.
func newRemote(ctx context.Context, t *testing.T, root string, r RemoteLayerResolver, opts ...Opt) *Snapshotter {
	t.Helper()
	sn, err := New(ctx, root, append([]Opt{WithRemoteLayerResolver(r)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return sn
}

// newL1Snapshotter starts a snapshotter under root over a bind resolver
// that holds layer sha256:l1, and prepares k1 from it, which mounts the
// layer remotely (containerd then sees AlreadyExists).
func newL1Snapshotter(ctx context.Context, t *testing.T, root string, opts ...Opt) (*Snapshotter, *bindResolver) {
	t.Helper()
	r := newBindResolver()
	r.layers["sha256:l1"] = layerDir(t, map[string]string{"hello": "world"})
	sn := newRemote(ctx, t, root, r, opts...)
	if _, err := sn.Prepare(ctx, "k1", "", unpackLabels("c1", "sha256:l1")); !errdefs.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	return sn, r
}

// unpackLabels are the labels containerd's unpacker passes with
// AppendInfoHandlerWrapper.
func unpackLabels(target, layer string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{
		LabelSnapshotRef:                    target,
		snapshotters.TargetLayerDigestLabel: layer,
		snapshotters.TargetRefLabel:         "127.0.0.1:1/x:y",
	})
}

func mountsBelow(t *testing.T, dir string) int {
	t.Helper()
	m, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

// closeUnmounted closes sn and fails the test if a mount is left below
// root.
func closeUnmounted(t *testing.T, sn *Snapshotter, root string) {
	t.Helper()
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(t, root); n != 0 {
		t.Fatalf("%d mounts left", n)
	}
}

// withMounted mounts ms on a temporary directory, runs fn on it and
// unmounts it.
func withMounted(t *testing.T, ms []mount.Mount, fn func(dir string)) {
	t.Helper()
	d := t.TempDir()
	if err := mount.All(ms, d); err != nil {
		t.Fatalf("mount %+v: %v", ms, err)
	}
	defer func() {
		if err := mount.UnmountAll(d, 0); err != nil {
			t.Errorf("unmount: %v", err)
		}
	}()
	fn(d)
}

// readMounted mounts ms, reads the file name in it and unmounts it.
func readMounted(t *testing.T, ms []mount.Mount, name string) string {
	t.Helper()
	var s string
	withMounted(t, ms, func(dir string) { s = dirtest.ReadString(t, filepath.Join(dir, name)) })
	return s
}

func TestRemotePrepare(t *testing.T) {
	requireRoot(t)
	ctx := context.Background() // no namespace, as from containerd 1.6
	root := t.TempDir()
	r := newBindResolver()
	r.layers["sha256:l1"] = layerDir(t, map[string]string{"a": "from l1", "dir/b": "b1"})
	r.layers["sha256:l2"] = layerDir(t, map[string]string{"dir/b": "b2"})
	reg := prometheus.NewRegistry()
	sn := newRemote(ctx, t, root, r, WithMetrics(reg))
	defer sn.Close()

	// Layer 1: mounted remotely, committed as its chain ID by Prepare.
	_, err := sn.Prepare(ctx, "extract-1 c1", "", unpackLabels("c1", "sha256:l1"))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("prepare of a remote layer: err = %v, want AlreadyExists", err)
	}
	info, err := sn.Stat(ctx, "c1")
	if err != nil {
		t.Fatalf("stat of the committed target: %v", err)
	}
	if info.Kind != snapshots.KindCommitted || info.Labels[LabelRemote] != "spanpull" || info.Labels[LabelSnapshotRef] != "c1" {
		t.Fatalf("target info = %+v", info)
	}
	if _, err := sn.Stat(ctx, "extract-1 c1"); !errdefs.IsNotFound(err) {
		t.Fatalf("the extraction key must be gone: %v", err)
	}
	// containerd's metadata store finds the target exactly like this.
	found := snaptest.Names(ctx, t, sn, `labels."containerd.io/snapshot.ref"==c1,parent==""`)
	if len(found) != 1 || found[0] != "c1" {
		t.Fatalf("walk by target label found %v", found)
	}

	// Layer 2 on top of it; then again: already there, resolver not asked.
	if _, err := sn.Prepare(ctx, "extract-2 c2", "c1", unpackLabels("c2", "sha256:l2")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("prepare layer 2: %v", err)
	}
	calls := r.calls
	if _, err := sn.Prepare(ctx, "extract-2b c2", "c1", unpackLabels("c2", "sha256:l2")); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("prepare of an existing target: %v", err)
	}
	if r.calls != calls {
		t.Fatal("resolver called for a target that already exists")
	}
	if r.liveMounts() != 2 {
		t.Fatalf("%d live remote mounts, want 2", r.liveMounts())
	}
	for name, want := range map[string]float64{
		`spanpull_snapshotter_remote_prepares_total{result="mounted"}`:   2,
		`spanpull_snapshotter_remote_prepares_total{result="exists"}`:    1,
		`spanpull_snapshotter_remote_prepares_total{result="no_remote"}`: 0,
		`spanpull_snapshotter_remote_mounts`:                             2,
	} {
		if got := metricValue(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}

	// A container: overlay of both remote layers plus a writable upper.
	ms, err := sn.Prepare(ctx, "container", "c2")
	if err != nil {
		t.Fatal(err)
	}
	withMounted(t, ms, func(d string) {
		if got := dirtest.ReadString(t, filepath.Join(d, "a")); got != "from l1" {
			t.Errorf("a = %q", got)
		}
		if got := dirtest.ReadString(t, filepath.Join(d, "dir/b")); got != "b2" {
			t.Errorf("dir/b = %q, want the upper layer's", got)
		}
		if err := os.WriteFile(filepath.Join(d, "a"), []byte("changed"), 0o644); err != nil {
			t.Errorf("copy-up over a remote layer: %v", err)
		}
	})
	if got := dirtest.ReadString(t, filepath.Join(r.layers["sha256:l1"], "a")); got != "from l1" {
		t.Fatalf("the remote layer was written through: %q", got)
	}

	// A remote layer cannot go while a snapshot uses it.
	if err := sn.Remove(ctx, "c2"); err == nil {
		t.Fatal("removed a parent snapshot")
	}
	for _, k := range []string{"container", "c2"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatalf("remove %s: %v", k, err)
		}
	}
	if r.liveMounts() != 1 {
		t.Fatalf("%d live remote mounts after removing c2, want 1", r.liveMounts())
	}
	if err := sn.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(t, root); n != 0 || r.liveMounts() != 0 {
		t.Fatalf("after removing every snapshot: %d mounts below root, %d live", n, r.liveMounts())
	}
	ents, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil || len(ents) != 0 {
		t.Fatalf("snapshot dirs left: %v %v", ents, err)
	}
}

// TestRemoteLocalDir: once a remote layer has a local tree, mounts made
// from then on (a view, a new active snapshot, Mounts of an existing one)
// stack the tree in place of the remote mount, and a mount made before
// keeps reading the remote mount.
func TestRemoteLocalDir(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	sn, r := newL1Snapshotter(ctx, t, t.TempDir())
	defer sn.Close()
	before, err := sn.View(ctx, "v1", "c1")
	if err != nil {
		t.Fatal(err)
	}
	if got := readMounted(t, before, "hello"); got != "world" {
		t.Fatalf("view before the tree: hello = %q, want the remote mount's \"world\"", got)
	}
	local := layerDir(t, map[string]string{"hello": "local"})
	r.mu.Lock()
	r.local["sha256:l1"] = local
	r.mu.Unlock()

	view, err := sn.View(ctx, "v2", "c1")
	if err != nil {
		t.Fatal(err)
	}
	active, err := sn.Prepare(ctx, "a1", "c1")
	if err != nil {
		t.Fatal(err)
	}
	again, err := sn.Mounts(ctx, "v1")
	if err != nil {
		t.Fatal(err)
	}
	for name, ms := range map[string][]mount.Mount{"view": view, "active": active, "mounts of the earlier view": again} {
		if !strings.Contains(fmt.Sprint(ms), "/local") {
			t.Errorf("%s: mounts %+v do not name the snapshot's link to the local tree %s", name, ms, local)
		}
		if got := readMounted(t, ms, "hello"); got != "local" {
			t.Errorf("%s: hello = %q, want the local tree's \"local\"", name, got)
		}
	}
}

func TestRemoteFallback(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	r := newBindResolver()
	reg := prometheus.NewRegistry()
	sn := newRemote(ctx, t, t.TempDir(), r, WithMetrics(reg))
	defer sn.Close()

	for name, rerr := range map[string]error{
		"no remote":      nil, // the resolver knows no layer: ErrNoRemote
		"resolver fails": errors.New("registry down"),
	} {
		t.Run(name, func(t *testing.T) {
			r.err = rerr
			key, target := "extract "+name, "chain "+name
			ms, err := sn.Prepare(ctx, key, "", unpackLabels(target, "sha256:unknown"))
			if err != nil {
				t.Fatalf("prepare must fall back to a normal snapshot: %v", err)
			}
			// containerd unpacks into it, then commits.
			withMounted(t, ms, func(d string) {
				if err := os.WriteFile(filepath.Join(d, "f"), []byte("unpacked"), 0o644); err != nil {
					t.Fatal(err)
				}
			})
			if err := sn.Commit(ctx, target, key); err != nil {
				t.Fatal(err)
			}
			info, err := sn.Stat(ctx, target)
			if err != nil || info.Labels[LabelRemote] != "" {
				t.Fatalf("stat %s: %+v, %v", target, info, err)
			}
			u, err := sn.Usage(ctx, target)
			if err != nil || u.Size == 0 {
				t.Fatalf("usage of an unpacked layer: %+v, %v", u, err)
			}
		})
	}

	// Without a layer digest the resolver is not asked at all (plain
	// "ctr image pull" sends only the snapshot ref).
	calls := r.calls
	r.err = nil
	if _, err := sn.Prepare(ctx, "plain", "", snapshots.WithLabels(map[string]string{LabelSnapshotRef: "x"})); err != nil {
		t.Fatal(err)
	}
	if r.calls != calls {
		t.Fatal("resolver asked without a layer digest label")
	}
	for name, want := range map[string]float64{
		`spanpull_snapshotter_remote_prepares_total{result="mounted"}`:   0,
		`spanpull_snapshotter_remote_prepares_total{result="no_remote"}`: 1,
		`spanpull_snapshotter_remote_prepares_total{result="failed"}`:    1,
	} {
		if got := metricValue(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// metricValue returns the value of a counter or gauge, named as in the
// text exposition format: name{label="value"}.
func metricValue(t *testing.T, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			id := mf.GetName()
			if len(m.GetLabel()) > 0 {
				var ls []string
				for _, l := range m.GetLabel() {
					ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
				}
				id += "{" + strings.Join(ls, ",") + "}"
			}
			if id != name {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// A resolver that mounts and then fails must not leave its mount behind.
type strayResolver struct{}

func (strayResolver) Mount(ctx context.Context, dir string, labels map[string]string) (RemoteMount, error) {
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, ""); err != nil {
		return nil, err
	}
	return nil, errors.New("half-way failure")
}

func TestRemoteStrayMountRemoved(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	sn := newRemote(ctx, t, root, strayResolver{})
	defer sn.Close()
	if _, err := sn.Prepare(ctx, "k", "", unpackLabels("t", "sha256:x")); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(t, root); n != 0 {
		t.Fatalf("%d stray mounts left", n)
	}
}

func TestRemoteAsyncRemoveAndRestart(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	sn, r := newL1Snapshotter(ctx, t, root, WithAsyncRemove())
	if _, err := sn.Prepare(ctx, "k2", "", unpackLabels("c2", "sha256:l1")); !errdefs.IsAlreadyExists(err) {
		t.Fatal(err)
	}

	// Close releases the mounts; a new snapshotter mounts them again.
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(t, root); n != 0 || r.liveMounts() != 0 {
		t.Fatalf("after Close: %d mounts below root, %d live", n, r.liveMounts())
	}
	sn = newRemote(ctx, t, root, r, WithAsyncRemove())
	defer sn.Close()
	if r.liveMounts() != 2 {
		t.Fatalf("after restart: %d live remote mounts, want 2", r.liveMounts())
	}
	ms, err := sn.View(ctx, "v", "c1")
	if err != nil {
		t.Fatal(err)
	}
	if got := readMounted(t, ms, "hello"); got != "world" {
		t.Errorf("hello after restart = %q", got)
	}

	// Async: Remove keeps the mount until Cleanup.
	for _, k := range []string{"v", "c1"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if r.liveMounts() != 2 {
		t.Fatalf("async remove unmounted early: %d live", r.liveMounts())
	}
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if r.liveMounts() != 1 || mountsBelow(t, root) != 1 {
		t.Fatalf("after cleanup: %d live, %d mounted", r.liveMounts(), mountsBelow(t, root))
	}

	// A restart with a resolver that cannot serve the layer still starts.
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	r.err = errors.New("registry gone")
	sn2, err := New(ctx, root, WithRemoteLayerResolver(r))
	if err != nil {
		t.Fatalf("restart with a failing resolver: %v", err)
	}
	if err := sn2.Remove(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	closeUnmounted(t, sn2, root)
}

// A dead mount left by a crashed process (here: any mount on the
// directory) is replaced on restart.
func TestRemoteRestartReplacesOldMount(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	sn, r := newL1Snapshotter(ctx, t, root)
	// Simulate a crash: forget the mount without unmounting it.
	sn.mu.Lock()
	sn.mounted = map[string]RemoteMount{}
	sn.mu.Unlock()
	r.mu.Lock()
	r.live = map[string]bool{}
	r.mu.Unlock()
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if n := mountsBelow(t, root); n != 1 {
		t.Fatalf("%d mounts, want the stale one", n)
	}
	sn = newRemote(ctx, t, root, r)
	if n := mountsBelow(t, root); n != 1 || r.liveMounts() != 1 {
		t.Fatalf("after restart: %d mounts (want 1), %d live", n, r.liveMounts())
	}
	if err := sn.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	closeUnmounted(t, sn, root)
	if s := strings.TrimSpace(fmt.Sprint(r.liveMounts())); s != "0" {
		t.Fatalf("live = %s", s)
	}
}

// Two images sharing a layer, pulled at once: every Prepare of the same
// target answers AlreadyExists and exactly one mount stays.
func TestRemoteConcurrentSameTarget(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	r := newBindResolver()
	r.layers["sha256:l1"] = layerDir(t, map[string]string{"hello": "world"})
	sn := newRemote(ctx, t, root, r)
	defer sn.Close()
	const n = 8
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := sn.Prepare(ctx, fmt.Sprintf("extract-%d", i), "", unpackLabels("c1", "sha256:l1"))
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; !errdefs.IsAlreadyExists(err) {
			t.Errorf("concurrent prepare: %v, want AlreadyExists", err)
		}
	}
	if got := mountsBelow(t, root); got != 1 || r.liveMounts() != 1 {
		t.Fatalf("%d mounts below root, %d live; want 1", got, r.liveMounts())
	}
	keys := snaptest.Names(ctx, t, sn)
	if len(keys) != 1 || keys[0] != "c1" {
		t.Fatalf("snapshots left: %v, want only c1", keys)
	}
	ents, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil || len(ents) != 1 {
		t.Fatalf("snapshot dirs: %d (%v), want 1", len(ents), err)
	}
}

// Many remote layers are all mounted again on restart (a few at a time).
func TestRemoteRestartMany(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	r := newBindResolver()
	const n = 10
	for i := range n {
		r.layers[fmt.Sprintf("sha256:l%d", i)] = layerDir(t, map[string]string{"id": fmt.Sprint(i)})
	}
	sn := newRemote(ctx, t, root, r)
	parent := ""
	for i := range n {
		target := fmt.Sprintf("c%d", i)
		if _, err := sn.Prepare(ctx, "k"+target, parent, unpackLabels(target, fmt.Sprintf("sha256:l%d", i))); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("prepare %s: %v", target, err)
		}
		parent = target
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	sn = newRemote(ctx, t, root, r)
	defer sn.Close()
	if got := r.liveMounts(); got != n {
		t.Fatalf("%d layers mounted after restart, want %d", got, n)
	}
	for i := range n {
		ms, err := sn.View(ctx, fmt.Sprintf("v%d", i), fmt.Sprintf("c%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if got := readMounted(t, ms, "id"); got != fmt.Sprint(i) {
			t.Errorf("layer %d reads id %q", i, got)
		}
	}
}
