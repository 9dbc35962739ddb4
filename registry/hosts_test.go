package registry_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// hostsDir writes containerd's host configuration for registry upstream
// (hosts.toml in upstream's directory under a new config_path) and
// returns the config_path.
func hostsDir(t *testing.T, upstream, hostsToml string) string {
	t.Helper()
	root := t.TempDir()
	host, port, _ := strings.Cut(upstream, ":")
	dir := filepath.Join(root, host+"_"+port+"_")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

// closingListener accepts connections and closes them at once: a mirror
// that is up at the TCP level but dead. It counts the connections.
func closingListener(t *testing.T) (string, *atomic.Int64) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
	return l.Addr().String(), &n
}

// A repository configured with containerd's hosts.toml sends reads to the
// mirrors in order, with the ns parameter and the configured headers,
// skips a dead mirror after its first failure, falls back to the registry
// when a mirror cannot serve a range, and resolves tags only on hosts
// allowed to.
func TestMirrors(t *testing.T) {
	ctx := testCtx(t)
	upstream := registrytest.StartReferrersRegistry(t)
	img := pushImage(t, ctx, newRepo(t, upstream, "spanpull/mirrored", registry.Options{}), "v1", 5000)

	mirror := registrytest.StartFaultProxy(t, upstream)
	dead, deadConns := closingListener(t)
	toml := fmt.Sprintf(`server = "http://%s"
[host."http://%s"]
  capabilities = ["pull", "resolve"]
[host."http://%s"]
  capabilities = ["pull"]
  [host."http://%s".header]
    x-spanpull-test = ["mirror"]
`, upstream, dead, mirror.Addr, mirror.Addr)
	hosts := registry.ConfigureHosts(ctx, registry.HostsOptions{ConfigPath: hostsDir(t, upstream, toml)})
	r := newRepo(t, upstream, "spanpull/mirrored", registry.Options{Hosts: hosts})

	buf := make([]byte, 100)
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 10); err != nil || !bytes.Equal(buf, img.layer[10:110]) {
		t.Fatalf("range read through the mirror: %v", err)
	}
	if _, err := r.FetchManifestDescriptor(ctx, img.manifestDesc); err != nil {
		t.Fatalf("manifest by digest: %v", err)
	}
	if deadConns.Load() != 1 {
		t.Fatalf("dead mirror got %d connections, want 1 (then skipped)", deadConns.Load())
	}
	ns := "?ns=" + strings.ReplaceAll(upstream, ":", "%3A")
	want := "GET /v2/spanpull/mirrored/blobs/" + img.layerDesc.Digest.String() + ns + " [bytes=10-109] -> 206"
	if mirror.CountRequests(want) != 1 {
		t.Fatalf("mirror did not serve the range with ns: %v", mirror.Requests())
	}
	if mirror.CountRequests("/manifests/"+img.manifestDesc.Digest.String()+ns) != 1 {
		t.Fatalf("mirror did not serve the manifest: %v", mirror.Requests())
	}

	// Tags resolve only on hosts with the resolve capability: here the
	// (dead) first mirror, then the registry, never the pull-only mirror.
	if d, err := r.Resolve(ctx, "v1"); err != nil || d.Digest != img.manifestDesc.Digest {
		t.Fatalf("resolve v1: %v %v", d, err)
	}
	if n := mirror.CountRequests("/manifests/v1"); n != 0 {
		t.Fatalf("pull-only mirror asked to resolve a tag: %v", mirror.Requests())
	}

	// A mirror that ignores Range hands the read to the registry.
	mirror.Set(registrytest.Faults{StripRange: true})
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 20); err != nil || !bytes.Equal(buf, img.layer[20:120]) {
		t.Fatalf("range read after the mirror ignored Range: %v", err)
	}
	// A mirror answering 404 also does.
	mirror.Set(registrytest.Faults{Status: 404, StatusCount: -1})
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 30); err != nil || !bytes.Equal(buf, img.layer[30:130]) {
		t.Fatalf("range read after a mirror 404: %v", err)
	}
}

// The header table of hosts.toml reaches the mirror.
func TestMirrorHeader(t *testing.T) {
	ctx := testCtx(t)
	upstream := registrytest.StartReferrersRegistry(t)
	img := pushImage(t, ctx, newRepo(t, upstream, "spanpull/hdr", registry.Options{}), "v1", 100)
	mirror := registrytest.StartFaultProxy(t, upstream)
	// The proxy refuses requests without the header's credentials: basic
	// auth sent as a configured header, as some mirrors expect.
	mirror.Set(registrytest.Faults{User: "node", Password: "pw"})
	toml := fmt.Sprintf(`server = "http://%s"
[host."http://%s"]
  capabilities = ["pull"]
  [host."http://%s".header]
    authorization = "Basic %s"
`, upstream, mirror.Addr, mirror.Addr, base64.StdEncoding.EncodeToString([]byte("node:pw")))
	hosts := registry.ConfigureHosts(ctx, registry.HostsOptions{ConfigPath: hostsDir(t, upstream, toml)})
	r := newRepo(t, upstream, "spanpull/hdr", registry.Options{Hosts: hosts})
	if _, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	if mirror.CountRequests("-> 206") != 1 {
		t.Fatalf("mirror requests: %v", mirror.Requests())
	}
}

// Without a hosts.toml for the registry, ConfigureHosts gives the registry
// alone, over plain HTTP when PlainHTTP says so.
func TestConfigureHostsDefault(t *testing.T) {
	ctx := testCtx(t)
	upstream := registrytest.StartReferrersRegistry(t)
	img := pushImage(t, ctx, newRepo(t, upstream, "spanpull/plain", registry.Options{}), "v1", 100)
	hosts := registry.ConfigureHosts(ctx, registry.HostsOptions{
		ConfigPath: t.TempDir(),
		PlainHTTP:  func(h string) bool { return h == upstream },
	})
	hs, err := hosts(upstream)
	if err != nil || len(hs) != 1 || hs[0].Scheme != "http" || hs[0].Host != upstream {
		t.Fatalf("hosts = %+v, %v", hs, err)
	}
	r := newRepo(t, upstream, "spanpull/plain", registry.Options{Hosts: hosts})
	if _, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
}

// A password rotated while a Repository lives: the registry's 401 on the
// cached credentials makes the client read the Docker config again and
// retry once, so the read succeeds without a new Repository.
func TestCredentialRotation(t *testing.T) {
	p, ctx := faultyRegistry(t)
	p.Set(registrytest.Faults{User: "alice", Password: "one"})
	cfg := filepath.Join(t.TempDir(), "config.json")
	writeDockerConfig(t, cfg, p.Addr, "alice", "one")
	r := newRepo(t, p.Addr, "spanpull/rotate", registry.Options{DockerConfig: cfg})
	img := pushImage(t, ctx, r, "v1", 2000)

	p.Set(registrytest.Faults{User: "alice", Password: "two"})
	buf := make([]byte, 10)
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 0); !errors.Is(err, registry.ErrUnauthorized) {
		t.Fatalf("read with the old password: %v, want unauthorized", err)
	}
	writeDockerConfig(t, cfg, p.Addr, "alice", "two")
	before := len(p.Requests())
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 0); err != nil || !bytes.Equal(buf, img.layer[:10]) {
		t.Fatalf("read after the config changed: %v", err)
	}
	// One 401 (the cached old password), one retry with the new one.
	if got := p.Requests()[before:]; len(got) != 2 || !strings.Contains(got[0], "-> 401") || !strings.HasSuffix(got[1], "206") {
		t.Fatalf("requests after rotation: %v", got)
	}
}

func writeDockerConfig(t *testing.T, path, host, user, password string) {
	t.Helper()
	cfg := `{"auths":{"` + host + `":{"auth":"` + base64.StdEncoding.EncodeToString([]byte(user+":"+password)) + `"}}}`
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestChainCredentials(t *testing.T) {
	ctx := context.Background()
	empty := func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, nil }
	first := auth.StaticCredential("h:1", auth.Credential{Username: "a", Password: "1"})
	second := auth.StaticCredential("h:1", auth.Credential{Username: "b", Password: "2"})
	c, err := registry.ChainCredentials(nil, empty, first, second)(ctx, "h:1")
	if err != nil || c.Username != "a" {
		t.Fatalf("got %+v %v, want the first non-empty", c, err)
	}
	if c, err := registry.ChainCredentials(first)(ctx, "other:2"); err != nil || c != auth.EmptyCredential {
		t.Fatalf("other host: %+v %v", c, err)
	}
	boom := errors.New("boom")
	failing := func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, boom }
	if _, err := registry.ChainCredentials(failing, first)(ctx, "h:1"); !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
}
