package main

// Test helpers for the create/convert/index tests: images built in Go
// (random gzip and tar layers, OCI and Docker schema 2 manifests, image
// indexes), pushed with registrytest's raw client, the indexer run
// in-process, and raw HTTP checks of what ended up in the registry. Names
// start with "it" (image test) to stay clear of main_test.go's helpers.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// Layer media types of the test images.
const (
	itOCIGzip       = ocispec.MediaTypeImageLayerGzip
	itOCITar        = ocispec.MediaTypeImageLayer
	itOCIZstd       = ocispec.MediaTypeImageLayerZstd
	itDockerGzip    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
	itDockerConfig  = "application/vnd.docker.container.image.v1+json"
	itDockerList    = "application/vnd.docker.distribution.manifest.list.v2+json"
	itDockerImage   = "application/vnd.docker.distribution.manifest.v2+json"
	itManifestTypes = ocispec.MediaTypeImageManifest + "," + ocispec.MediaTypeImageIndex + "," + itDockerImage + "," + itDockerList
)

// itLayer is a layer blob with what the test knows of its content.
type itLayer struct {
	Desc ocispec.Descriptor
	Data []byte
	// DiffID is the digest of the uncompressed tar.
	DiffID digest.Digest
	// Files are the regular files of the tar, by cleaned path.
	Files map[string][]byte
}

// itTar builds a tar of about size bytes of random (incompressible)
// file content: a few directories, files of up to 96 KiB, a symlink and a
// hardlink. The same seed gives the same bytes.
func itTar(seed uint64, size int64) ([]byte, map[string][]byte) {
	rng := rand.New(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 's', 'p'}))
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	files := map[string][]byte{}
	mtime := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	must := func(err error) {
		if err != nil {
			panic(err)
		}
	}
	var total int64
	var last string
	for d := 0; total < size || d == 0; d++ {
		dir := fmt.Sprintf("layer%d/dir%02d/", seed, d)
		must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX}))
		for f := 0; f < 16 && total < size; f++ {
			n := int64(rng.IntN(96 << 10))
			if f == 0 {
				n = 0 // an empty file in every directory
			}
			n = min(n, max(size-total, 1))
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			name := fmt.Sprintf("%sfile%02d.bin", dir, f)
			must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: n, ModTime: mtime, Uname: "root", Gname: "root", Format: tar.FormatPAX}))
			_, err := tw.Write(data)
			must(err)
			files[name] = data
			total += n + 512
			last = name
		}
	}
	must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: fmt.Sprintf("layer%d/link", seed), Linkname: last, Mode: 0o777, ModTime: mtime}))
	must(tw.WriteHeader(&tar.Header{Typeflag: tar.TypeLink, Name: fmt.Sprintf("layer%d/hardlink", seed), Linkname: last, ModTime: mtime}))
	must(tw.Close())
	return buf.Bytes(), files
}

// itGzipLayer makes a gzip layer whose compressed size is about size.
func itGzipLayer(seed uint64, size int64, mediaType string) itLayer {
	raw, files := itTar(seed, size)
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		panic(err)
	}
	zw.Write(raw)
	zw.Close()
	return itNewLayer(mediaType, gz.Bytes(), digest.FromBytes(raw), files)
}

// itTarLayer makes an uncompressed tar layer of about size bytes.
func itTarLayer(seed uint64, size int64) itLayer {
	raw, files := itTar(seed, size)
	return itNewLayer(itOCITar, raw, digest.FromBytes(raw), files)
}

// itZstdLayer makes a blob labelled as a zstd layer (zstd magic, random
// bytes): the indexer must skip it by media type without reading it.
func itZstdLayer(seed uint64, size int) itLayer {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	copy(b, []byte{0x28, 0xb5, 0x2f, 0xfd})
	return itNewLayer(itOCIZstd, b, digest.FromBytes(b), nil)
}

func itNewLayer(mediaType string, data []byte, diffID digest.Digest, files map[string][]byte) itLayer {
	return itLayer{
		Desc:   ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))},
		Data:   data,
		DiffID: diffID,
		Files:  files,
	}
}

// itImage is a pushed image manifest.
type itImage struct {
	Desc     ocispec.Descriptor // media type, digest, size (and platform when in an index)
	Manifest []byte
	Config   []byte
	Layers   []itLayer
	Platform ocispec.Platform
}

// itPushImage pushes layers, a config for os/arch and an image manifest
// (Docker schema 2 when docker is set, OCI otherwise) to addr/repo, tagged
// tag (if not empty).
func itPushImage(t testing.TB, addr, repo, tag, platform string, docker bool, layers ...itLayer) itImage {
	t.Helper()
	os, arch, _ := strings.Cut(platform, "/")
	diffIDs := make([]digest.Digest, len(layers))
	for i, l := range layers {
		diffIDs[i] = l.DiffID
	}
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: os, Architecture: arch},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
		Config:   ocispec.ImageConfig{Cmd: []string{"/bin/sh"}},
	}
	cfgBytes, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	m.SchemaVersion = 2
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfgBytes), Size: int64(len(cfgBytes))}
	if docker {
		m.MediaType = itDockerImage
		m.Config.MediaType = itDockerConfig
	}
	registrytest.PushBlob(t, addr, repo, cfgBytes)
	for _, l := range layers {
		registrytest.PushBlob(t, addr, repo, l.Data)
		m.Layers = append(m.Layers, l.Desc)
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: m.MediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	ref := tag
	if ref == "" {
		ref = desc.Digest.String()
	}
	registrytest.PushManifest(t, addr, repo, ref, m.MediaType, b)
	return itImage{Desc: desc, Manifest: b, Config: cfgBytes, Layers: layers, Platform: cfg.Platform}
}

// itPushIndex pushes an image index (a Docker manifest list when docker is
// set) of already pushed images, tagged tag.
func itPushIndex(t testing.TB, addr, repo, tag string, docker bool, images ...itImage) (ocispec.Descriptor, []byte) {
	t.Helper()
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex}
	idx.SchemaVersion = 2
	if docker {
		idx.MediaType = itDockerList
	}
	for _, im := range images {
		p := im.Platform
		d := im.Desc
		d.Platform = &p
		idx.Manifests = append(idx.Manifests, d)
	}
	b, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	registrytest.PushManifest(t, addr, repo, tag, idx.MediaType, b)
	return ocispec.Descriptor{MediaType: idx.MediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}, b
}

// itRegistry is a running registry under test.
type itRegistry struct {
	Name string
	Addr string
	// Referrers: the registry serves the OCI referrers API (otherwise
	// referrers live in the sha256-<hex> fallback tag).
	Referrers bool
}

// itEachRegistry runs f as a subtest against a fresh Debian
// docker-registry (fallback tag) and a fresh go-containerregistry registry
// with the referrers API.
func itEachRegistry(t *testing.T, f func(t *testing.T, reg itRegistry)) {
	t.Run("distribution", func(t *testing.T) {
		f(t, itRegistry{Name: "distribution", Addr: registrytest.StartDistribution(t)})
	})
	t.Run("referrers", func(t *testing.T) {
		f(t, itRegistry{Name: "referrers", Addr: registrytest.StartReferrersRegistry(t), Referrers: true})
	})
}

// itOutput is the outcome of one in-process indexer run.
type itOutput struct {
	Stdout, Stderr string
	Err            error
	Elapsed        time.Duration
}

// itRun runs the indexer in-process with args, bounded by two minutes.
func itRun(t testing.TB, args ...string) itOutput {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return itRunContext(ctx, t, args...)
}

func itRunContext(ctx context.Context, t testing.TB, args ...string) itOutput {
	t.Helper()
	cmd := newRootCommand()
	var stdout, stderr bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	start := time.Now()
	err := cmd.ExecuteContext(ctx)
	out := itOutput{Stdout: stdout.String(), Stderr: stderr.String(), Err: err, Elapsed: time.Since(start)}
	t.Logf("indexer %s (%s): err=%v\n%s%s", strings.Join(args, " "), out.Elapsed.Round(time.Millisecond), err, itClip(out.Stdout), itClip(out.Stderr))
	return out
}

// itClip shortens output for the test log (get-file prints whole files).
func itClip(s string) string {
	const limit = 4 << 10
	if len(s) <= limit {
		return s
	}
	return fmt.Sprintf("%s... [%d more bytes]\n", strings.ToValidUTF8(s[:limit], "?"), len(s)-limit)
}

// itMustRun is itRun that fails the test when the command fails.
func itMustRun(t testing.TB, args ...string) itOutput {
	t.Helper()
	out := itRun(t, args...)
	if out.Err != nil {
		t.Fatalf("indexer %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), out.Err, out.Stdout, out.Stderr)
	}
	return out
}

// itReport runs a create or convert with --json and decodes the report.
func itReport(t testing.TB, args ...string) runReport {
	t.Helper()
	out := itMustRun(t, append(args, "--json")...)
	var rep runReport
	dec := json.NewDecoder(strings.NewReader(out.Stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("--json output does not parse: %v\n%s", err, out.Stdout)
	}
	return rep
}

// itStatuses maps layer digest to status ("indexed", ...) over all
// platforms of a report.
func itStatuses(rep runReport) map[digest.Digest]string {
	m := map[digest.Digest]string{}
	for _, p := range rep.Platforms {
		for _, l := range p.Layers {
			if l != nil {
				m[l.Digest] = l.Status
			}
		}
	}
	return m
}

// itHTTP does one raw request against a registry and returns status,
// headers and body.
func itHTTP(t testing.TB, method, u, accept string) (int, http.Header, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, u, err)
	}
	return resp.StatusCode, resp.Header, b
}

// itManifest fetches a manifest by tag or digest; ok is false on 404.
func itManifest(t testing.TB, addr, repo, ref string) (b []byte, mediaType string, ok bool) {
	t.Helper()
	status, h, b := itHTTP(t, http.MethodGet, "http://"+addr+"/v2/"+repo+"/manifests/"+ref, itManifestTypes)
	switch status {
	case http.StatusOK:
		if d, err := digest.Parse(ref); err == nil && digest.FromBytes(b) != d {
			t.Fatalf("manifest %s/%s@%s: registry sent other bytes (%s)", addr, repo, ref, digest.FromBytes(b))
		}
		return b, h.Get("Content-Type"), true
	case http.StatusNotFound:
		return nil, "", false
	}
	t.Fatalf("GET manifest %s/%s:%s: %d %s", addr, repo, ref, status, b)
	return nil, "", false
}

// itBlob fetches a blob and checks its digest.
func itBlob(t testing.TB, addr, repo string, d digest.Digest) []byte {
	t.Helper()
	status, _, b := itHTTP(t, http.MethodGet, "http://"+addr+"/v2/"+repo+"/blobs/"+d.String(), "")
	if status != http.StatusOK {
		t.Fatalf("GET blob %s/%s@%s: %d", addr, repo, d, status)
	}
	if digest.FromBytes(b) != d {
		t.Fatalf("blob %s: registry sent other bytes", d)
	}
	return b
}

func itBlobExists(t testing.TB, addr, repo string, d digest.Digest) bool {
	t.Helper()
	status, _, _ := itHTTP(t, http.MethodHead, "http://"+addr+"/v2/"+repo+"/blobs/"+d.String(), "")
	return status == http.StatusOK
}

// itReferrers lists the referrers of subject as the registry stores them:
// the referrers API, or the manifests of the sha256-<hex> fallback tag.
func itReferrers(t testing.TB, reg itRegistry, repo string, subject digest.Digest) []ocispec.Descriptor {
	t.Helper()
	var b []byte
	if reg.Referrers {
		var status int
		status, _, b = itHTTP(t, http.MethodGet, "http://"+reg.Addr+"/v2/"+repo+"/referrers/"+subject.String(), ocispec.MediaTypeImageIndex)
		if status != http.StatusOK {
			t.Fatalf("GET referrers of %s: %d %s", subject, status, b)
		}
	} else {
		var ok bool
		b, _, ok = itManifest(t, reg.Addr, repo, subject.Algorithm().String()+"-"+subject.Encoded())
		if !ok {
			return nil
		}
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatalf("referrers of %s: %v\n%s", subject, err, b)
	}
	return idx.Manifests
}

// itSociReferrers returns the SOCI index v1 referrers of subject.
func itSociReferrers(t testing.TB, reg itRegistry, repo string, subject digest.Digest) []ocispec.Descriptor {
	t.Helper()
	var out []ocispec.Descriptor
	for _, d := range itReferrers(t, reg, repo, subject) {
		if d.ArtifactType == index.MediaTypeIndexV1 {
			out = append(out, d)
		}
	}
	return out
}

// itWant describes a layer expected in a SOCI index.
type itWant struct {
	Layer    itLayer
	SpanSize int64
}

// itCheckIndex checks a pushed SOCI index manifest the way SOCI's runtime
// reads it: canonical Go JSON, no top-level artifactType, the `{}` config
// with the version's media type, subject (v1) or none (v2), and one zTOC
// descriptor per indexed layer in image order, whose zTOC (fetched from
// repo) describes that layer and reproduces its files. It returns the
// decoded manifest.
func itCheckIndex(t testing.TB, addr, repo string, indexDigest digest.Digest, v index.Version, subject *ocispec.Descriptor, want []itWant) ocispec.Manifest {
	t.Helper()
	b, mt, ok := itManifest(t, addr, repo, indexDigest.String())
	if !ok {
		t.Fatalf("SOCI index %s is not in %s/%s", indexDigest, addr, repo)
	}
	if mt != ocispec.MediaTypeImageManifest {
		t.Errorf("index %s served as %q", indexDigest, mt)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if re, _ := json.Marshal(m); !bytes.Equal(re, b) {
		t.Errorf("index bytes are not json.Marshal of the decoded ocispec.Manifest:\n got %s\nwant %s", b, re)
	}
	var top map[string]json.RawMessage
	json.Unmarshal(b, &top)
	if _, ok := top["artifactType"]; ok {
		t.Errorf("index has a top-level artifactType: %s", b)
	}
	if m.MediaType != ocispec.MediaTypeImageManifest || m.SchemaVersion != 2 {
		t.Errorf("index media type %q schema %d", m.MediaType, m.SchemaVersion)
	}
	if m.Config.MediaType != v.ArtifactType() || m.Config.Digest != index.EmptyConfigDigest || m.Config.Size != 2 {
		t.Errorf("index config %+v", m.Config)
	}
	if !itBlobExists(t, addr, repo, m.Config.Digest) {
		t.Errorf("index config blob %s missing", m.Config.Digest)
	}
	switch {
	case subject == nil && m.Subject != nil:
		t.Errorf("v2 index has subject %+v", m.Subject)
	case subject != nil && (m.Subject == nil || m.Subject.Digest != subject.Digest || m.Subject.MediaType != subject.MediaType || m.Subject.Size != subject.Size):
		t.Errorf("index subject %+v, want %s %s %d", m.Subject, subject.MediaType, subject.Digest, subject.Size)
	}
	if len(m.Layers) != len(want) {
		t.Fatalf("index has %d zTOCs, want %d: %s", len(m.Layers), len(want), b)
	}
	for i, w := range want {
		d := m.Layers[i]
		ann := d.Annotations
		if d.MediaType != index.MediaTypeZtoc || ann[index.AnnotationImageLayerDigest] != w.Layer.Desc.Digest.String() ||
			ann[index.AnnotationImageLayerMediaType] != w.Layer.Desc.MediaType || ann[index.AnnotationSpanSize] != fmt.Sprint(w.SpanSize) {
			t.Errorf("zTOC descriptor %d = %+v, want layer %s (%s), span size %d", i, d, w.Layer.Desc.Digest, w.Layer.Desc.MediaType, w.SpanSize)
			continue
		}
		z := itFetchZtoc(t, addr, repo, d)
		itCheckZtoc(t, z, w)
	}
	return m
}

func itFetchZtoc(t testing.TB, addr, repo string, d ocispec.Descriptor) *ztoc.Ztoc {
	t.Helper()
	zb := itBlob(t, addr, repo, d.Digest)
	if int64(len(zb)) != d.Size {
		t.Fatalf("zTOC %s: %d bytes, descriptor says %d", d.Digest, len(zb), d.Size)
	}
	z, err := ztoc.Unmarshal(zb)
	if err != nil {
		t.Fatalf("zTOC %s: %v", d.Digest, err)
	}
	return z
}

// itCheckZtoc checks that z describes layer w and reproduces its files.
func itCheckZtoc(t testing.TB, z *ztoc.Ztoc, w itWant) {
	t.Helper()
	l := w.Layer
	if z.CompressedArchiveSize != l.Desc.Size {
		t.Errorf("zTOC of %s: compressed size %d, layer has %d", l.Desc.Digest, z.CompressedArchiveSize, l.Desc.Size)
	}
	wantAlg := ztoc.Gzip
	if l.Desc.MediaType == itOCITar {
		wantAlg = ztoc.Uncompressed
		tz, err := ztoc.UnmarshalTarZinfo(z.Checkpoints)
		if err != nil {
			t.Errorf("zTOC of tar layer %s: checkpoints are no TarZinfo: %v", l.Desc.Digest, err)
		} else if tz.SpanSize != w.SpanSize || tz.Size != l.Desc.Size {
			t.Errorf("zTOC of tar layer %s: TarZinfo %+v, want span size %d size %d", l.Desc.Digest, tz, w.SpanSize, l.Desc.Size)
		}
	}
	if z.Algorithm != wantAlg {
		t.Errorf("zTOC of %s: algorithm %s, want %s", l.Desc.Digest, z.Algorithm, wantAlg)
	}
	if ss, err := z.SpanSize(); err != nil || ss != w.SpanSize {
		t.Errorf("zTOC of %s: span size %d (%v), want %d", l.Desc.Digest, ss, err, w.SpanSize)
	}
	r, err := span.NewLayer(l.Desc.Digest, z, span.LocalBlob(bytes.NewReader(l.Data)), span.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	seen := 0
	for i := range z.Files {
		f := &z.Files[i]
		if f.Type != ztoc.TypeReg {
			continue
		}
		want, ok := l.Files[f.Name]
		if !ok {
			t.Errorf("zTOC of %s lists %s, which the layer does not have", l.Desc.Digest, f.Name)
			continue
		}
		seen++
		var got bytes.Buffer
		if _, err := r.WriteFile(context.Background(), &got, f); err != nil || !bytes.Equal(got.Bytes(), want) {
			t.Errorf("zTOC of %s: %s reads back %d bytes (%v), want %d bytes", l.Desc.Digest, f.Name, got.Len(), err, len(want))
		}
	}
	if seen != len(l.Files) {
		t.Errorf("zTOC of %s lists %d regular files, the layer has %d", l.Desc.Digest, seen, len(l.Files))
	}
}

// itWalk visits every manifest reachable in repo (from its tags and, on a
// referrers registry, from the referrers of every image manifest) and
// fails the test for any manifest that points at a blob or manifest the
// registry does not have. It returns the SOCI index manifests found.
func itWalk(t testing.TB, reg itRegistry, repo string) (soci []digest.Digest) {
	t.Helper()
	status, _, b := itHTTP(t, http.MethodGet, "http://"+reg.Addr+"/v2/"+repo+"/tags/list", "")
	if status == http.StatusNotFound {
		return nil
	}
	if status != http.StatusOK {
		t.Fatalf("tags/list %s: %d %s", repo, status, b)
	}
	var tags struct{ Tags []string }
	if err := json.Unmarshal(b, &tags); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var visit func(ref, from string)
	visit = func(ref, from string) {
		if seen[ref] {
			return
		}
		seen[ref] = true
		b, _, ok := itManifest(t, reg.Addr, repo, ref)
		if !ok {
			t.Errorf("%s points at manifest %s, which %s/%s does not have", from, ref, reg.Addr, repo)
			return
		}
		var m struct {
			MediaType string
			Config    *ocispec.Descriptor
			Layers    []ocispec.Descriptor
			Manifests []ocispec.Descriptor
			Subject   *ocispec.Descriptor
		}
		if err := json.Unmarshal(b, &m); err != nil {
			t.Errorf("manifest %s (from %s) does not parse: %v", ref, from, err)
			return
		}
		for _, d := range m.Manifests {
			visit(d.Digest.String(), ref)
		}
		if m.Config != nil {
			if m.Config.MediaType == index.MediaTypeIndexV1 || m.Config.MediaType == index.MediaTypeIndexV2 {
				soci = append(soci, digest.FromBytes(b))
			}
			for _, d := range append([]ocispec.Descriptor{*m.Config}, m.Layers...) {
				if !itBlobExists(t, reg.Addr, repo, d.Digest) {
					t.Errorf("manifest %s (from %s) points at blob %s, which %s/%s does not have", ref, from, d.Digest, reg.Addr, repo)
				}
			}
			if m.Subject != nil {
				if _, _, ok := itManifest(t, reg.Addr, repo, m.Subject.Digest.String()); !ok {
					t.Errorf("manifest %s has subject %s, which is missing", ref, m.Subject.Digest)
				}
			}
			if reg.Referrers {
				for _, d := range itReferrers(t, reg, repo, digest.FromBytes(b)) {
					visit(d.Digest.String(), "referrers of "+ref)
				}
			}
		}
	}
	for _, tag := range tags.Tags {
		visit(tag, "tag "+tag)
	}
	sort.Slice(soci, func(i, j int) bool { return soci[i] < soci[j] })
	return soci
}

// itProxy is a reverse proxy in front of a registry that records every
// request ("METHOD requestURI -> status"), to count blob uploads.
type itProxy struct {
	Addr string
	mu   sync.Mutex
	reqs []string
	// corrupt maps a blob digest to the offset of the byte flipped in
	// the body of full (non-range) GETs of that blob.
	corrupt map[digest.Digest]int64
}

// Corrupt makes the proxy flip the byte at offset off of every full GET
// of blob d (headers, including Docker-Content-Digest, stay intact).
func (p *itProxy) Corrupt(d digest.Digest, off int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.corrupt[d] = off
}

// itFlipAt flips the byte at offset at of the stream.
type itFlipAt struct {
	io.ReadCloser
	pos, at int64
}

func (f *itFlipAt) Read(b []byte) (int, error) {
	n, err := f.ReadCloser.Read(b)
	if f.at >= f.pos && f.at < f.pos+int64(n) {
		b[f.at-f.pos] ^= 0xff
	}
	f.pos += int64(n)
	return n, err
}

func itStartProxy(t testing.TB, upstream string) *itProxy {
	t.Helper()
	p := &itProxy{corrupt: map[digest.Digest]int64{}}
	target, err := url.Parse("http://" + upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target) // keeps the Host header: Location URLs name the proxy
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if r.Method != http.MethodGet || r.Header.Get("Range") != "" || resp.StatusCode != http.StatusOK {
			return nil
		}
		_, d, ok := strings.Cut(r.URL.Path, "/blobs/")
		if !ok {
			return nil
		}
		p.mu.Lock()
		off, ok := p.corrupt[digest.Digest(d)]
		p.mu.Unlock()
		if ok {
			resp.Body = &itFlipAt{ReadCloser: resp.Body, at: off}
		}
		return nil
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &itStatusWriter{ResponseWriter: w, status: http.StatusOK}
		rp.ServeHTTP(rec, r)
		p.mu.Lock()
		p.reqs = append(p.reqs, fmt.Sprintf("%s %s -> %d", r.Method, r.URL.RequestURI(), rec.status))
		p.mu.Unlock()
	})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	p.Addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// Requests returns the recorded requests.
func (p *itProxy) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.reqs...)
}

// Uploads returns the digests of blobs whose bytes were uploaded through
// the proxy to repo (the digest= of the closing PUT of an upload session;
// PATCH bodies end in the same PUT), in order.
func (p *itProxy) Uploads(repo string) []digest.Digest {
	var out []digest.Digest
	for _, r := range p.Requests() {
		method, rest, _ := strings.Cut(r, " ")
		uri, _, _ := strings.Cut(rest, " ")
		if method != http.MethodPut || !strings.HasPrefix(uri, "/v2/"+repo+"/blobs/uploads/") {
			continue
		}
		u, err := url.Parse(uri)
		if err != nil {
			continue
		}
		out = append(out, digest.Digest(u.Query().Get("digest")))
	}
	return out
}

type itStatusWriter struct {
	http.ResponseWriter
	status int
}

func (w *itStatusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *itStatusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// itDefaultPlatform is the platform create picks in an image index when
// no --platform is given.
func itDefaultPlatform() string { return "linux/" + runtime.GOARCH }
