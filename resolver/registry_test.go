package resolver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/sirupsen/logrus"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/snapshotter"
)

// An image the daemon has no credentials for falls back with reason
// "unauthorized" (not "no_index"), in the metric and the log line; with
// the image's own credentials (what the CRI proxy remembers) the lookup
// gets through.
func TestUnauthorizedFallback(t *testing.T) {
	upstream := registrytest.StartReferrersRegistry(t)
	md, _ := pushImage(t, upstream, "app")
	p := registrytest.StartFaultProxy(t, upstream)
	p.Set(registrytest.Faults{User: "alice", Password: "pw"})
	ref := p.Addr + "/app:v1"
	labels := map[string]string{
		snapshotters.TargetManifestDigestLabel: md.String(),
		snapshotters.TargetRefLabel:            ref,
		snapshotters.TargetLayerDigestLabel:    md.String(),
	}
	var out bytes.Buffer
	logger := logrus.New()
	logger.SetOutput(&out)
	r, err := New(Config{Root: t.TempDir(), FillRate: -1, Logger: logrus.NewEntry(logger),
		DockerConfig: filepath.Join(t.TempDir(), "none.json")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	_, err = r.Mount(context.Background(), t.TempDir(), labels)
	if !errors.Is(err, snapshotter.ErrNoRemote) || !strings.Contains(err.Error(), "unauthorized") {
		t.Fatalf("mount without credentials: %v", err)
	}
	if !strings.Contains(out.String(), "fallback=unauthorized") {
		t.Fatalf("log line does not name the reason:\n%s", out.String())
	}

	withCreds, err := New(Config{Root: t.TempDir(), FillRate: -1, DockerConfig: filepath.Join(t.TempDir(), "none.json"),
		ImageCredentials: func(imageRef string) auth.CredentialFunc {
			if imageRef != ref {
				t.Errorf("credentials asked for %q, want %q", imageRef, ref)
			}
			return auth.StaticCredential(p.Addr, auth.Credential{Username: "alice", Password: "pw"})
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { withCreds.Close() })
	if img := withCreds.image(context.Background(), ref, labels); !errors.Is(img.err, errNoIndex) {
		t.Fatalf("with the image's credentials: err = %v, want errNoIndex", img.err)
	}
	if fallbackReason(errNoIndex) != "no_index" {
		t.Fatal("no_index reason")
	}
}

// Index lookups go to the mirror that containerd's hosts.toml names, with
// the ns parameter.
func TestLookupThroughMirror(t *testing.T) {
	upstream := registrytest.StartReferrersRegistry(t)
	md, _ := pushImage(t, upstream, "app")
	mirror := registrytest.StartFaultProxy(t, upstream)
	root := t.TempDir()
	host, port, _ := strings.Cut(upstream, ":")
	dir := filepath.Join(root, host+"_"+port+"_")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", upstream, mirror.Addr)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := New(Config{Root: t.TempDir(), FillRate: -1, RegistryConfigPath: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	labels := map[string]string{snapshotters.TargetManifestDigestLabel: md.String()}
	if img := r.image(context.Background(), upstream+"/app:v1", labels); !errors.Is(img.err, errNoIndex) {
		t.Fatalf("lookup: %v", img.err)
	}
	if n := mirror.CountRequests("/v2/app/manifests/" + md.String() + "?ns=" + strings.ReplaceAll(upstream, ":", "%3A")); n != 1 {
		t.Fatalf("manifest not fetched from the mirror with ns: %v", mirror.Requests())
	}
}
