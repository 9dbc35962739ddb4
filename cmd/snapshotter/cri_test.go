package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
	"sigs.k8s.io/yaml"
)

func TestLoadConfigCRIAndHosts(t *testing.T) {
	c := defaultConfig()
	if c.Remote.ConfigPath != "/etc/containerd/certs.d" || c.CRI.ContainerdCRISocket != "/run/containerd/containerd.sock" || c.CRI.ImageServiceProxy != "" {
		t.Fatalf("defaults: %+v", c)
	}
	p := filepath.Join(t.TempDir(), "c.toml")
	body := `
[remote]
config_path = "/srv/certs.d"
docker_config = "/srv/docker.json"
[cri]
image_service_proxy = "/run/spanpull/cri.sock"
containerd_cri_socket = "/run/k3s/containerd.sock"
`
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := loadConfig(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if c.CRI.ImageServiceProxy != "/run/spanpull/cri.sock" || c.CRI.ContainerdCRISocket != "/run/k3s/containerd.sock" {
		t.Fatalf("cri: %+v", c.CRI)
	}
	rc := c.resolverConfig()
	if rc.RegistryConfigPath != "/srv/certs.d" || rc.DockerConfig != "/srv/docker.json" {
		t.Fatalf("resolver config: %+v", rc)
	}
	c.CRI.ImageServiceProxy = c.Address
	if err := c.validate(); err == nil {
		t.Fatal("proxy on the snapshots socket accepted")
	}
}

// fakeCRI is containerd's CRI image service for TestServeCRIProxy.
type fakeCRI struct {
	runtime.UnimplementedImageServiceServer
	mu    sync.Mutex
	pulls []string
}

func (f *fakeCRI) PullImage(_ context.Context, r *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pulls = append(f.pulls, r.GetImage().GetImage()+" "+r.GetAuth().GetUsername())
	return &runtime.PullImageResponse{ImageRef: "sha256:1"}, nil
}

// TestServeCRIProxy: with --cri-image-service-proxy the daemon serves the
// CRI image service on that socket and forwards to containerd's; /healthz
// and /readyz answer on the metrics address.
func TestServeCRIProxy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("TestServeCRIProxy mounts overlayfs and must run as root")
	}
	dir := t.TempDir()
	containerdSock := filepath.Join(dir, "containerd.sock")
	l, err := net.Listen("unix", containerdSock)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeCRI{}
	g := grpc.NewServer()
	runtime.RegisterImageServiceServer(g, fake)
	served := make(chan struct{})
	go func() { defer close(served); _ = g.Serve(l) }()
	t.Cleanup(func() { g.Stop(); <-served })

	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ml.Addr().String()
	ml.Close()
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[cri]\ncontainerd_cri_socket = \""+containerdSock+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	proxySock := filepath.Join(dir, "cri.sock")
	stop := runServe(t, "--config", cfg, "--address", filepath.Join(dir, "snap.sock"), "--root", filepath.Join(dir, "root"),
		"--metrics-address", metricsAddr, "--cri-image-service-proxy", proxySock)
	dialSnapshotter(t, filepath.Join(dir, "snap.sock"))

	get := func(path string) (int, string) {
		deadline := time.Now().Add(10 * time.Second)
		for {
			resp, err := http.Get("http://" + metricsAddr + path)
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK || time.Now().After(deadline) {
					return resp.StatusCode, string(b)
				}
			} else if time.Now().After(deadline) {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if code, body := get("/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz: %d %s", code, body)
	}
	if code, body := get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz: %d %s", code, body)
	}

	cc, err := grpc.NewClient("unix://"+proxySock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, err := runtime.NewImageServiceClient(cc).PullImage(context.Background(), &runtime.PullImageRequest{
		Image: &runtime.ImageSpec{Image: "reg.example/app:1"},
		Auth:  &runtime.AuthConfig{Username: "alice", Password: "pw"},
	})
	if err != nil || resp.ImageRef != "sha256:1" {
		t.Fatalf("pull through the proxy: %v %v", resp, err)
	}
	fake.mu.Lock()
	pulls := strings.Join(fake.pulls, ",")
	fake.mu.Unlock()
	if pulls != "reg.example/app:1 alice" {
		t.Fatalf("containerd saw pulls %q", pulls)
	}

	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(proxySock); !os.IsNotExist(err) {
		t.Fatalf("proxy socket left after stop: %v", err)
	}
}

// The daemon config files shipped in deploy/ (the example and the Helm
// chart's default) are valid configs of this daemon.
func TestDeployConfigs(t *testing.T) {
	check := func(name string, body []byte) {
		p := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(p, body, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := loadConfig(p, true)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := c.validate(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.CRI.ImageServiceProxy == "" || c.MetricsAddress == "" {
			t.Fatalf("%s: the deployment needs the CRI proxy and the metrics address (probes): %+v", name, c)
		}
	}
	b, err := os.ReadFile("../../deploy/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	check("deploy/config.toml", b)
	vb, err := os.ReadFile("../../deploy/helm/spanpull/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var values struct{ Config string }
	if err := yaml.Unmarshal(vb, &values); err != nil {
		t.Fatal(err)
	}
	check("helm values config", []byte(values.Config))
}
