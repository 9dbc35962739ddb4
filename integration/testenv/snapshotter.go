//go:build linux

package testenv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/spanpull/spanpull/fdstore"
	"github.com/spanpull/spanpull/internal/proc"
)

// snapshotterGrace is how long the snapshotter gets to unmount and exit.
const snapshotterGrace = 15 * time.Second

// Snapshotter is a running spanpull snapshotter daemon.
type Snapshotter struct {
	*proc.Process
	// Socket serves the snapshots gRPC API.
	Socket string
	// Root is its state directory.
	Root string
	// MetricsURL is its Prometheus endpoint when SnapshotterConfig.Metrics
	// asked for one.
	MetricsURL string
}

// SnapshotterConfig configures StartSnapshotter.
type SnapshotterConfig struct {
	// Binary is the snapshotter executable (see BuildGo).
	Binary string
	// Config is the TOML config file's content (written to a file and
	// passed with --config, so the machine's /etc/spanpull is never read).
	Config string
	// Root is its state directory; empty: snap-root in the directory.
	Root string
	// LogLevel is passed with --log-level; empty: debug.
	LogLevel string
	// Metrics serves Prometheus metrics on a free loopback port (see
	// Snapshotter.MetricsURL).
	Metrics bool
	// Args are extra arguments for "serve".
	Args []string
}

// LaunchSnapshotter starts "snapshotter serve" with its socket, config and
// log in dir and returns once the socket accepts connections. Launching it
// again on the same dir (after Stop) restarts it on the same socket.
func LaunchSnapshotter(ctx context.Context, dir string, c SnapshotterConfig) (*Snapshotter, error) {
	sn := &Snapshotter{Socket: filepath.Join(dir, "snap.sock"), Root: c.Root}
	if sn.Root == "" {
		sn.Root = filepath.Join(dir, "snap-root")
	}
	level := c.LogLevel
	if level == "" {
		level = "debug"
	}
	cfg := filepath.Join(dir, "snapshotter.toml")
	if err := os.WriteFile(cfg, []byte(c.Config), 0o600); err != nil {
		return nil, err
	}
	args := []string{"serve", "--config", cfg, "--address", sn.Socket, "--root", sn.Root, "--log-level", level}
	if c.Metrics {
		args = append(args, "--metrics-address", "127.0.0.1:0")
	}
	args = append(args, c.Args...)
	p, err := proc.Start(dir, "snapshotter", exec.Command(c.Binary, args...))
	if err != nil {
		return nil, err
	}
	sn.Process = p
	ready := func() error { return dialUnix(sn.Socket) }
	if c.Metrics {
		ready = func() error {
			if err := dialUnix(sn.Socket); err != nil {
				return err
			}
			return sn.findMetrics()
		}
	}
	if err := proc.WaitReady(ctx, p, 30*time.Second, ready); err != nil {
		_ = p.Stop(snapshotterGrace)
		return nil, err
	}
	return sn, nil
}

// metricsAddrRE finds the address the daemon serves metrics on in its log.
var metricsAddrRE = regexp.MustCompile(`msg="serving metrics" address="?([0-9.]+:[0-9]+)`)

// findMetrics sets MetricsURL from the daemon's log.
func (sn *Snapshotter) findMetrics() error {
	b, err := os.ReadFile(sn.Log)
	if err != nil {
		return err
	}
	m := metricsAddrRE.FindSubmatch(b)
	if m == nil {
		return errors.New("the snapshotter logged no metrics address yet")
	}
	sn.MetricsURL = "http://" + string(m[1]) + "/metrics"
	return nil
}

// StartSnapshotter is LaunchSnapshotter for a test: it fails the test when
// the daemon does not come up, and stops it in Cleanup (also after an
// explicit Stop, which is then a no-op).
func StartSnapshotter(t testing.TB, dir string, c SnapshotterConfig) *Snapshotter {
	t.Helper()
	sn, err := LaunchSnapshotter(context.Background(), dir, c)
	if err != nil {
		t.Fatal(err)
	}
	cleanupProcess(t, sn.Process, sn.Shutdown)
	return sn
}

// Shutdown stops the daemon and what outlives it on purpose: its fd
// holder, which keeps the FUSE connections of lazy layers for the next
// daemon, and those lazy mounts, detached. Calling it again is harmless.
func (sn *Snapshotter) Shutdown() error {
	err := sn.Stop(snapshotterGrace)
	return errors.Join(err, StopFDHolder(filepath.Join(filepath.Dir(sn.Socket), "fd-holder.sock")), detachFUSEMounts(sn.Root))
}

// StopFDHolder kills the fd holder serving socket (named in its PID file),
// if one runs. With it go the FUSE connections it keeps: their mounts fail
// reads from then on and can be detached.
func StopFDHolder(socket string) error {
	b, err := os.ReadFile(fdstore.PIDFile(socket))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return nil // no holder ever wrote its PID
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop fd holder %d: %w", pid, err)
	}
	for range 100 { // it exits at once: wait, so its connections are gone
		if syscall.Kill(pid, 0) != nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// detachFUSEMounts detaches the FUSE mounts below root.
func detachFUSEMounts(root string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range mounts {
		if strings.HasPrefix(m.FSType, "fuse") {
			if err := syscall.Unmount(m.Mountpoint, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
				errs = append(errs, fmt.Errorf("detach %s: %w", m.Mountpoint, err))
			}
		}
	}
	return errors.Join(errs...)
}

func dialUnix(sock string) error {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return err
	}
	return c.Close()
}
