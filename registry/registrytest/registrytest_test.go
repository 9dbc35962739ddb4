package registrytest

import (
	"bytes"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Both registries start, accept raw pushes, serve Range, and are gone once
// the test that started them is cleaned up.
func TestRegistriesStartServeAndStop(t *testing.T) {
	for name, start := range map[string]func(testing.TB) string{
		"distribution": StartDistribution,
		"ggcr":         StartReferrersRegistry,
	} {
		t.Run(name, func(t *testing.T) {
			var addr string
			t.Run("serve", func(t *testing.T) {
				addr = start(t)
				data := []byte("hello, registry")
				dgst := PushBlob(t, addr, "a/b", data)
				if dgst != digest.FromBytes(data).String() {
					t.Fatalf("digest %s", dgst)
				}
				r := Do(t, http.MethodGet, "http://"+addr+"/v2/a/b/blobs/"+dgst, http.Header{"Range": {"bytes=7-14"}}, nil)
				if r.StatusCode != http.StatusPartialContent || !bytes.Equal(r.Body, data[7:15]) {
					t.Fatalf("range GET: %s %q", r.Status, r.Body)
				}
				m := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` +
					dgst + `","size":15},"layers":[]}`)
				PushManifest(t, addr, "a/b", "t1", "application/vnd.oci.image.manifest.v1+json", m)
				r = Do(t, http.MethodGet, "http://"+addr+"/v2/a/b/manifests/t1", http.Header{"Accept": {"application/vnd.oci.image.manifest.v1+json"}}, nil)
				if r.Header.Get("Docker-Content-Digest") != digest.FromBytes(m).String() {
					t.Fatalf("manifest digest %q", r.Header.Get("Docker-Content-Digest"))
				}
			})
			// The subtest's Cleanup has stopped the registry.
			deadline := time.Now().Add(5 * time.Second)
			for {
				c, err := net.DialTimeout("tcp", addr, time.Second)
				if err != nil {
					break
				}
				c.Close()
				if time.Now().After(deadline) {
					t.Fatalf("registry on %s still listening after cleanup", addr)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

func TestFaultProxyCountsAndForwards(t *testing.T) {
	p := StartFaultProxy(t, StartReferrersRegistry(t))
	p.Set(Faults{Status: http.StatusTeapot, StatusCount: 1})
	for _, want := range []int{http.StatusTeapot, http.StatusOK} {
		resp, err := http.Get("http://" + p.Addr + "/v2/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("status %d, want %d", resp.StatusCode, want)
		}
	}
	if n := p.CountRequests("GET /v2/"); n != 2 {
		t.Fatalf("requests %v", p.Requests())
	}
}
