//go:build linux

// Package testenv starts the real parts end-to-end tests need: a registry,
// spanpull's snapshotter daemon, Debian's containerd 1.6 (or containerd 2)
// wired to it as a proxy plugin, and ctr. Every process it starts is
// stopped by PID (also when the test fails), containers are killed and
// removed, containerd's shims are killed, and mounts left below the test's
// directories are unmounted before the directories are deleted.
//
// The Start* functions take a testing.T and clean up in t.Cleanup; the
// Launch* functions they wrap return errors and are undone by Close or
// Stop, for programs such as the benchmark harness (integration/bench).
//
// Tests using it need root: containerd, runc and overlayfs do.
package testenv

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"google.golang.org/grpc"

	"github.com/spanpull/spanpull/internal/proc"
	"github.com/spanpull/spanpull/internal/unmount"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// RequireRoot fails (never skips) a test that needs root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this end-to-end test starts containerd and mounts file systems: run it as root")
	}
}

// Dir returns a new directory for the test with a short path (unix socket
// paths are limited to 108 bytes, and t.TempDir's include the test name).
// Mounts left below it are unmounted before it is deleted in Cleanup.
func Dir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "sp-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := UnmountUnder(d); err != nil {
			t.Errorf("unmount leftovers in %s: %v", d, err)
			return // never delete through a mount
		}
		if err := os.RemoveAll(d); err != nil {
			t.Errorf("remove %s: %v", d, err)
		}
	})
	return d
}

// UnmountUnder unmounts every mount at or below dir, deepest first (lazily
// if one is busy), and reports mounts it could not remove.
func UnmountUnder(dir string) error {
	return unmount.Under(dir)
}

// StartRegistry starts Debian's docker-registry on a free loopback port
// with filesystem storage in a temporary directory and returns its
// "127.0.0.1:port" address.
func StartRegistry(t testing.TB) string {
	t.Helper()
	return registrytest.StartDistribution(t)
}

// BuildGo builds the Go main package pkg (an import path or a path
// relative to the calling test's directory) into dir and returns the
// binary's path. env adds to the build environment (CGO_ENABLED=0, ...).
func BuildGo(t testing.TB, dir, pkg, name string, env ...string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), env...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// BuildBinaries builds spanpull's two programs, the snapshotter daemon and
// the indexer, into dir and returns their paths.
func BuildBinaries(t testing.TB, dir string) (snapshotter, indexer string) {
	t.Helper()
	snapshotter = BuildGo(t, dir, "github.com/spanpull/spanpull/cmd/snapshotter", "snapshotter")
	indexer = BuildGo(t, dir, "github.com/spanpull/spanpull/cmd/indexer", "indexer")
	return snapshotter, indexer
}

// cleanupProcess registers stop in Cleanup, and printing p's log when the
// test failed.
func cleanupProcess(t testing.TB, p *proc.Process, stop func() error) {
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Logf("stop %s: %v", p.Name, err)
		}
		if t.Failed() {
			t.Logf("%s (pid %d) log:\n%s", p.Name, p.Pid(), p.LogTail(16<<10))
		}
	})
}

// Containerd2Version is the containerd 2 release tests run against.
const Containerd2Version = "v2.2.9"

// Containerd2Binaries returns a directory holding containerd, ctr and
// containerd-shim-runc-v2 of Containerd2Version. $SPANPULL_CONTAINERD2_DIR
// names one explicitly; otherwise they are built once with go install into
// the user cache directory (about 2.5 minutes on 2 cores), never into a
// directory on PATH where Debian's containerd 1.6 would pick up the v2 shim.
func Containerd2Binaries(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("SPANPULL_CONTAINERD2_DIR")
	if dir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			t.Fatal(err)
		}
		dir = filepath.Join(cache, "spanpull", "containerd-"+Containerd2Version, "bin")
	}
	names := []string{"containerd", "ctr", "containerd-shim-runc-v2"}
	missing := false
	for _, n := range names {
		if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
			missing = true
		}
	}
	if !missing {
		return dir
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	args := []string{"install"}
	for _, n := range names {
		args = append(args, "github.com/containerd/containerd/v2/cmd/"+n+"@"+Containerd2Version)
	}
	t.Logf("building containerd %s into %s (once)", Containerd2Version, dir)
	cmd := exec.Command("go", args...)
	cmd.Dir = os.TempDir() // outside any module: go install pkg@version
	cmd.Env = append(proc.EnvWithout("GOBIN", "GOFLAGS"), "GOBIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install containerd %s: %v\n%s", Containerd2Version, err, out)
	}
	return dir
}

// buildStatic builds src, the main.go of a program that needs only the
// standard library, as a static linux/amd64 executable named name and
// returns its bytes.
func buildStatic(t testing.TB, name, src string) []byte {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module "+name+"\n\ngo 1.21\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", name, ".")
	cmd.Dir = dir
	cmd.Env = append(proc.EnvWithout("CGO_ENABLED", "GOOS", "GOARCH", "GOFLAGS"), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s program: %v\n%s", name, err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ServeSnapshotter serves sn's snapshots gRPC API in-process on a unix
// socket in dir, as "snapshotter serve" does, and returns the socket. Use
// it to test a snapshotter configured in ways the daemon cannot be yet
// (for example with a test RemoteLayerResolver). The server stops and sn
// is closed in Cleanup.
func ServeSnapshotter(t testing.TB, dir string, sn snapshots.Snapshotter) string {
	t.Helper()
	sock := filepath.Join(dir, "snap-inproc.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
		if err := sn.Close(); err != nil {
			t.Errorf("close snapshotter: %v", err)
		}
	})
	return sock
}
