//go:build linux

package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/testutil/treediff"
)

// TestLazyTreeMatchesOverlayfs is the differential test of the lazy path
// on a real layer: the Debian + python3 image is pulled once by
// containerd into its own overlayfs snapshotter and once lazily through
// spanpull, and the tree of a read-only view of each snapshot, mounted as
// containerd would mount it under a container, must be the same: every
// path, type, mode, owner, device, link count, mtime, xattr, link target,
// hard link and file content. Once the layer is complete and verified, a
// new view stacks the layer's local tree instead of the FUSE mount, and
// that tree must be the same again.
func TestLazyTreeMatchesOverlayfs(t *testing.T) {
	e := newLazyEnv(t, lazyLocalTreeConfig)
	start := time.Now()
	src, _ := e.pushPython(t, "py/diff", "src")
	ref := e.reg.Addr + "/py/diff:soci"
	e.indexer(t, "convert", src, ref)
	if out := e.pull(t, ref); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	e.cd.MustRun(t, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", src)

	client, err := containerd.New(e.cd.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	// The image's only layer: its chain ID is its diff ID.
	parent := e.layer.DiffID.String()
	want := e.mountView(t, client, "overlayfs", "diff-view-overlayfs", parent)
	got := e.mountView(t, client, "spanpull", "diff-view-lazy", parent)
	// The tree under test is the lazy layer, served over FUSE.
	if fs := statfsType(t, got); fs != unix.FUSE_SUPER_MAGIC {
		t.Fatalf("spanpull's view is not a FUSE mount (statfs type %#x)", fs)
	}
	pulled := time.Now()
	n := treediff.Compare(t, want, got, treediff.Options{})
	t.Logf("%d entries compared; pulls %v, comparison %v", n, pulled.Sub(start).Round(time.Millisecond), time.Since(pulled).Round(time.Millisecond))
	// The layer holds Debian and python3: a comparison of fewer entries
	// walked something else.
	if n < 5000 {
		t.Errorf("%d entries compared, the layer has many more", n)
	}

	// Once the background fill has completed the layer and it is
	// verified, a new view stacks the layer's local tree, not FUSE.
	e.waitVerification(t, "verified", 2*time.Minute)
	e.waitLog(t, "spanpull: verified layer unpacked", time.Minute)
	local := e.mountView(t, client, "spanpull", "diff-view-verified", parent)
	if fs := statfsType(t, local); fs == unix.FUSE_SUPER_MAGIC {
		t.Fatal("spanpull's view of the verified layer is still the FUSE mount, want its local tree")
	}
	if n := treediff.Compare(t, want, local, treediff.Options{}); n < 5000 {
		t.Errorf("%d entries of the local tree compared, the layer has many more", n)
	}
}

// lazyLocalTreeConfig leaves the reads of TestLazyTreeMatchesOverlayfs's
// first view to FUSE (the fill starts 30 s after the pull), then lets the
// fill complete the layer at its default rate.
const lazyLocalTreeConfig = "[remote]\nfill_delay_seconds = 30\n"

// waitLog waits until the daemon's log has a line containing msg.
func (e *lazyEnv) waitLog(t *testing.T, msg string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(e.daemonLog(t), msg) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the daemon's log after %v", msg, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// statfsType returns the type of the file system mounted at dir.
func statfsType(t *testing.T, dir string) int64 {
	t.Helper()
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	return fs.Type
}

// mountView makes a read-only view of the committed snapshot parent of
// snapshotter (under a lease, so that containerd's garbage collector
// leaves it alone), mounts it with the mounts the snapshotter gives for it
// (as for a container's root file system) on a new directory and returns
// that directory. Cleanup unmounts it and removes the view and the lease.
func (e *lazyEnv) mountView(t *testing.T, client *containerd.Client, snapshotter, key, parent string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(e.nsContext(), time.Minute)
	defer cancel()
	ctx, done, err := client.WithLease(ctx, leases.WithExpiration(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cleanup := func(ctx context.Context) {
		if err := done(context.WithoutCancel(ctx)); err != nil {
			t.Errorf("remove the lease of %s's view: %v", snapshotter, err)
		}
	}
	sn := client.SnapshotService(snapshotter)
	mounts, err := sn.View(ctx, key, parent)
	if err != nil {
		cleanup(ctx)
		t.Fatalf("view of %s's snapshot %s: %v", snapshotter, parent, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(e.nsContext(), time.Minute)
		defer cancel()
		if err := sn.Remove(ctx, key); err != nil {
			t.Errorf("remove %s's view: %v", snapshotter, err)
		}
		cleanup(ctx)
	})
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mount %s's view %+v: %v", snapshotter, mounts, err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmount %s: %v", target, err)
		}
	})
	t.Logf("%s view: %+v", snapshotter, mounts)
	return target
}

// nsContext is a context in the namespace of the env's ctr calls.
func (e *lazyEnv) nsContext() context.Context {
	ns := e.cd.Namespace
	if ns == "" {
		ns = namespaces.Default
	}
	return namespaces.WithNamespace(context.Background(), ns)
}
