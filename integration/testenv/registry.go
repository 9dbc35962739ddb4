//go:build linux

package testenv

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/registry/registrytest"
)

// Registry is Debian's docker-registry run as a daemon whose storage the
// test can reach (to corrupt a blob) and which it can stop and start again
// on the same address (to take the registry away under a running
// snapshotter). StartRegistry is simpler when neither is needed.
type Registry struct {
	*registrytest.Distribution
}

// StartRegistryDaemon starts docker-registry with its storage and log in
// dir on a free loopback port. It is stopped in Cleanup.
func StartRegistryDaemon(t testing.TB, dir string) *Registry {
	t.Helper()
	d, err := registrytest.LaunchDistribution(context.Background(), registrytest.DistributionOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	r := &Registry{Distribution: d}
	cleanupProcess(t, d.Process, func() error { return r.Distribution.Stop() })
	return r
}

// Stop stops the registry; its address refuses connections afterwards.
func (r *Registry) Stop(t testing.TB) {
	t.Helper()
	if err := r.Distribution.Stop(); err != nil {
		t.Logf("stop registry: %v", err)
	}
}

// Restart starts the stopped registry again on the same address and
// storage.
func (r *Registry) Restart(t testing.TB) {
	t.Helper()
	if err := r.Distribution.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	cleanupProcess(t, r.Process, func() error { return r.Distribution.Stop() })
}

// BlobPath is the file holding blob d in the registry's storage.
func (r *Registry) BlobPath(d digest.Digest) string {
	enc := d.Encoded()
	return filepath.Join(r.Storage, "docker", "registry", "v2", "blobs", d.Algorithm().String(), enc[:2], enc, "data")
}
