package recordrun

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/distribution/reference"
	"github.com/pelletier/go-toml/v2"

	"github.com/spanpull/spanpull/internal/proc"
)

// Names and bounds of the daemons Run starts.
const (
	// snapshotterName is the snapshotter's proxy plugin name.
	snapshotterName = "spanpull"
	// namespace is the containerd namespace of the run.
	namespace = "spanpull-record"
	// startTimeout bounds the start of each daemon.
	startTimeout = 30 * time.Second
	// stopGrace is how long each daemon gets to exit on SIGTERM.
	stopGrace = 15 * time.Second
	// exportTimeout bounds the export of the record from the daemon.
	exportTimeout = 30 * time.Second
)

// daemonConfig is the part of the snapshotter's config file (its TOML
// keys, see "snapshotter serve --help") that Run sets.
type daemonConfig struct {
	Remote struct {
		// FillRateBytes -1: no background fill, so that what is fetched
		// is what the start read.
		FillRateBytes int64    `toml:"fill_rate_bytes"`
		PlainHTTP     []string `toml:"plain_http,omitempty"`
		ConfigPath    string   `toml:"config_path"`
	} `toml:"remote"`
}

// startSnapshotter starts "BIN serve" with its socket, root, config and
// log in e.dir and metrics on a free loopback port, and waits until both
// serve.
func (e *env) startSnapshotter(ctx context.Context) error {
	var cfg daemonConfig
	cfg.Remote.FillRateBytes = -1
	cfg.Remote.ConfigPath = e.o.HostsDir
	if e.o.PlainHTTP {
		named, err := reference.ParseDockerRef(e.ref)
		if err != nil {
			return err
		}
		cfg.Remote.PlainHTTP = []string{reference.Domain(named)}
	}
	b, err := toml.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgPath := filepath.Join(e.dir, "snapshotter.toml")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		return err
	}
	if e.metrics, err = proc.FreeLoopbackAddr(); err != nil {
		return err
	}
	e.snapSocket = filepath.Join(e.dir, "snapshotter.sock")
	cmd := exec.Command(e.o.Snapshotter, "serve", "--config", cfgPath, "--address", e.snapSocket,
		"--root", filepath.Join(e.dir, "snapshotter-root"), "--metrics-address", e.metrics, "--log-level", "info")
	if e.snap, err = proc.Start(e.dir, "snapshotter", cmd); err != nil {
		return err
	}
	return proc.WaitReady(ctx, e.snap, startTimeout, func() error {
		c, err := net.DialTimeout("unix", e.snapSocket, time.Second)
		if err != nil {
			return err
		}
		c.Close()
		resp, err := http.Get("http://" + e.metrics + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/healthz: %s", resp.Status)
		}
		return nil
	})
}

// containerdMajor returns the major version containerd's --version
// prints ("containerd github.com/containerd/containerd 1.6.20~ds1 ..."),
// 1 when it cannot tell.
func containerdMajor(bin string) int {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		return 1
	}
	m := regexp.MustCompile(`\bv?(\d+)\.\d+\.\d+`).FindSubmatch(out)
	if m == nil {
		return 1
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// containerdConfig is the config file of Run's containerd: its own root,
// state and sockets in dir, CRI disabled, the snapshotter as proxy plugin.
// version is 2 for containerd 1.x, 3 for 2.x.
func containerdConfig(version int, dir, socket, snapSocket string) string {
	return fmt.Sprintf(`version = %d
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[proxy_plugins.%s]
  type = "snapshot"
  address = %q
`, version, filepath.Join(dir, "containerd-root"), filepath.Join(dir, "containerd-state"), socket, socket+".ttrpc", snapshotterName, snapSocket)
}

// startContainerd starts containerd (after the snapshotter: containerd
// 1.6 fails its first calls to a proxy whose socket appears later) and
// connects to it. Its PATH starts with the binary's directory, so the shim
// installed next to it runs, not one of another version found first.
func (e *env) startContainerd(ctx context.Context) error {
	bin, err := exec.LookPath(e.o.Containerd)
	if err != nil {
		return fmt.Errorf("containerd: %w (give its path with --containerd)", err)
	}
	version := 2
	if containerdMajor(bin) >= 2 {
		version = 3
	}
	socket := filepath.Join(e.dir, "containerd.sock")
	e.containerdSocket = socket
	cfgPath := filepath.Join(e.dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(containerdConfig(version, e.dir, socket, e.snapSocket)), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "--config", cfgPath)
	cmd.Env = append(proc.EnvWithout("PATH"), "PATH="+filepath.Dir(bin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	if e.containerd, err = proc.Start(e.dir, "containerd", cmd); err != nil {
		return err
	}
	if e.client, err = containerd.New(socket, containerd.WithDefaultNamespace(namespace)); err != nil {
		return err
	}
	return proc.WaitReady(ctx, e.containerd, startTimeout, func() error {
		vctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := e.client.Version(vctx)
		return err
	})
}
