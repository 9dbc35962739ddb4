//go:build linux

package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/proc"
)

// CNIBinDir is where Debian's containernetworking-plugins installs the
// CNI plugins.
const CNIBinDir = "/usr/lib/cni"

// CRIConfig configures StartContainerdCRI.
type CRIConfig struct {
	// BinDir holds containerd 2 binaries (Containerd2Binaries); empty:
	// Debian's containerd 1.6.
	BinDir string
	// Snapshotter is the socket of the "spanpull" proxy snapshotter that
	// CRI pulls and runs images with.
	Snapshotter string
	// SandboxImage is the pause image (pulled beforehand: it is looked up
	// locally first).
	SandboxImage string
	// RegistryConfigPath is CRI's registry config_path (hosts.toml).
	RegistryConfigPath string
	// Subnet is the pod network of the CNI bridge (a /24 of
	// 198.18.0.0/15, distinct per test).
	Subnet string
}

// StartContainerdCRI starts containerd (1.6, or 2 from c.BinDir) with its
// CRI plugin, namespace k8s.io, images unpacked into the spanpull proxy
// snapshotter with the snapshot annotations remote snapshotters need, a
// CNI bridge network of Debian's plugins, and restrict_oom_score_adj (the
// daemon runs with a negative OOM score adjustment here, which CRI would
// otherwise try to give to containers). It is stopped in Cleanup, and the
// bridge deleted.
func StartContainerdCRI(t testing.TB, dir string, c CRIConfig) *Containerd {
	t.Helper()
	if _, err := os.Stat(filepath.Join(CNIBinDir, "bridge")); err != nil {
		t.Fatalf("CNI plugins not installed (%v): run scripts/install-deps.sh", err)
	}
	confDir := filepath.Join(dir, "cni-conf")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	bridge := "sp" + strings.ReplaceAll(filepath.Base(dir), "sp-e2e-", "")
	if len(bridge) > 15 {
		bridge = bridge[:15]
	}
	conflist := fmt.Sprintf(`{"cniVersion": "0.4.0", "name": "spanpull-test", "plugins": [
  {"type": "bridge", "bridge": %q, "isGateway": false, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}}]}`,
		bridge, c.Subnet, filepath.Join(dir, "cni-ipam"))
	if err := os.WriteFile(filepath.Join(confDir, "10-spanpull.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", bridge).Run() })
	cfg := ContainerdConfig{
		Snapshotters: map[string]string{"spanpull": c.Snapshotter},
		Namespace:    "k8s.io",
		CRI:          true,
	}
	if c.BinDir == "" {
		cfg.Extra = fmt.Sprintf(`[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "spanpull"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %q
`, c.SandboxImage, CNIBinDir, confDir, c.RegistryConfigPath)
		return StartContainerd16(t, dir, cfg)
	}
	// containerd 2 pulls CRI images through its transfer service, which
	// passes the snapshot annotations to proxy snapshotters that export
	// enable_remote_snapshot_annotations.
	cfg.RemoteSnapshotAnnotations = true
	cfg.Extra = fmt.Sprintf(`[plugins."io.containerd.cri.v1.images"]
  snapshotter = "spanpull"
  disable_snapshot_annotations = false
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %q
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %q
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%q]
    conf_dir = %q
`, c.SandboxImage, c.RegistryConfigPath, CNIBinDir, confDir)
	return StartContainerd2(t, dir, c.BinDir, cfg)
}

// Crictl returns the crictl binary (scripts/install-deps.sh installs it
// with go install).
func Crictl(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("crictl"); err == nil {
		return p
	}
	out, err := exec.Command("go", "env", "GOPATH").Output()
	if err == nil {
		p := filepath.Join(strings.TrimSpace(string(out)), "bin", "crictl")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("crictl not installed: run scripts/install-deps.sh")
	return ""
}

// CrictlRun runs crictl against containerd's runtime service and the
// image service at imageEndpoint (a unix socket path: containerd's own, or
// a proxy), and returns its standard output; the error includes standard
// error.
func (c *Containerd) CrictlRun(ctx context.Context, crictl, imageEndpoint string, args ...string) (string, error) {
	full := append([]string{"--runtime-endpoint", "unix://" + c.Socket, "--image-endpoint", "unix://" + imageEndpoint,
		"--timeout", "2m"}, args...)
	// crictl insists on a config file; this one holds nothing the flags
	// do not override.
	cfg := filepath.Join(filepath.Dir(c.Socket), "crictl.yaml")
	if err := os.WriteFile(cfg, []byte("debug: false\n"), 0o644); err != nil {
		return "", err
	}
	full = append([]string{"--config", cfg}, full...)
	cmd := exec.CommandContext(ctx, crictl, full...)
	cmd.Env = proc.EnvWithout("CONTAINER_RUNTIME_ENDPOINT", "IMAGE_SERVICE_ENDPOINT", "CRI_CONFIG_FILE")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("crictl %s: %w\n%s%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), nil
}

// MustCrictl is CrictlRun that fails the test on error, with a
// three-minute timeout.
func (c *Containerd) MustCrictl(t testing.TB, crictl, imageEndpoint string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := c.CrictlRun(ctx, crictl, imageEndpoint, args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// PauseImageLayer is the root file system of a sandbox (pause) image: a
// static program that sleeps until SIGTERM or SIGINT, at /pause.
func PauseImageLayer(t testing.TB) LayerBlob {
	t.Helper()
	src := `package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
`
	b := buildStatic(t, "pause", src)
	blob, diffID := Layer(t, []Entry{
		{Name: "dev/", Dir: true}, {Name: "proc/", Dir: true}, {Name: "sys/", Dir: true},
		{Name: "etc/", Dir: true}, {Name: "pause", Mode: 0o755, Data: b},
	})
	return LayerBlob{Blob: blob, DiffID: diffID}
}
