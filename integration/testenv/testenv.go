//go:build linux

// Package testenv starts the real parts end-to-end tests need: a registry,
// spanpull's snapshotter daemon, Debian's containerd 1.6 wired to it as a
// proxy plugin, and ctr. Every process it starts is stopped by PID in
// t.Cleanup (also when the test fails), containers are killed and removed,
// and mounts left below the test's directories are unmounted before the
// directories are deleted.
//
// Tests using it need root: containerd, runc and overlayfs do.
package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

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
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, 0); err != nil && err != unix.EINVAL {
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
				return fmt.Errorf("unmount %s: %w", m.Mountpoint, err)
			}
		}
	}
	left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	if len(left) > 0 {
		return fmt.Errorf("%d mounts left below %s, first %s", len(left), dir, left[0].Mountpoint)
	}
	return nil
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

// Process is a daemon started by this package.
type Process struct {
	Name string
	Cmd  *exec.Cmd
	// Log is the file holding the process's stdout and stderr.
	Log string

	exited chan struct{}
	mu     sync.Mutex
	err    error
}

// startProcess starts cmd with output to a log file in dir and registers
// its stop by PID (SIGTERM, then SIGKILL after grace) in Cleanup. The log is
// printed when the test failed.
func startProcess(t testing.TB, dir, name string, cmd *exec.Cmd, grace time.Duration) *Process {
	t.Helper()
	// A restarted daemon gets a log of its own.
	logPath := filepath.Join(dir, name+".log")
	for i := 2; ; i++ {
		if _, err := os.Stat(logPath); os.IsNotExist(err) {
			break
		}
		logPath = filepath.Join(dir, fmt.Sprintf("%s.%d.log", name, i))
	}
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	// Die with the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &Process{Name: name, Cmd: cmd, Log: logPath, exited: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.exited)
	}()
	t.Cleanup(func() {
		if err := p.Stop(grace); err != nil {
			t.Logf("stop %s: %v", name, err)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("%s (pid %d) log:\n%s", name, cmd.Process.Pid, tail(b, 16<<10))
		}
	})
	return p
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return append([]byte("...\n"), b[len(b)-n:]...)
	}
	return b
}

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM and waits up to grace for the process to exit, then
// kills it. It returns the process's exit error, if any (nil when it
// exited cleanly on SIGTERM).
func (p *Process) Stop(grace time.Duration) error {
	if !p.Exited() {
		_ = p.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(grace):
			_ = p.Cmd.Process.Kill()
			<-p.exited
			return fmt.Errorf("%s did not stop within %v of SIGTERM: killed", p.Name, grace)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// waitFor polls ready until it returns nil, the process exits, or timeout.
func waitFor(p *Process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.Exited() {
			b, _ := os.ReadFile(p.Log)
			return fmt.Errorf("%s exited before it was ready (%v); log:\n%s", p.Name, err, tail(b, 8<<10))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %w", p.Name, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Snapshotter is a running spanpull snapshotter daemon.
type Snapshotter struct {
	*Process
	// Socket serves the snapshots gRPC API.
	Socket string
	// Root is its state directory.
	Root string
}

// SnapshotterConfig configures StartSnapshotter.
type SnapshotterConfig struct {
	// Binary is the snapshotter executable (see BuildGo).
	Binary string
	// Config is the TOML config file's content (written to a file and
	// passed with --config, so the machine's /etc/spanpull is never read).
	Config string
	// Args are extra arguments for "serve".
	Args []string
}

// StartSnapshotter starts "snapshotter serve" with its socket and root in
// dir and returns once the socket accepts connections. Starting it again on
// the same dir (after Stop) restarts it on the same socket and state.
func StartSnapshotter(t testing.TB, dir string, c SnapshotterConfig) *Snapshotter {
	t.Helper()
	sock := filepath.Join(dir, "snap.sock")
	root := filepath.Join(dir, "snap-root")
	cfg := filepath.Join(dir, "snapshotter.toml")
	if err := os.WriteFile(cfg, []byte(c.Config), 0o600); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"serve", "--config", cfg, "--address", sock, "--root", root, "--log-level", "debug"}, c.Args...)
	p := startProcess(t, dir, "snapshotter", exec.Command(c.Binary, args...), 15*time.Second)
	if err := waitFor(p, 30*time.Second, func() error { return dialUnix(sock) }); err != nil {
		t.Fatal(err)
	}
	return &Snapshotter{Process: p, Socket: sock, Root: root}
}

func dialUnix(sock string) error {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}

// Containerd is a running containerd daemon.
type Containerd struct {
	*Process
	// Socket is its gRPC address.
	Socket string
	// Root and State are its directories.
	Root, State string
	// Ctr is the ctr binary matching the daemon.
	Ctr string
	// Namespace is passed to every Ctr call.
	Namespace string

	path string // PATH of the daemon and ctr
}

// ContainerdConfig configures StartContainerd16 and StartContainerd2.
type ContainerdConfig struct {
	// Snapshotters maps proxy plugin names to snapshotter sockets.
	Snapshotters map[string]string
	// RemoteSnapshotAnnotations (containerd >= 2.1 only) exports
	// enable_remote_snapshot_annotations for every proxy snapshotter, so
	// that pulls through the transfer service ("ctr image pull") pass the
	// remote-snapshot labels (cri.layer-digest, cri.image-ref, ...).
	RemoteSnapshotAnnotations bool
}

// Debian's containerd 1.6 and its tools.
const (
	Containerd16Binary = "/usr/bin/containerd"
	Ctr16Binary        = "/usr/bin/ctr"
)

// systemPath is the PATH containerd and ctr run with: Debian's runc and
// shim, never a containerd 2 shim some go install put in ~/go/bin.
const systemPath = "/usr/sbin:/usr/bin:/sbin:/bin"

// StartContainerd16 starts Debian's containerd 1.6 with its root, state
// and sockets in dir, CRI disabled, and one proxy_plugins entry per
// snapshotter. Start the snapshotters first: containerd 1.6 fails its
// first calls to a proxy whose socket is missing at start-up. Its PATH
// puts /usr/bin first so Debian's runc shim is used. In Cleanup it kills
// and deletes every task, stops containerd, then stops the shims it left.
func StartContainerd16(t testing.TB, dir string, c ContainerdConfig) *Containerd {
	t.Helper()
	for _, b := range []string{Containerd16Binary, Ctr16Binary, "/usr/bin/containerd-shim-runc-v2"} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("containerd 1.6 not installed (%v): run scripts/install-deps.sh", err)
		}
	}
	if c.RemoteSnapshotAnnotations {
		t.Fatal("containerd 1.6 has no transfer service: RemoteSnapshotAnnotations needs containerd 2")
	}
	return startContainerd(t, dir, Containerd16Binary, Ctr16Binary, systemPath, 2, c)
}

// StartContainerd2 is StartContainerd16 for containerd v2 (config version
// 3), with the binaries in binDir (see Containerd2Binaries), whose shim
// comes first in its PATH. Its transfer service unpacks for every proxy
// snapshotter (unpack_config), so "ctr image pull --snapshotter NAME" works.
func StartContainerd2(t testing.TB, dir, binDir string, c ContainerdConfig) *Containerd {
	t.Helper()
	return startContainerd(t, dir, filepath.Join(binDir, "containerd"), filepath.Join(binDir, "ctr"),
		binDir+":"+systemPath, 3, c)
}

func startContainerd(t testing.TB, dir, bin, ctr, path string, version int, c ContainerdConfig) *Containerd {
	t.Helper()
	cd := &Containerd{
		Socket:    filepath.Join(dir, "containerd.sock"),
		Root:      filepath.Join(dir, "containerd-root"),
		State:     filepath.Join(dir, "containerd-state"),
		Ctr:       ctr,
		Namespace: "default",
		path:      path,
	}
	var b strings.Builder
	fmt.Fprintf(&b, `version = %d
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  level = "debug"
`, version, cd.Root, cd.State, cd.Socket, cd.Socket+".ttrpc")
	names := make([]string, 0, len(c.Snapshotters))
	for n := range c.Snapshotters {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %q\n", n, c.Snapshotters[n])
		if c.RemoteSnapshotAnnotations {
			fmt.Fprintf(&b, "[proxy_plugins.%s.exports]\n  enable_remote_snapshot_annotations = \"true\"\n", n)
		}
	}
	if version >= 3 {
		for _, n := range append([]string{"overlayfs"}, names...) {
			fmt.Fprintf(&b, "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = %q\n", n)
		}
	}
	cfg := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Env = append(EnvWithout("PATH"), "PATH="+path)
	// Cleanups run last-in first-out: shims are stopped after containerd.
	t.Cleanup(func() { killShims(t, cd.Socket) })
	cd.Process = startProcess(t, dir, "containerd", cmd, 15*time.Second)
	t.Cleanup(func() { cd.removeTasks(t) })
	if err := waitFor(cd.Process, 30*time.Second, func() error {
		_, err := cd.Run(context.Background(), "version")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return cd
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
	cmd.Env = append(EnvWithout("GOBIN", "GOFLAGS"), "GOBIN="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install containerd %s: %v\n%s", Containerd2Version, err, out)
	}
	return dir
}

// EnvWithout returns this process's environment without the named
// variables, for children that get their own values for them.
func EnvWithout(drop ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, d := range drop {
			if strings.HasPrefix(kv, d+"=") {
				continue next
			}
		}
		env = append(env, kv)
	}
	return env
}

// Run runs ctr against the daemon and returns its standard output. The
// error includes its standard error (containerd 2 on cgroup v1 writes a
// deprecation warning there on every call, so it is kept apart).
func (c *Containerd) Run(ctx context.Context, args ...string) (string, error) {
	full := append([]string{"-a", c.Socket, "-n", c.Namespace}, args...)
	cmd := exec.CommandContext(ctx, c.Ctr, full...)
	cmd.Env = append(EnvWithout("PATH", "CONTAINERD_NAMESPACE", "CONTAINERD_ADDRESS"), "PATH="+c.path)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctr %s: %w\n%s%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), nil
}

// MustRun is Run that fails the test on error, with a two-minute timeout.
func (c *Containerd) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := c.Run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// removeTasks kills and deletes every task and container, so nothing keeps
// a snapshot mounted when the daemons stop.
func (c *Containerd) removeTasks(t testing.TB) {
	if c.Process.Exited() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := c.Run(ctx, "tasks", "ls", "-q")
	if err != nil {
		t.Logf("list tasks: %v", err)
	}
	for _, id := range strings.Fields(out) {
		_, _ = c.Run(ctx, "tasks", "kill", "-s", "SIGKILL", id)
		if _, err := c.Run(ctx, "tasks", "rm", "-f", id); err != nil {
			t.Logf("remove task %s: %v", id, err)
		}
	}
	out, _ = c.Run(ctx, "containers", "ls", "-q")
	for _, id := range strings.Fields(out) {
		if _, err := c.Run(ctx, "containers", "rm", id); err != nil {
			t.Logf("remove container %s: %v", id, err)
		}
	}
}

// killShims kills the runc shims of the containerd listening on socket:
// they outlive containerd by design. They are found by their command line,
// which names that (test-unique) socket.
func killShims(t testing.TB, socket string) {
	for _, pid := range pidsWithArg(socket) {
		if pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
			t.Logf("kill shim %d: %v", pid, err)
		}
	}
}

// pidsWithArg lists processes with arg among their command-line arguments.
func pidsWithArg(arg string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if a == arg {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// execGo prepares a go command run in dir.
func execGo(dir string, args ...string) *exec.Cmd {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	return cmd
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
