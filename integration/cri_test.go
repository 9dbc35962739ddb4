//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/integration/testenv"
)

// TestCRIContainerd16 and TestCRIContainerd2 run a pod through CRI as
// the kubelet would, with crictl, on containerd 1.6 and 2.2: the image is
// indexed and lives in an htpasswd-protected registry, the daemon has no
// Docker config, and crictl pulls through the daemon's CRI image service
// proxy with credentials (as the kubelet sends imagePullSecrets). The
// pull is lazy (snapshot label mode=lazy, no layer blob in containerd's
// content store); without credentials it fails with an unauthorized
// error; runp, create and start run the pod and its output is right; rmi
// frees the span cache.
func TestCRIContainerd16(t *testing.T) {
	testCRI(t, "", "198.18.16.0/24")
}

func TestCRIContainerd2(t *testing.T) {
	testCRI(t, testenv.Containerd2Binaries(t), "198.18.22.0/24")
}

func testCRI(t *testing.T, containerd2 string, subnet string) {
	testenv.RequireRoot(t)
	crictl := testenv.Crictl(t)
	dir := testenv.Dir(t)
	snapBin, indexerBin := testenv.BuildBinaries(t, dir)

	// Push before the registry requires credentials, then restart it with
	// htpasswd auth on the same address and storage.
	htpasswd := filepath.Join(dir, "htpasswd")
	writeHtpasswd(t, htpasswd, "alice", "s3cret")
	var img nodeImage
	var pauseRef string
	reg := startAuthRegistry(t, mkdir(t, filepath.Join(dir, "registry")), htpasswd, func(addr string) {
		img = pushNodeImage(t, indexerBin, addr, "cri/app", 3, map[string]int{"data/a.bin": 300 << 10, "data/b.bin": 2 << 20})
		pauseRef, _ = testenv.PushImage(t, addr, "cri/pause", "1", []string{"/pause"}, testenv.PauseImageLayer(t))
	})

	// containerd and the daemon reach the registry over plain HTTP through
	// the same host configuration.
	certs := filepath.Join(dir, "certs.d")
	host, port, _ := strings.Cut(reg.Addr, ":")
	toml := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", reg.Addr, reg.Addr)
	if err := os.WriteFile(filepath.Join(mkdir(t, filepath.Join(certs, host+"_"+port+"_")), "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	cdSock := filepath.Join(dir, "containerd.sock") // where StartContainerdCRI puts it
	proxy := filepath.Join(dir, "cri-proxy.sock")
	sn := testenv.StartSnapshotter(t, dir, testenv.SnapshotterConfig{Binary: snapBin, Metrics: true,
		Args: []string{"--cri-image-service-proxy", proxy},
		Config: fmt.Sprintf("[remote]\nfill_rate_bytes = -1\nconfig_path = %q\ndocker_config = %q\n[cri]\ncontainerd_cri_socket = %q\n",
			certs, filepath.Join(dir, "no-docker-config.json"), cdSock)})
	cd := testenv.StartContainerdCRI(t, dir, testenv.CRIConfig{BinDir: containerd2, Snapshotter: sn.Socket,
		SandboxImage: pauseRef, RegistryConfigPath: certs, Subnet: subnet})
	crictlRun := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		return cd.CrictlRun(ctx, crictl, proxy, args...)
	}
	must := func(args ...string) string {
		t.Helper()
		return cd.MustCrictl(t, crictl, proxy, args...)
	}

	// Without credentials: a clear unauthorized error (containerd 1.6
	// says "401 Unauthorized", 2.2 "authorization failed: no basic auth
	// credentials").
	out, err := crictlRun("pull", img.ref)
	if err == nil || !strings.Contains(strings.ToLower(err.Error()), "authoriz") {
		t.Fatalf("pull without credentials: %v\n%s", err, out)
	}
	t.Logf("pull without credentials: %v", err)

	must("pull", "--creds", "alice:s3cret", pauseRef)
	must("pull", "--creds", "alice:s3cret", img.ref)
	if labels := snapshotLabels(t, cd, img.layer.DiffID.String()); labels["containerd.io/snapshot/spanpull.mode"] != "lazy" {
		t.Fatalf("CRI pull not lazy: snapshot labels %v", labels)
	}
	layer := digest.FromBytes(img.layer.Blob)
	if content := cd.MustRun(t, "content", "ls", "-q"); strings.Contains(content, layer.String()) {
		t.Fatalf("layer blob %s is in containerd's content store", layer)
	}

	// A pod reading files of the lazy layer.
	logDir := mkdir(t, filepath.Join(dir, "pod-logs"))
	podCfg := writeJSON(t, dir, "pod.json", map[string]any{
		"metadata":      map[string]any{"name": "sp", "namespace": "default", "uid": "sp-uid", "attempt": 0},
		"log_directory": logDir,
		"linux":         map[string]any{},
	})
	ctrCfg := writeJSON(t, dir, "container.json", map[string]any{
		"metadata": map[string]any{"name": "app"},
		"image":    map[string]any{"image": img.ref},
		"command":  []string{"/hello", "sha256:/data/a.bin", "sha256:/data/b.bin"},
		"log_path": "app.log",
		"linux":    map[string]any{},
	})
	pod := must("runp", podCfg)
	ctr := must("create", pod, ctrCfg, podCfg)
	must("start", ctr)
	waitFor(t, 2*time.Minute, "the container to exit", func() bool {
		return strings.Contains(must("inspect", "-o", "go-template", "--template", "{{.status.state}}", ctr), "EXITED")
	})
	logs := must("logs", ctr)
	want := img.sums["/data/a.bin"] + "\n" + img.sums["/data/b.bin"]
	if logs != want {
		t.Fatalf("container logs %q, want %q", logs, want)
	}
	must("rmp", "-f", pod)

	// rmi (through the proxy) frees the span cache.
	spans := filepath.Join(sn.Root, "remote", "cache", "spans", layer.Encoded())
	if _, err := os.Stat(spans); err != nil {
		t.Fatalf("no cached spans for the layer: %v", err)
	}
	must("rmi", img.ref)
	waitFor(t, time.Minute, "the layer's span cache to go", func() bool {
		_, err := os.Stat(spans)
		return os.IsNotExist(err)
	})
}

// writeJSON writes v as JSON to dir/name and returns the path.
func writeJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
