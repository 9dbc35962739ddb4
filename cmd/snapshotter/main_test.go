package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/spanpull/spanpull/internal/testutil/snaptest"
	"github.com/spanpull/spanpull/resolver"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}

	t.Run("missing default is fine", func(t *testing.T) {
		c, err := loadConfig(filepath.Join(dir, "nope.toml"), false)
		if err != nil {
			t.Fatal(err)
		}
		if c.Address != defaultAddress || c.Root != defaultRoot || c.LogLevel != defaultLogLevel || c.MetricsAddress != "" {
			t.Fatalf("defaults: %+v", c)
		}
	})
	t.Run("missing explicit is an error", func(t *testing.T) {
		if _, err := loadConfig(filepath.Join(dir, "nope.toml"), true); err == nil {
			t.Fatal("no error for a missing explicit config")
		}
	})
	t.Run("every key", func(t *testing.T) {
		p := write("all.toml", `
address = "/tmp/x.sock"
root = "/tmp/root"
metrics_address = "127.0.0.1:0"
log_level = "debug"
async_remove = true
mount_options = ["volatile"]
`)
		c, err := loadConfig(p, true)
		if err != nil {
			t.Fatal(err)
		}
		want := config{Address: "/tmp/x.sock", Root: "/tmp/root", MetricsAddress: "127.0.0.1:0",
			LogLevel: "debug", AsyncRemove: true, MountOptions: []string{"volatile"}}
		if c.Address != want.Address || c.Root != want.Root || c.MetricsAddress != want.MetricsAddress ||
			c.LogLevel != want.LogLevel || c.AsyncRemove != want.AsyncRemove ||
			len(c.MountOptions) != 1 || c.MountOptions[0] != "volatile" {
			t.Fatalf("got %+v, want %+v", c, want)
		}
	})
	t.Run("partial keeps defaults", func(t *testing.T) {
		c, err := loadConfig(write("part.toml", `root = "/srv/sp"`), true)
		if err != nil {
			t.Fatal(err)
		}
		if c.Root != "/srv/sp" || c.Address != defaultAddress {
			t.Fatalf("got %+v", c)
		}
	})
	for name, body := range map[string]string{
		"unknown key": `adress = "/tmp/x.sock"`,
		"wrong type":  `async_remove = "yes"`,
		"bad syntax":  `root = `,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := loadConfig(write(strings.ReplaceAll(name, " ", "_")+".toml", body), true)
			if err == nil {
				t.Fatalf("no error for %q", body)
			}
			t.Log(err)
		})
	}
	t.Run("validate", func(t *testing.T) {
		c := defaultConfig()
		c.LogLevel = "loud"
		if err := c.validate(); err == nil {
			t.Fatal("bad log level accepted")
		}
		c = defaultConfig()
		c.Root = ""
		if err := c.validate(); err == nil {
			t.Fatal("empty root accepted")
		}
	})
	t.Run("remote defaults are the resolver's", func(t *testing.T) {
		got := defaultConfig().resolverConfig()
		want := resolver.DefaultConfig()
		if got.FetchTimeout != want.FetchTimeout || got.FillDelay != want.FillDelay ||
			got.FillRate != want.FillRate || got.IndexCacheTTL != want.IndexCacheTTL {
			t.Fatalf("resolver config from the daemon defaults: %+v, want %+v", got, want)
		}
		if got.Root != filepath.Join(defaultRoot, "remote") {
			t.Fatalf("resolver root %q", got.Root)
		}
	})
}

// TestNewLogger: the daemon's logger honours log_level and writes
// containerd's text format to the writer it is given.
func TestNewLogger(t *testing.T) {
	var out bytes.Buffer
	l, err := newLogger(&out, "warn")
	if err != nil {
		t.Fatal(err)
	}
	l.Info("dropped")
	l.WithField("reason", "a b").Warn("kept")
	got := out.String()
	if strings.Contains(got, "dropped") || !strings.Contains(got, `level=warning msg=kept reason="a b"`) {
		t.Fatalf("log at level warn: %q", got)
	}
	if _, err := newLogger(&out, "loud"); err == nil {
		t.Fatal("bad log level accepted")
	}
}

// runServe starts "snapshotter serve args..." in-process and returns a
// function that stops it (like SIGTERM) and returns its error.
func runServe(t *testing.T, args ...string) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := newRootCommand()
	cmd.SetArgs(append([]string{"serve"}, args...))
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	var stopped bool
	var err error
	stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				err = errors.New("serve did not stop within 30s")
			}
		}
		return err
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// dialSnapshotter waits for the socket and returns containerd's own proxy
// client for it, as containerd uses it for a proxy plugin.
func dialSnapshotter(t *testing.T, sock string) snapshots.Snapshotter {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshotter socket %s never accepted a connection", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "spanpull")
}

// TestServe starts the daemon, uses it over gRPC without a namespace in the
// context (as containerd 1.6 calls proxy snapshotters), checks metrics and
// a clean stop, then restarts it on the same root over the stale socket.
func TestServe(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestServe mounts overlayfs and must run as root")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "run", "snap.sock")
	root := filepath.Join(dir, "root")
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ml.Addr().String()
	ml.Close()
	dl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	debugAddr := dl.Addr().String()
	dl.Close()

	// An explicit --config that is missing: the daemon refuses to start.
	stop := runServe(t, "--config", filepath.Join(dir, "missing.toml"),
		"--address", sock, "--root", root, "--metrics-address", metricsAddr, "--log-level", "debug")
	if err := stop(); err == nil || !strings.Contains(err.Error(), "read config") {
		t.Fatalf("missing explicit config: err = %v", err)
	}

	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte("root = \""+root+"\"\nlog_level = \"warn\"\ndebug_address = \""+debugAddr+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stop = runServe(t, "--config", cfgPath, "--address", sock, "--metrics-address", metricsAddr)
	sn := dialSnapshotter(t, sock)
	ctx := context.Background() // no namespace, like containerd 1.6

	mounts, err := sn.Prepare(ctx, "a", "", snapshots.WithLabels(map[string]string{"x": "y"}))
	if err != nil {
		t.Fatalf("prepare over gRPC: %v", err)
	}
	if len(mounts) != 1 || mounts[0].Type != "bind" || !strings.HasPrefix(mounts[0].Source, root) {
		t.Fatalf("mounts = %+v, want one bind mount below %s", mounts, root)
	}
	if err := os.WriteFile(filepath.Join(mounts[0].Source, "f"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "layer1", "a"); err != nil {
		t.Fatalf("commit: %v", err)
	}
	info, err := sn.Stat(ctx, "layer1")
	if err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("stat layer1 = %+v, %v", info, err)
	}
	if _, err := sn.Prepare(ctx, "b", "layer1"); err != nil {
		t.Fatalf("prepare on parent: %v", err)
	}
	if _, err := sn.Prepare(ctx, "b", "layer1"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second prepare of b: err = %v, want AlreadyExists", err)
	}
	if _, err := sn.Stat(ctx, "missing"); !errdefs.IsNotFound(err) {
		t.Fatalf("stat missing: err = %v, want NotFound", err)
	}

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `spanpull_snapshotter_grpc_requests_total{code="AlreadyExists",method="Prepare"} 1`) {
		t.Fatalf("metrics lack the Prepare AlreadyExists count:\n%s", body)
	}
	if !strings.Contains(string(body), `spanpull_snapshotter_remote_prepares_total{result="mounted"} 0`) {
		t.Fatalf("metrics lack the snapshotter's own:\n%s", body)
	}

	resp, err = http.Get("http://" + debugAddr + "/debug/pprof/heap?debug=1")
	if err != nil {
		t.Fatalf("debug address: %v", err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "heap profile:") {
		t.Fatalf("debug_address: GET /debug/pprof/heap: %s\n%.300s", resp.Status, body)
	}

	if err := stop(); err != nil {
		t.Fatalf("serve returned %v on stop", err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after stop: %v", err)
	}

	// A stale socket (nobody listening) is replaced; state survives.
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	stop = runServe(t, "--config", cfgPath, "--address", sock)
	sn = dialSnapshotter(t, sock)
	if _, err := sn.Stat(ctx, "layer1"); err != nil {
		t.Fatalf("stat after restart: %v", err)
	}
	keys := snaptest.Names(ctx, t, sn)
	if len(keys) != 2 {
		t.Fatalf("walk after restart: %v, want b and layer1", keys)
	}
	// A second daemon on a live socket must refuse to start.
	if err := runServe(t, "--config", cfgPath, "--address", sock, "--root", filepath.Join(dir, "root2"))(); err == nil ||
		!strings.Contains(err.Error(), "in use") {
		t.Fatalf("second daemon on a live socket: err = %v", err)
	}
	for _, k := range []string{"b", "layer1"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatalf("remove %s: %v", k, err)
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
