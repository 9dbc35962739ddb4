//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// Ready fails while a remembered remote layer could not be mounted again
// at start, until its snapshot is removed, and while a WithReadiness
// check fails.
func TestReady(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	sn, r := newL1Snapshotter(ctx, t, root)
	if err := sn.Ready(); err != nil {
		t.Fatalf("ready with its layer mounted: %v", err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}

	r.err = errors.New("registry gone")
	var checkErr error
	sn = newRemote(ctx, t, root, r, WithReadiness(func() error { return checkErr }))
	defer sn.Close()
	if err := sn.Ready(); err == nil || !strings.Contains(err.Error(), "1 remote layers were not mounted again: c1") {
		t.Fatalf("ready with an unrestored layer: %v", err)
	}
	if err := sn.Remove(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Ready(); err != nil {
		t.Fatalf("ready once the snapshot is gone: %v", err)
	}
	checkErr = errors.New("resolver not ready")
	if err := sn.Ready(); !errors.Is(err, checkErr) {
		t.Fatalf("ready with a failing check: %v", err)
	}
}
