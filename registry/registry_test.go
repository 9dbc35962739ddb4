package registry_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	ggcr "github.com/google/go-containerregistry/pkg/registry"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// fastRetry keeps fault tests quick while still exercising backoff.
var fastRetry = registry.RetryPolicy{MaxRetries: 4, MinBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}

func newRepo(t *testing.T, addr, name string, opts registry.Options) *registry.Repository {
	t.Helper()
	opts.PlainHTTP = true
	if opts.Retry == (registry.RetryPolicy{}) {
		opts.Retry = fastRetry
	}
	if opts.Credential == nil && opts.DockerConfig == "" {
		// Do not depend on the host's ~/.docker/config.json.
		opts.Credential = func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, nil }
	}
	r, err := registry.New(addr+"/"+name, opts)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// faultyRegistry starts docker-registry behind a fault proxy, and returns
// the proxy and a context for the test.
func faultyRegistry(t *testing.T) (*registrytest.FaultProxy, context.Context) {
	t.Helper()
	return registrytest.StartFaultProxy(t, registrytest.StartDistribution(t)), testCtx(t)
}

// readBlob reads a whole blob through FetchBlob.
func readBlob(ctx context.Context, r *registry.Repository, desc ocispec.Descriptor) ([]byte, error) {
	rc, err := r.FetchBlob(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

// testImage is a one-layer image pushed through the code under test.
type testImage struct {
	layer, config []byte
	layerDesc     ocispec.Descriptor
	manifest      []byte
	manifestDesc  ocispec.Descriptor
}

func pushImage(t *testing.T, ctx context.Context, r *registry.Repository, tag string, layerSize int) testImage {
	t.Helper()
	var img testImage
	img.layer = layertest.Random(uint64(layerSize), layerSize)
	img.config = []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	var err error
	img.layerDesc, err = r.PushBlobBytes(ctx, ocispec.MediaTypeImageLayerGzip, img.layer)
	if err != nil {
		t.Fatal(err)
	}
	configDesc, err := r.PushBlobBytes(ctx, ocispec.MediaTypeImageConfig, img.config)
	if err != nil {
		t.Fatal(err)
	}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: configDesc, Layers: []ocispec.Descriptor{img.layerDesc}}
	m.SchemaVersion = 2
	img.manifest, _ = json.Marshal(m)
	img.manifestDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(img.manifest), Size: int64(len(img.manifest))}
	if err := r.PushManifest(ctx, img.manifestDesc, img.manifest, tag); err != nil {
		t.Fatal(err)
	}
	return img
}

// registries runs f against both real registries.
func registries(t *testing.T, f func(t *testing.T, addr string, referrersAPI bool)) {
	t.Run("distribution", func(t *testing.T) { f(t, registrytest.StartDistribution(t), false) })
	t.Run("ggcr-referrers", func(t *testing.T) { f(t, registrytest.StartReferrersRegistry(t), true) })
}

func TestPushFetchRangeRead(t *testing.T) {
	registries(t, func(t *testing.T, addr string, _ bool) {
		ctx := testCtx(t)
		r := newRepo(t, addr, "spanpull/test", registry.Options{})
		img := pushImage(t, ctx, r, "v1", 300_000)

		d, err := r.Resolve(ctx, "v1")
		if err != nil {
			t.Fatal(err)
		}
		if d.Digest != img.manifestDesc.Digest || d.Size != img.manifestDesc.Size {
			t.Fatalf("Resolve = %+v, want %s", d, img.manifestDesc.Digest)
		}
		for _, ref := range []string{"v1", img.manifestDesc.Digest.String()} {
			b, d, err := r.FetchManifest(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b, img.manifest) || d.Digest != img.manifestDesc.Digest {
				t.Fatalf("FetchManifest(%s) = %s", ref, b)
			}
		}
		if b, err := r.FetchManifestDescriptor(ctx, img.manifestDesc); err != nil || !bytes.Equal(b, img.manifest) {
			t.Fatalf("FetchManifestDescriptor: %v", err)
		}

		if got, err := readBlob(ctx, r, img.layerDesc); err != nil || !bytes.Equal(got, img.layer) {
			t.Fatalf("FetchBlob: %v, %d bytes", err, len(got))
		}

		for _, d := range []ocispec.Descriptor{img.layerDesc, img.manifestDesc} {
			if ok, err := r.Exists(ctx, d); err != nil || !ok {
				t.Fatalf("Exists(%s) = %v, %v", d.Digest, ok, err)
			}
		}
		missing := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("missing"), Size: 7}
		if ok, err := r.Exists(ctx, missing); err != nil || ok {
			t.Fatalf("Exists(missing) = %v, %v", ok, err)
		}
		// Pushing again is a no-op.
		if err := r.PushBlob(ctx, img.layerDesc, bytes.NewReader(img.layer)); err != nil {
			t.Fatal(err)
		}

		ra, err := r.BlobReader(img.layerDesc)
		if err != nil {
			t.Fatal(err)
		}
		size := int64(len(img.layer))
		if ra.Size() != size {
			t.Fatalf("Size = %d", ra.Size())
		}
		for _, c := range []struct {
			off  int64
			n    int
			want int
			eof  bool
		}{
			{0, 1, 1, false},
			{0, 10, 10, false},
			{12345, 65536, 65536, false},
			{size - 1, 1, 1, false},
			{size - 100, 100, 100, false},
			{size - 100, 1000, 100, true},
			{size, 10, 0, true},
			{size + 5, 10, 0, true},
			{0, int(size), int(size), false},
		} {
			p := make([]byte, c.n)
			n, err := ra.ReadAt(ctx, p, c.off)
			if n != c.want || (err == io.EOF) != c.eof || (err != nil && err != io.EOF) {
				t.Fatalf("ReadAt(%d, off %d) = %d, %v; want %d (eof %v)", c.n, c.off, n, err, c.want, c.eof)
			}
			if c.want > 0 && !bytes.Equal(p[:n], img.layer[c.off:c.off+int64(n)]) {
				t.Fatalf("ReadAt(%d, off %d): wrong bytes", c.n, c.off)
			}
		}
		if _, err := ra.ReadAt(ctx, make([]byte, 1), -1); err == nil {
			t.Fatal("negative offset accepted")
		}
		// ReadAt follows io.ReaderAt: an io.SectionReader over it reads
		// exactly the section.
		sec, err := io.ReadAll(io.NewSectionReader(readerAt{ctx, ra}, 1000, 5000))
		if err != nil || !bytes.Equal(sec, img.layer[1000:6000]) {
			t.Fatalf("section read: %v", err)
		}
	})
}

// readerAt binds a context to a BlobReader, as io.ReaderAt.
type readerAt struct {
	ctx context.Context
	b   *registry.BlobReader
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.b.ReadAt(r.ctx, p, off) }

func TestNotFoundErrorsNameReference(t *testing.T) {
	registries(t, func(t *testing.T, addr string, _ bool) {
		ctx := testCtx(t)
		r := newRepo(t, addr, "spanpull/test", registry.Options{})
		pushImage(t, ctx, r, "v1", 1000)

		_, _, err := r.FetchManifest(ctx, "nosuchtag")
		if !errors.Is(err, registry.ErrNotFound) || !strings.Contains(err.Error(), addr+"/spanpull/test:nosuchtag") {
			t.Fatalf("FetchManifest(nosuchtag) err = %v", err)
		}
		if _, err := r.Resolve(ctx, "nosuchtag"); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Resolve err = %v", err)
		}
		missing := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("missing"), Size: 7}
		_, err = r.FetchBlob(ctx, missing)
		if !errors.Is(err, registry.ErrNotFound) || !strings.Contains(err.Error(), "spanpull/test@"+missing.Digest.String()) {
			t.Fatalf("FetchBlob(missing) err = %v", err)
		}
		_, err = r.ReadAt(ctx, missing, make([]byte, 3), 0)
		if !errors.Is(err, registry.ErrNotFound) || !strings.Contains(err.Error(), missing.Digest.String()) {
			t.Fatalf("ReadAt(missing) err = %v", err)
		}
		other := newRepo(t, addr, "spanpull/nosuchrepo", registry.Options{})
		if _, _, err := other.FetchManifest(ctx, "latest"); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("missing repo err = %v", err)
		}
	})
}

// A v1 SOCI index pushed with its subject must be listed by Referrers: via
// the API on the referrers-capable registry (and without a fallback tag),
// via the sha256-<hex> fallback tag on distribution. Listing goes through a
// fresh Repository so no state from the push is reused.
func TestPushIndexThenReferrers(t *testing.T) {
	registries(t, func(t *testing.T, addr string, referrersAPI bool) {
		ctx := testCtx(t)
		r := newRepo(t, addr, "spanpull/soci", registry.Options{})
		img := pushImage(t, ctx, r, "latest", 5000)

		var indexes []ocispec.Descriptor
		for i, tool := range []string{"spanpull test A", "spanpull test B"} {
			ztoc := layertest.Random(uint64(77+i), 2000+i)
			zd, err := r.PushBlobBytes(ctx, index.MediaTypeZtoc, ztoc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := r.PushBlobBytes(ctx, index.MediaTypeIndexV1, []byte(index.EmptyConfigData)); err != nil {
				t.Fatal(err)
			}
			built, err := index.Build(index.BuildOptions{Version: index.V1, Subject: &img.manifestDesc, BuildTool: tool,
				Layers: []index.Layer{{LayerDigest: img.layerDesc.Digest, LayerMediaType: img.layerDesc.MediaType, SpanSize: 1 << 20, Ztoc: zd}}})
			if err != nil {
				t.Fatal(err)
			}
			if err := r.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
				t.Fatal(err)
			}
			indexes = append(indexes, built.Descriptor)
		}

		fresh := newRepo(t, addr, "spanpull/soci", registry.Options{})
		refs, err := fresh.Referrers(ctx, img.manifestDesc, index.MediaTypeIndexV1)
		if err != nil {
			t.Fatal(err)
		}
		if len(refs) != 2 {
			t.Fatalf("Referrers = %+v, want 2 indexes", refs)
		}
		for i, want := range indexes {
			found := false
			for _, d := range refs {
				if d.Digest == want.Digest && d.Size == want.Size && d.ArtifactType == index.MediaTypeIndexV1 {
					found = true
				}
			}
			if !found {
				t.Fatalf("index %d (%s) not listed in %+v", i, want.Digest, refs)
			}
		}
		// The listed index parses and leads to the zTOC of the layer.
		b, err := fresh.FetchManifestDescriptor(ctx, refs[0])
		if err != nil {
			t.Fatal(err)
		}
		ix, err := index.Parse(b)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := ix.Ztoc(img.layerDesc.Digest); !ok || !ix.Canonical {
			t.Fatalf("parsed index: ztoc found %v, canonical %v", ok, ix.Canonical)
		}
		if other, err := fresh.Referrers(ctx, img.manifestDesc, "application/x-other"); err != nil || len(other) != 0 {
			t.Fatalf("filtered Referrers = %v, %v", other, err)
		}

		api, err := fresh.ReferrersAPI(ctx)
		if err != nil || api != referrersAPI {
			t.Fatalf("ReferrersAPI = %v, %v; want %v", api, err, referrersAPI)
		}
		fallbackTag := "sha256-" + img.manifestDesc.Digest.Encoded()
		_, err = fresh.Resolve(ctx, fallbackTag)
		if referrersAPI {
			if !errors.Is(err, registry.ErrNotFound) {
				t.Fatalf("fallback tag on a referrers-API registry: %v", err)
			}
			// The raw API lists the index too.
			resp, err := http.Get("http://" + addr + "/v2/spanpull/soci/referrers/" + img.manifestDesc.Digest.String())
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var list ocispec.Index
			if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || len(list.Manifests) != 2 {
				t.Fatalf("referrers API: %v %+v", err, list)
			}
		} else {
			if err != nil {
				t.Fatalf("fallback tag %s: %v", fallbackTag, err)
			}
			b, _, err := fresh.FetchManifest(ctx, fallbackTag)
			if err != nil {
				t.Fatal(err)
			}
			var list ocispec.Index
			if err := json.Unmarshal(b, &list); err != nil || len(list.Manifests) != 2 {
				t.Fatalf("fallback index: %v %s", err, b)
			}
		}
	})
}

func TestMountBlob(t *testing.T) {
	registries(t, func(t *testing.T, addr string, _ bool) {
		ctx := testCtx(t)
		src := newRepo(t, addr, "spanpull/src", registry.Options{})
		img := pushImage(t, ctx, src, "v1", 4000)
		dst := newRepo(t, addr, "spanpull/dst", registry.Options{})
		if err := dst.MountBlob(ctx, img.layerDesc, "spanpull/src"); err != nil {
			t.Fatal(err)
		}
		rc, err := dst.FetchBlob(ctx, img.layerDesc)
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		if b, err := io.ReadAll(rc); err != nil || !bytes.Equal(b, img.layer) {
			t.Fatalf("mounted blob: %v", err)
		}
		missing := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("missing"), Size: 7}
		if err := dst.MountBlob(ctx, missing, "spanpull/src"); err == nil {
			t.Fatal("mounting a missing blob succeeded")
		}
	})
}

func TestPushManifestChecksContent(t *testing.T) {
	r := newRepo(t, "127.0.0.1:1", "x", registry.Options{})
	err := r.PushManifest(context.Background(), ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("a"), Size: 1}, []byte("b"), "t")
	if err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("err = %v", err)
	}
}

func TestNewErrors(t *testing.T) {
	for _, ref := range []string{"", "host:port:bad/x", "localhost:5000/a@sha256:12", "localhost/UPPER", "ghcr.io/"} {
		if _, err := registry.New(ref, registry.Options{}); err == nil {
			t.Errorf("New(%q) succeeded", ref)
		}
	}
	r, err := registry.New("localhost:5000/a/b:tag", registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Name() != "localhost:5000/a/b" || r.Reference() != "tag" {
		t.Fatalf("Name %q Reference %q", r.Name(), r.Reference())
	}
}

func TestForbidden(t *testing.T) {
	p := registrytest.StartFaultProxy(t, registrytest.StartReferrersRegistry(t))
	p.Set(registrytest.Faults{Status: http.StatusForbidden, StatusCount: -1})
	r := newRepo(t, p.Addr, "spanpull/denied", registry.Options{})
	_, _, err := r.FetchManifest(testCtx(t), "v1")
	if !errors.Is(err, registry.ErrForbidden) || !strings.Contains(err.Error(), p.Addr+"/spanpull/denied:v1") {
		t.Fatalf("err = %v", err)
	}
	if n := len(p.Requests()); n != 1 {
		t.Fatalf("403 retried: %v", p.Requests())
	}
}

// Insecure skips certificate verification; without it a self-signed
// registry fails at once (TLS errors are not retried).
func TestInsecureTLS(t *testing.T) {
	srv := httptest.NewTLSServer(ggcr.New(ggcr.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	ctx := testCtx(t)
	cred := func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, nil }
	r, err := registry.New(addr+"/a/b", registry.Options{Insecure: true, Credential: cred, Retry: fastRetry})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Resolve(ctx, "nosuch"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("insecure: %v", err)
	}
	strict, err := registry.New(addr+"/a/b", registry.Options{Credential: cred, Retry: registry.RetryPolicy{MaxRetries: 5, MinBackoff: 5 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := strict.Resolve(ctx, "nosuch"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("strict: %v", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("TLS error retried (%s)", d)
	}
}

// Talking https to a plain-HTTP registry fails at once, not after retries.
func TestHTTPSToPlainRegistryFailsFast(t *testing.T) {
	addr := registrytest.StartReferrersRegistry(t)
	cred := func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, nil }
	r, err := registry.New(addr+"/a/b", registry.Options{Credential: cred, Retry: registry.RetryPolicy{MaxRetries: 5, MinBackoff: 5 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := r.Resolve(testCtx(t), "v1"); err == nil || !strings.Contains(err.Error(), "HTTP response to HTTPS client") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("retried for %s", d)
	}
}

func TestBasicAuth(t *testing.T) {
	p, ctx := faultyRegistry(t)
	p.Set(registrytest.Faults{User: "alice", Password: "s3cret"})

	anon := newRepo(t, p.Addr, "spanpull/private", registry.Options{})
	_, _, err := anon.FetchManifest(ctx, "v1")
	if !errors.Is(err, registry.ErrUnauthorized) || !strings.Contains(err.Error(), p.Addr+"/spanpull/private:v1") {
		t.Fatalf("anonymous err = %v", err)
	}
	wrong := newRepo(t, p.Addr, "spanpull/private", registry.Options{
		Credential: auth.StaticCredential(p.Addr, auth.Credential{Username: "alice", Password: "nope"})})
	if _, err := wrong.Resolve(ctx, "v1"); !errors.Is(err, registry.ErrUnauthorized) {
		t.Fatalf("wrong password err = %v", err)
	}

	// Credentials from a Docker config.json.
	dir := t.TempDir()
	cfg := `{"auths":{"` + p.Addr + `":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("alice:s3cret")) + `"}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := newRepo(t, p.Addr, "spanpull/private", registry.Options{DockerConfig: filepath.Join(dir, "config.json")})
	img := pushImage(t, ctx, ok, "v1", 2000)
	if b, _, err := ok.FetchManifest(ctx, "v1"); err != nil || !bytes.Equal(b, img.manifest) {
		t.Fatalf("authenticated fetch: %v", err)
	}
	if _, err := ok.ReadAt(ctx, img.layerDesc, make([]byte, 10), 5); err != nil {
		t.Fatalf("authenticated range read: %v", err)
	}
}

func TestTokenAuth(t *testing.T) {
	upstream := registrytest.StartReferrersRegistry(t)
	p := registrytest.StartFaultProxy(t, upstream)
	p.Set(registrytest.Faults{User: "bob", Password: "pw", Token: true})
	ctx := testCtx(t)

	anon := newRepo(t, p.Addr, "spanpull/tok", registry.Options{})
	if _, err := anon.Resolve(ctx, "v1"); !errors.Is(err, registry.ErrUnauthorized) || !strings.Contains(err.Error(), p.Addr+"/spanpull/tok:v1") {
		t.Fatalf("anonymous err = %v", err)
	}
	r := newRepo(t, p.Addr, "spanpull/tok", registry.Options{
		Credential: auth.StaticCredential(p.Addr, auth.Credential{Username: "bob", Password: "pw"})})
	img := pushImage(t, ctx, r, "v1", 3000)
	buf := make([]byte, 100)
	if _, err := r.ReadAt(ctx, img.layerDesc, buf, 10); err != nil || !bytes.Equal(buf, img.layer[10:110]) {
		t.Fatalf("range read with token: %v", err)
	}
	if p.CountRequests("200 (token)") == 0 {
		t.Fatalf("no token fetched: %v", p.Requests())
	}
}

// Transient 5xx answers are retried and the operations succeed.
func TestRetryTransient5xx(t *testing.T) {
	p, ctx := faultyRegistry(t)
	r := newRepo(t, p.Addr, "spanpull/flaky", registry.Options{})

	p.Set(registrytest.Faults{Status: http.StatusServiceUnavailable, StatusCount: 3})
	img := pushImage(t, ctx, r, "v1", 100_000)
	if n := p.CountRequests("(injected)"); n != 3 {
		t.Fatalf("%d injected faults, want 3: %v", n, p.Requests())
	}

	for _, status := range []int{http.StatusInternalServerError, http.StatusBadGateway, http.StatusTooManyRequests} {
		p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Status: status, StatusCount: 2})
		if b, err := readBlob(ctx, r, img.layerDesc); err != nil || !bytes.Equal(b, img.layer) {
			t.Fatalf("status %d: %v", status, err)
		}
		p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Status: status, StatusCount: 2})
		buf := make([]byte, 1000)
		if n, err := r.ReadAt(ctx, img.layerDesc, buf, 500); err != nil || n != 1000 || !bytes.Equal(buf, img.layer[500:1500]) {
			t.Fatalf("status %d: ReadAt %d %v", status, n, err)
		}
	}
	p.Set(registrytest.Faults{Match: func(r *http.Request) bool { return strings.Contains(r.URL.Path, "/manifests/") },
		Status: http.StatusServiceUnavailable, StatusCount: 2})
	if _, _, err := r.FetchManifest(ctx, "v1"); err != nil {
		t.Fatal(err)
	}

	// Uploads (POST/PUT of blobs, PUT of manifests) are retried as well.
	p.Set(registrytest.Faults{Match: func(r *http.Request) bool { return r.Method == http.MethodPut || r.Method == http.MethodPost },
		Status: http.StatusBadGateway, StatusCount: 4})
	r2 := newRepo(t, p.Addr, "spanpull/flaky-push", registry.Options{})
	pushImage(t, ctx, r2, "v2", 5000)
	if n := p.CountRequests("PUT /v2/spanpull/flaky-push/manifests/v2 -> 201"); n != 1 {
		t.Fatalf("manifest push: %v", p.Requests())
	}

	// Connections reset before any answer are retried too.
	p.Set(registrytest.Faults{DropCount: 2})
	if _, err := r.Resolve(ctx, "v1"); err != nil {
		t.Fatal(err)
	}
	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, DropCount: 3})
	if n, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0); err != nil || n != 10 {
		t.Fatalf("ReadAt after dropped connections: %d %v", n, err)
	}
	if n := p.CountRequests("dropped"); n != 5 {
		t.Fatalf("%d dropped, want 5: %v", n, p.Requests())
	}
}

// Connections reset in the middle of a body are resumed with Range
// requests: the caller gets every byte once, verified.
func TestResumeAfterResetMidBody(t *testing.T) {
	registries(t, func(t *testing.T, addr string, _ bool) {
		p := registrytest.StartFaultProxy(t, addr)
		ctx := testCtx(t)
		r := newRepo(t, p.Addr, "spanpull/reset", registry.Options{})
		img := pushImage(t, ctx, r, "v1", 1_000_000)

		p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 100_000, ResetCount: 3})
		if b, err := readBlob(ctx, r, img.layerDesc); err != nil || !bytes.Equal(b, img.layer) {
			t.Fatalf("FetchBlob after resets: %v (%d bytes)", err, len(b))
		}
		if n := p.CountRequests("reset after"); n != 3 {
			t.Fatalf("%d resets, want 3: %v", n, p.Requests())
		}
		if n := p.CountRequests("[bytes=300000-999999] -> 206"); n != 1 {
			t.Fatalf("no resumed range request: %v", p.Requests())
		}

		p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 1000, ResetCount: 2})
		buf := make([]byte, 50_000)
		n, err := r.ReadAt(ctx, img.layerDesc, buf, 123_456)
		if err != nil || n != len(buf) || !bytes.Equal(buf, img.layer[123_456:173_456]) {
			t.Fatalf("ReadAt after resets: %d %v", n, err)
		}
		if n := p.CountRequests("[bytes=125456-173455] -> 206"); n != 1 {
			t.Fatalf("no resumed range request: %v", p.Requests())
		}
	})
}

// Persistent faults fail within a bounded time with an error naming the
// reference and the cause.
func TestPersistentFaultsFailCleanly(t *testing.T) {
	p, ctx := faultyRegistry(t)
	r := newRepo(t, p.Addr, "spanpull/down", registry.Options{})
	img := pushImage(t, ctx, r, "v1", 200_000)

	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Status: http.StatusServiceUnavailable, StatusCount: -1})
	start := time.Now()
	_, err := r.FetchBlob(ctx, img.layerDesc)
	if err == nil || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), img.layerDesc.Digest.String()) {
		t.Fatalf("FetchBlob err = %v", err)
	}
	_, err = r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("ReadAt err = %v", err)
	}
	// Bounded: a hang would run into the test context's minute.
	if d := time.Since(start); d > 15*time.Second {
		t.Fatalf("gave up after %s", d)
	}
	// 1 attempt + MaxRetries, for each of the two operations.
	if n := p.CountRequests("(injected)"); n != 2*(1+fastRetry.MaxRetries) {
		t.Fatalf("%d attempts, want %d", n, 2*(1+fastRetry.MaxRetries))
	}

	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 10_000, ResetCount: -1})
	start = time.Now()
	rc, err := r.FetchBlob(ctx, img.layerDesc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if err == nil || !strings.Contains(err.Error(), "gave up after 4 retries") || !strings.Contains(err.Error(), img.layerDesc.Digest.String()) {
		t.Fatalf("read with persistent resets: err = %v", err)
	}
	// Bounded: a hang would run into the test context's minute.
	if d := time.Since(start); d > 15*time.Second {
		t.Fatalf("gave up after %s", d)
	}

	// Context cancellation stops retrying at once.
	p.Set(registrytest.Faults{Status: http.StatusServiceUnavailable, StatusCount: -1})
	slow := newRepo(t, p.Addr, "spanpull/down", registry.Options{Retry: registry.RetryPolicy{MaxRetries: 50, MinBackoff: 10 * time.Second, MaxBackoff: 10 * time.Second}})
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, err := slow.Resolve(cctx, "v1"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Resolve under deadline err = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cancellation took %s", d)
	}
}

// A registry that stops answering trips the stall timeout instead of
// hanging; faster answers pass.
func TestStallTimeout(t *testing.T) {
	p, ctx := faultyRegistry(t)
	img := pushImage(t, ctx, newRepo(t, p.Addr, "spanpull/slow", registry.Options{}), "v1", 5000)
	r := newRepo(t, p.Addr, "spanpull/slow", registry.Options{StallTimeout: 300 * time.Millisecond,
		Retry: registry.RetryPolicy{MaxRetries: 1, MinBackoff: 10 * time.Millisecond}})

	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Latency: 20 * time.Second})
	start := time.Now()
	_, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0)
	if !errors.Is(err, registry.ErrStalled) || !strings.Contains(err.Error(), img.layerDesc.Digest.String()) {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 8*time.Second {
		t.Fatalf("stall detected after %s", d)
	}
	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, Latency: 50 * time.Millisecond})
	if _, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
}

// A body that stops flowing is abandoned after the timeout and resumed;
// a caller that pauses between reads is not mistaken for a stall.
func TestStallMidBodyResumes(t *testing.T) {
	p, ctx := faultyRegistry(t)
	img := pushImage(t, ctx, newRepo(t, p.Addr, "spanpull/stall", registry.Options{}), "v1", 500_000)
	r := newRepo(t, p.Addr, "spanpull/stall", registry.Options{StallTimeout: 300 * time.Millisecond})

	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 100_000, ResetCount: 1, StallReset: true})
	rc, err := r.FetchBlob(ctx, img.layerDesc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(b, img.layer) {
		t.Fatalf("FetchBlob across a stall: %v", err)
	}
	if n := p.CountRequests("[bytes=100000-499999] -> 206"); n != 1 {
		t.Fatalf("no resume after the stall: %v", p.Requests())
	}

	p.Set(registrytest.Faults{})
	before := len(p.Requests())
	rc, err = r.FetchBlob(ctx, img.layerDesc)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 1000)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // > StallTimeout, between reads
	rest, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(append(head, rest...), img.layer) {
		t.Fatalf("read after a pause: %v", err)
	}
	if got := p.Requests()[before:]; len(got) != 1 {
		t.Fatalf("a pause between reads caused extra requests: %v", got)
	}
}

func TestRangeIgnoredIsAnError(t *testing.T) {
	p, ctx := faultyRegistry(t)
	r := newRepo(t, p.Addr, "spanpull/norange", registry.Options{})
	img := pushImage(t, ctx, r, "v1", 5000)
	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, StripRange: true})
	_, err := r.ReadAt(ctx, img.layerDesc, make([]byte, 10), 100)
	if !errors.Is(err, registry.ErrRangeUnsupported) {
		t.Fatalf("err = %v", err)
	}
}

// TestReadRange reads ranges as streams: the bytes of the range, in
// order, and errors for a range outside the blob, a server that ignores
// Range and a body cut short.
func TestReadRange(t *testing.T) {
	p, ctx := faultyRegistry(t)
	r := newRepo(t, p.Addr, "spanpull/stream", registry.Options{})
	img := pushImage(t, ctx, r, "v1", 300_000)
	ra, err := r.BlobReader(img.layerDesc)
	if err != nil {
		t.Fatal(err)
	}
	size := int64(len(img.layer))
	read := func(off, n int64) ([]byte, error) {
		body, err := ra.ReadRange(ctx, off, n)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		return io.ReadAll(iotest.OneByteReader(body))
	}
	for _, c := range [][2]int64{{0, 1}, {12345, 65536}, {size - 100, 100}, {0, size}} {
		if got, err := read(c[0], c[1]); err != nil || !bytes.Equal(got, img.layer[c[0]:c[0]+c[1]]) {
			t.Fatalf("ReadRange(%d, %d) = %d bytes, %v", c[0], c[1], len(got), err)
		}
	}
	for _, c := range [][2]int64{{-1, 10}, {size - 10, 11}, {0, 0}, {size, 1}} {
		if _, err := ra.ReadRange(ctx, c[0], c[1]); err == nil {
			t.Errorf("ReadRange(%d, %d) outside the blob succeeded", c[0], c[1])
		}
	}
	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, StripRange: true})
	if _, err := ra.ReadRange(ctx, 100, 10); !errors.Is(err, registry.ErrRangeUnsupported) {
		t.Fatalf("range stripped: err = %v", err)
	}
	p.Set(registrytest.Faults{Match: registrytest.MatchBlobGET, ResetAfter: 1000, ResetCount: -1})
	got, err := read(0, 100_000)
	if err == nil || !bytes.Equal(got, img.layer[:len(got)]) || int64(len(got)) >= 100_000 {
		t.Fatalf("body reset after 1000 bytes: %d bytes, %v", len(got), err)
	}
}

func TestCorruptContentIsRejected(t *testing.T) {
	p, ctx := faultyRegistry(t)
	r := newRepo(t, p.Addr, "spanpull/corrupt", registry.Options{})
	img := pushImage(t, ctx, r, "v1", 5000)
	p.Set(registrytest.Faults{Corrupt: true, Match: func(r *http.Request) bool { return r.Method == http.MethodGet }})

	rc, err := r.FetchBlob(ctx, img.layerDesc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if err == nil || !strings.Contains(err.Error(), "content digest is") {
		t.Fatalf("corrupt blob: err = %v", err)
	}
	if _, _, err := r.FetchManifest(ctx, img.manifestDesc.Digest.String()); err == nil {
		t.Fatal("corrupt manifest accepted")
	}
	// A descriptor with the wrong size is caught too.
	p.Set(registrytest.Faults{})
	short := img.layerDesc
	short.Size--
	if rc, err := r.FetchBlob(ctx, short); err == nil {
		_, err = io.ReadAll(rc)
		rc.Close()
		if err == nil {
			t.Fatal("blob longer than its descriptor accepted")
		}
	}
}
