// Package snaptest inspects a containerd snapshotter from tests: the
// tests of the snapshotter itself and of the daemon serving it over gRPC
// both check which snapshots a store holds, through the same Walk a
// containerd client uses.
package snaptest

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// Names returns the names of the snapshots sn's Walk finds with filters,
// in Walk's order. It fails the test if Walk fails.
func Names(ctx context.Context, t testing.TB, sn snapshots.Snapshotter, filters ...string) []string {
	t.Helper()
	var names []string
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		names = append(names, i.Name)
		return nil
	}, filters...); err != nil {
		t.Fatal(err)
	}
	return names
}
