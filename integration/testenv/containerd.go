//go:build linux

package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/proc"
)

// containerdGrace is how long containerd gets to exit on SIGTERM.
const containerdGrace = 15 * time.Second

// Containerd is a running containerd daemon.
type Containerd struct {
	*proc.Process
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
	// Namespace is the namespace ctr calls use; empty: default.
	Namespace string
	// LogLevel is containerd's log level; empty: debug.
	LogLevel string
	// CRI keeps containerd's CRI plugin enabled (it is disabled
	// otherwise); its settings go in Extra (see StartContainerdCRI).
	CRI bool
	// Extra is appended to the generated config file.
	Extra string
}

// Debian's containerd 1.6 and its tools.
const (
	Containerd16Binary = "/usr/bin/containerd"
	Ctr16Binary        = "/usr/bin/ctr"
)

// systemPath is the PATH containerd and ctr run with: Debian's runc and
// shim, never a containerd 2 shim some go install put in ~/go/bin.
const systemPath = "/usr/sbin:/usr/bin:/sbin:/bin"

// LaunchContainerd16 starts Debian's containerd 1.6 with its root, state,
// sockets and log in dir, CRI disabled, and one proxy_plugins entry per
// snapshotter. Start the snapshotters first: containerd 1.6 fails its
// first calls to a proxy whose socket is missing at start-up. Its PATH
// puts /usr/bin first so Debian's runc shim is used. Close undoes it.
func LaunchContainerd16(ctx context.Context, dir string, c ContainerdConfig) (*Containerd, error) {
	for _, b := range []string{Containerd16Binary, Ctr16Binary, "/usr/bin/containerd-shim-runc-v2"} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("containerd 1.6 not installed (%v): run scripts/install-deps.sh", err)
		}
	}
	if c.RemoteSnapshotAnnotations {
		return nil, errors.New("containerd 1.6 has no transfer service: RemoteSnapshotAnnotations needs containerd 2")
	}
	return launchContainerd(ctx, dir, Containerd16Binary, Ctr16Binary, systemPath, 2, c)
}

// StartContainerd16 is LaunchContainerd16 for a test: it fails the test
// when containerd does not come up, and Closes it in Cleanup.
func StartContainerd16(t testing.TB, dir string, c ContainerdConfig) *Containerd {
	t.Helper()
	cd, err := LaunchContainerd16(context.Background(), dir, c)
	return cleanupContainerd(t, cd, err)
}

// StartContainerd2 is StartContainerd16 for containerd v2 (config version
// 3), with the binaries in binDir (see Containerd2Binaries), whose shim
// comes first in its PATH. Its transfer service unpacks for every proxy
// snapshotter (unpack_config), so "ctr image pull --snapshotter NAME" works.
func StartContainerd2(t testing.TB, dir, binDir string, c ContainerdConfig) *Containerd {
	t.Helper()
	cd, err := launchContainerd(context.Background(), dir, filepath.Join(binDir, "containerd"), filepath.Join(binDir, "ctr"),
		binDir+":"+systemPath, 3, c)
	return cleanupContainerd(t, cd, err)
}

func cleanupContainerd(t testing.TB, cd *Containerd, err error) *Containerd {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	cleanupProcess(t, cd.Process, cd.Close)
	return cd
}

func launchContainerd(ctx context.Context, dir, bin, ctr, path string, version int, c ContainerdConfig) (*Containerd, error) {
	cd := &Containerd{
		Socket:    filepath.Join(dir, "containerd.sock"),
		Root:      filepath.Join(dir, "containerd-root"),
		State:     filepath.Join(dir, "containerd-state"),
		Ctr:       ctr,
		Namespace: c.Namespace,
		path:      path,
	}
	if cd.Namespace == "" {
		cd.Namespace = "default"
	}
	cfg := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(cd.config(version, c)), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Env = append(proc.EnvWithout("PATH"), "PATH="+path)
	p, err := proc.Start(dir, "containerd", cmd)
	if err != nil {
		return nil, err
	}
	cd.Process = p
	if err := proc.WaitReady(ctx, p, 30*time.Second, func() error {
		_, err := cd.Run(ctx, "version")
		return err
	}); err != nil {
		return nil, errors.Join(err, cd.Close())
	}
	return cd, nil
}

// config is containerd's config file (version 2 for 1.6, 3 for 2.x).
func (cd *Containerd) config(version int, c ContainerdConfig) string {
	level := c.LogLevel
	if level == "" {
		level = "debug"
	}
	disabled := `disabled_plugins = ["io.containerd.grpc.v1.cri"]`
	if c.CRI {
		disabled = ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, `version = %d
root = %q
state = %q
%s
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  level = %q
`, version, cd.Root, cd.State, disabled, cd.Socket, cd.Socket+".ttrpc", level)
	names := slices.Sorted(maps.Keys(c.Snapshotters))
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
	b.WriteString(c.Extra)
	return b.String()
}

// Close kills and deletes every task and container (so nothing keeps a
// snapshot mounted when the daemons stop), stops containerd, then kills
// the shims it left: they outlive containerd by design. It reports every
// failure.
func (c *Containerd) Close() error {
	var errs []error
	if !c.Exited() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		errs = append(errs, c.RemoveContainers(ctx))
		cancel()
	}
	errs = append(errs, c.Stop(containerdGrace))
	// The shims are found by their command line, which names the
	// (unique) socket.
	errs = append(errs, proc.KillWithArg(c.Socket))
	return errors.Join(errs...)
}

// Command prepares ctr against the daemon, with the daemon's PATH.
func (c *Containerd) Command(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"-a", c.Socket, "-n", c.Namespace}, args...)
	cmd := exec.CommandContext(ctx, c.Ctr, full...)
	cmd.Env = append(proc.EnvWithout("PATH", "CONTAINERD_NAMESPACE", "CONTAINERD_ADDRESS"), "PATH="+c.path)
	return cmd
}

// Run runs ctr against the daemon and returns its standard output. The
// error includes its standard error (containerd 2 on cgroup v1 writes a
// deprecation warning there on every call, so it is kept apart).
func (c *Containerd) Run(ctx context.Context, args ...string) (string, error) {
	cmd := c.Command(ctx, args...)
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

// RemoveContainers kills and deletes every task and deletes every
// container.
func (c *Containerd) RemoveContainers(ctx context.Context) error {
	var errs []error
	out, err := c.Run(ctx, "tasks", "ls", "-q")
	if err != nil {
		errs = append(errs, fmt.Errorf("list tasks: %w", err))
	}
	for _, id := range strings.Fields(out) {
		_, _ = c.Run(ctx, "tasks", "kill", "-s", "SIGKILL", id)
		if _, err := c.Run(ctx, "tasks", "rm", "-f", id); err != nil {
			errs = append(errs, fmt.Errorf("remove task %s: %w", id, err))
		}
	}
	out, _ = c.Run(ctx, "containers", "ls", "-q")
	for _, id := range strings.Fields(out) {
		if _, err := c.Run(ctx, "containers", "rm", id); err != nil {
			errs = append(errs, fmt.Errorf("remove container %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}
