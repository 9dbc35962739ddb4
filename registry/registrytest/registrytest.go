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
// by t.Cleanup. LaunchDistribution starts docker-registry without a
// testing.T, for the end-to-end test environment and the benchmark harness.
package registrytest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/proc"
)

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
	if err := waitReady(context.Background(), nil, addr); err != nil {
		t.Fatalf("start referrers registry: %v", err)
	}
	return addr
}

// waitReady polls GET /v2/ until it answers 200 (or 401), p exits (p may
// be nil), or startTimeout passes.
func waitReady(ctx context.Context, p *proc.Process, addr string) error {
	client := &http.Client{Timeout: time.Second}
	return proc.WaitReady(ctx, p, startTimeout, func() error {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusUnauthorized {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
}

// PushBlob is a minimal raw client for seeding a registry in tests without
// going through the code under test: it uploads a blob with a monolithic
// POST+PUT, or a manifest with PUT, and fails the test on error.
func PushBlob(t testing.TB, addr, repo string, data []byte) string {
	t.Helper()
	dgst := digest.FromBytes(data).String()
	resp := Do(t, http.MethodPost, "http://"+addr+"/v2/"+repo+"/blobs/uploads/", nil, nil)
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
	resp = Do(t, http.MethodPut, loc+sep+"digest="+dgst, contentType("application/octet-stream"), data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload blob %s to %s/%s: %s", dgst, addr, repo, resp.Status)
	}
	return dgst
}

// PushManifest uploads a manifest under reference (tag or digest).
func PushManifest(t testing.TB, addr, repo, reference, mediaType string, data []byte) {
	t.Helper()
	resp := Do(t, http.MethodPut, "http://"+addr+"/v2/"+repo+"/manifests/"+reference, contentType(mediaType), data)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push manifest %s/%s:%s: %s", addr, repo, reference, resp.Status)
	}
}

// Response is a registry's answer to Do, its body read whole.
type Response struct {
	StatusCode int
	Status     string
	Header     http.Header
	Body       []byte
}

// Do sends one raw request to a registry, for tests that seed or inspect
// it without going through the code under test. header may be nil. A
// request that gets no answer within 30 s, or whose body cannot be read,
// fails the test; any status is returned.
func Do(t testing.TB, method, url string, header http.Header, body []byte) Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	maps.Copy(req.Header, header)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return Response{StatusCode: resp.StatusCode, Status: resp.Status, Header: resp.Header, Body: b}
}

// contentType is the header of a request whose body has media type mt
// (none when mt is empty).
func contentType(mt string) http.Header {
	if mt == "" {
		return nil
	}
	return http.Header{"Content-Type": {mt}}
}
