// Package registrytest starts real registries for tests: Debian's
// docker-registry (CNCF distribution 2.8) as a child process, and
// go-containerregistry's in-process registry with the OCI referrers API.
//
// Both are needed because neither real registry available here implements
// the referrers API (distribution 2.8 and 3.x answer 404; zot cannot be
// installed), while SOCI v1 discovery must be tested both through the API
// and through the `sha256-<hex>` fallback tag. It also provides a
// fault-injecting proxy (FaultProxy) to put in front of either, because
// transient registry failures (5xx, resets mid-body, latency, auth
// challenges) cannot be triggered on demand in a real registry.
//
// Everything started here listens on a free 127.0.0.1 port and is stopped
// by t.Cleanup.
package registrytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"
)

// DistributionBinary is where Debian installs docker-registry.
const DistributionBinary = "/usr/bin/docker-registry"

// startTimeout bounds how long a registry may take to answer /v2/.
const startTimeout = 15 * time.Second

// StartDistribution starts Debian's docker-registry with filesystem storage
// in a temporary directory and returns its "127.0.0.1:port" address once
// GET /v2/ answers. It fails the test if the binary is missing (CI installs
// it) or the registry does not come up; the process is killed in Cleanup.
func StartDistribution(t testing.TB) string {
	t.Helper()
	bin := DistributionBinary
	if p := os.Getenv("SPANPULL_DOCKER_REGISTRY"); p != "" {
		bin = p
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("docker-registry not installed (%v): run scripts/install-deps.sh", err)
	}
	var lastErr error
	// A free port can be taken by someone else between probing and the
	// registry binding it; try a few ports before giving up.
	for try := 0; try < 3; try++ {
		addr, err := startDistribution(t, bin)
		if err == nil {
			return addr
		}
		lastErr = err
	}
	t.Fatalf("start docker-registry: %v", lastErr)
	return ""
}

// DistributionConfig is the docker-registry configuration the tests use:
// filesystem storage in storageDir, listening on addr, deletes allowed,
// quiet logs.
func DistributionConfig(storageDir, addr string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: spanpull-test-not-secret
`, storageDir, addr)
}

func startDistribution(t testing.TB, bin string) (string, error) {
	dir := t.TempDir()
	addr, err := freeAddr()
	if err != nil {
		return "", err
	}
	cfg := DistributionConfig(filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return "", err
	}
	out := &lockedBuffer{}
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(3 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}
	if err := waitReady(addr, exited); err != nil {
		stop()
		return "", fmt.Errorf("%w; output:\n%s", err, out.String())
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("docker-registry %s output:\n%s", addr, out.String())
		}
	})
	return addr, nil
}

// StartReferrersRegistry starts go-containerregistry's registry with the
// OCI referrers API enabled, in-process on a free port, and returns its
// address. Caveats (ENVIRONMENT.md §2): it derives a referrer's
// artifactType from the config media type and sends no OCI-Subject header.
func StartReferrersRegistry(t testing.TB) string {
	t.Helper()
	h := ggcr.New(ggcr.WithReferrersSupport(true), ggcr.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")
	if err := waitReady(addr, nil); err != nil {
		t.Fatalf("start referrers registry: %v", err)
	}
	return addr
}

// freeAddr returns a 127.0.0.1 address with a port that was free a moment
// ago.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// waitReady polls GET /v2/ until it answers 200 (or 401), the process
// exits, or startTimeout passes.
func waitReady(addr string, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	client := &http.Client{Timeout: time.Second}
	for {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
			err = fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		select {
		case <-exited:
			return fmt.Errorf("registry on %s exited before it was ready (last: %v)", addr, err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("registry on %s not ready after %s: %v", addr, startTimeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// PushBlob is a minimal raw client for seeding a registry in tests without
// going through the code under test: it uploads a blob with a monolithic
// POST+PUT, or a manifest with PUT, and fails the test on error.
func PushBlob(t testing.TB, addr, repo string, data []byte) string {
	t.Helper()
	dgst := digest.FromBytes(data).String()
	resp := do(t, http.MethodPost, "http://"+addr+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload to %s/%s: %s", addr, repo, resp.Status)
	}
	loc := resp.Header.Get("Location")
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + addr + loc
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	resp = do(t, http.MethodPut, loc+sep+"digest="+dgst, "application/octet-stream", data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload blob %s to %s/%s: %s", dgst, addr, repo, resp.Status)
	}
	return dgst
}

// PushManifest uploads a manifest under reference (tag or digest).
func PushManifest(t testing.TB, addr, repo, reference, mediaType string, data []byte) {
	t.Helper()
	resp := do(t, http.MethodPut, "http://"+addr+"/v2/"+repo+"/manifests/"+reference, mediaType, data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push manifest %s/%s:%s: %s", addr, repo, reference, resp.Status)
	}
}

func do(t testing.TB, method, url, contentType string, body []byte) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}
