//go:build linux

package testenv

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/registry/registrytest"
)

// Registry is Debian's docker-registry run as a daemon whose storage the
// test can reach (to corrupt a blob) and which it can stop and start again
// on the same address (to take the registry away under a running
// snapshotter). StartRegistry is simpler when neither is needed.
type Registry struct {
	// Addr is "127.0.0.1:port".
	Addr string
	// Storage is the filesystem storage's root directory.
	Storage string

	dir, cfg string
	proc     *Process
}

// StartRegistryDaemon starts docker-registry with its storage and log in
// dir on a free loopback port. It is stopped in Cleanup.
func StartRegistryDaemon(t testing.TB, dir string) *Registry {
	t.Helper()
	bin := registrytest.DistributionBinary
	if p := os.Getenv("SPANPULL_DOCKER_REGISTRY"); p != "" {
		bin = p
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("docker-registry not installed (%v): run scripts/install-deps.sh", err)
	}
	r := &Registry{dir: dir, Storage: filepath.Join(dir, "registry-data"), cfg: filepath.Join(dir, "registry.yml")}
	var lastErr error
	for try := 0; try < 3; try++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r.Addr = l.Addr().String()
		l.Close()
		cfg := registrytest.DistributionConfig(r.Storage, r.Addr)
		if err := os.WriteFile(r.cfg, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		if lastErr = r.start(t, bin); lastErr == nil {
			return r
		}
	}
	t.Fatalf("start docker-registry: %v", lastErr)
	return nil
}

func (r *Registry) start(t testing.TB, bin string) error {
	r.proc = startProcess(t, r.dir, "registry", exec.Command(bin, "serve", r.cfg), 5*time.Second)
	client := &http.Client{Timeout: time.Second}
	return waitFor(r.proc, 15*time.Second, func() error {
		resp, err := client.Get("http://" + r.Addr + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
}

// Stop stops the registry; its address refuses connections afterwards.
func (r *Registry) Stop(t testing.TB) {
	t.Helper()
	err := r.proc.Stop(5 * time.Second)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			err = nil // docker-registry just dies on SIGTERM
		}
	}
	if err != nil {
		t.Logf("stop registry: %v", err)
	}
}

// Restart starts the stopped registry again on the same address and
// storage.
func (r *Registry) Restart(t testing.TB) {
	t.Helper()
	bin := r.proc.Cmd.Path
	if err := r.start(t, bin); err != nil {
		t.Fatal(err)
	}
}

// BlobPath is the file holding blob d in the registry's storage.
func (r *Registry) BlobPath(d digest.Digest) string {
	enc := d.Encoded()
	return filepath.Join(r.Storage, "docker", "registry", "v2", "blobs", d.Algorithm().String(), enc[:2], enc, "data")
}
