package socitest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// httpGet does one raw request against a registry and returns status,
// headers and body.
func httpGet(t testing.TB, method, u, accept string) (int, http.Header, []byte) {
	t.Helper()
	var h http.Header
	if accept != "" {
		h = http.Header{"Accept": {accept}}
	}
	r := registrytest.Do(t, method, u, h, nil)
	return r.StatusCode, r.Header, r.Body
}

// Manifest fetches a manifest by tag or digest; ok is false on 404.
func Manifest(t testing.TB, addr, repo, ref string) (b []byte, mediaType string, ok bool) {
	t.Helper()
	status, h, b := httpGet(t, http.MethodGet, "http://"+addr+"/v2/"+repo+"/manifests/"+ref, manifestTypes)
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

// Blob fetches a blob and checks its digest.
func Blob(t testing.TB, addr, repo string, d digest.Digest) []byte {
	t.Helper()
	status, _, b := httpGet(t, http.MethodGet, "http://"+addr+"/v2/"+repo+"/blobs/"+d.String(), "")
	if status != http.StatusOK {
		t.Fatalf("GET blob %s/%s@%s: %d", addr, repo, d, status)
	}
	if digest.FromBytes(b) != d {
		t.Fatalf("blob %s: registry sent other bytes", d)
	}
	return b
}

// BlobExists reports whether the registry has blob d in repo (HEAD).
func BlobExists(t testing.TB, addr, repo string, d digest.Digest) bool {
	t.Helper()
	status, _, _ := httpGet(t, http.MethodHead, "http://"+addr+"/v2/"+repo+"/blobs/"+d.String(), "")
	return status == http.StatusOK
}

// Referrers lists the referrers of subject as the registry stores them:
// the referrers API, or the manifests of the sha256-<hex> fallback tag.
func Referrers(t testing.TB, reg Registry, repo string, subject digest.Digest) []ocispec.Descriptor {
	t.Helper()
	var b []byte
	if reg.Referrers {
		var status int
		status, _, b = httpGet(t, http.MethodGet, "http://"+reg.Addr+"/v2/"+repo+"/referrers/"+subject.String(), ocispec.MediaTypeImageIndex)
		if status != http.StatusOK {
			t.Fatalf("GET referrers of %s: %d %s", subject, status, b)
		}
	} else {
		var ok bool
		b, _, ok = Manifest(t, reg.Addr, repo, subject.Algorithm().String()+"-"+subject.Encoded())
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

// SociReferrers returns the SOCI index v1 referrers of subject.
func SociReferrers(t testing.TB, reg Registry, repo string, subject digest.Digest) []ocispec.Descriptor {
	t.Helper()
	var out []ocispec.Descriptor
	for _, d := range Referrers(t, reg, repo, subject) {
		if d.ArtifactType == index.MediaTypeIndexV1 {
			out = append(out, d)
		}
	}
	return out
}

// Want describes a layer expected in a SOCI index.
type Want struct {
	Layer    Layer
	SpanSize int64
}

// CheckIndex checks a pushed SOCI index manifest the way SOCI's runtime
// reads it (CheckSOCIReadable): canonical Go JSON, no top-level
// artifactType, the `{}` config with the version's media type, subject
// (v1) or none (v2), and one zTOC descriptor per indexed layer in image
// order, whose zTOC (fetched from repo) describes that layer and
// reproduces its files; then prefetch artifacts, if any (not checked
// here: CheckPrefetchBlob); then spanpull's packs, none or one per zTOC, each
// restoring its zTOC. It returns the decoded manifest.
func CheckIndex(t testing.TB, addr, repo string, indexDigest digest.Digest, v index.Version, subject *ocispec.Descriptor, want []Want) ocispec.Manifest {
	t.Helper()
	b, mt, ok := Manifest(t, addr, repo, indexDigest.String())
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
	if !BlobExists(t, addr, repo, m.Config.Digest) {
		t.Errorf("index config blob %s missing", m.Config.Digest)
	}
	switch {
	case subject == nil && m.Subject != nil:
		t.Errorf("v2 index has subject %+v", m.Subject)
	case subject != nil && (m.Subject == nil || m.Subject.Digest != subject.Digest || m.Subject.MediaType != subject.MediaType || m.Subject.Size != subject.Size):
		t.Errorf("index subject %+v, want %s %s %d", m.Subject, subject.MediaType, subject.Digest, subject.Size)
	}
	var layers []digest.Digest
	for _, w := range want {
		layers = append(layers, w.Layer.Desc.Digest)
	}
	CheckSOCIReadable(t, b, layers)
	if n := len(m.Layers) - len(Packs(m)) - len(PrefetchDescriptors(m)); n != len(want) {
		t.Fatalf("index has %d zTOCs, want %d: %s", n, len(want), b)
	}
	for i, w := range want {
		d := m.Layers[i]
		ann := d.Annotations
		if d.MediaType != index.MediaTypeZtoc || ann[index.AnnotationImageLayerDigest] != w.Layer.Desc.Digest.String() ||
			ann[index.AnnotationImageLayerMediaType] != w.Layer.Desc.MediaType || ann[index.AnnotationSpanSize] != fmt.Sprint(w.SpanSize) {
			t.Errorf("zTOC descriptor %d = %+v, want layer %s (%s), span size %d", i, d, w.Layer.Desc.Digest, w.Layer.Desc.MediaType, w.SpanSize)
			continue
		}
		z := FetchZtoc(t, addr, repo, d)
		CheckZtoc(t, z, w)
	}
	checkPacks(t, addr, repo, b, want)
	return m
}

func FetchZtoc(t testing.TB, addr, repo string, d ocispec.Descriptor) *ztoc.Ztoc {
	t.Helper()
	zb := Blob(t, addr, repo, d.Digest)
	if int64(len(zb)) != d.Size {
		t.Fatalf("zTOC %s: %d bytes, descriptor says %d", d.Digest, len(zb), d.Size)
	}
	z, err := ztoc.Unmarshal(zb)
	if err != nil {
		t.Fatalf("zTOC %s: %v", d.Digest, err)
	}
	return z
}

// CheckZtoc checks that z describes layer w and reproduces its files.
func CheckZtoc(t testing.TB, z *ztoc.Ztoc, w Want) {
	t.Helper()
	l := w.Layer
	if z.CompressedArchiveSize != l.Desc.Size {
		t.Errorf("zTOC of %s: compressed size %d, layer has %d", l.Desc.Digest, z.CompressedArchiveSize, l.Desc.Size)
	}
	wantAlg := ztoc.Gzip
	if l.Desc.MediaType == OCITar {
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

// Walk visits every manifest reachable in repo (from its tags and, on a
// referrers registry, from the referrers of every image manifest) and
// fails the test for any manifest that points at a blob or manifest the
// registry does not have. It returns the SOCI index manifests found.
func Walk(t testing.TB, reg Registry, repo string) (soci []digest.Digest) {
	t.Helper()
	status, _, b := httpGet(t, http.MethodGet, "http://"+reg.Addr+"/v2/"+repo+"/tags/list", "")
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
		b, _, ok := Manifest(t, reg.Addr, repo, ref)
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
				if !BlobExists(t, reg.Addr, repo, d.Digest) {
					t.Errorf("manifest %s (from %s) points at blob %s, which %s/%s does not have", ref, from, d.Digest, reg.Addr, repo)
				}
			}
			if m.Subject != nil {
				if _, _, ok := Manifest(t, reg.Addr, repo, m.Subject.Digest.String()); !ok {
					t.Errorf("manifest %s has subject %s, which is missing", ref, m.Subject.Digest)
				}
			}
			if reg.Referrers {
				for _, d := range Referrers(t, reg, repo, digest.FromBytes(b)) {
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

// CheckConverted checks a SOCI-enabled image index pushed by Convert to
// addr/repo:tag for the source images, all of which must have been indexed
// with the given layers. It returns the image index.
func CheckConverted(t testing.TB, addr, repo, tag string, src []Image, indexed [][]Want) ocispec.Index {
	t.Helper()
	b, mt, ok := Manifest(t, addr, repo, tag)
	if !ok {
		t.Fatalf("%s/%s:%s was not pushed", addr, repo, tag)
	}
	if mt != ocispec.MediaTypeImageIndex {
		t.Errorf("converted image served as %q", mt)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	if idx.MediaType != ocispec.MediaTypeImageIndex || idx.SchemaVersion != 2 {
		t.Errorf("converted image index: media type %q schema %d", idx.MediaType, idx.SchemaVersion)
	}
	if len(idx.Manifests) != 2*len(src) {
		t.Fatalf("converted image index has %d manifests, want %d: %s", len(idx.Manifests), 2*len(src), b)
	}
	for i, im := range src {
		md := idx.Manifests[i]
		vd := idx.Manifests[len(src)+i]
		if md.MediaType != ocispec.MediaTypeImageManifest || md.ArtifactType != "" || md.Platform == nil ||
			md.Platform.OS != im.Platform.OS || md.Platform.Architecture != im.Platform.Architecture {
			t.Errorf("image descriptor %d: %+v", i, md)
		}
		mb, mmt, ok := Manifest(t, addr, repo, md.Digest.String())
		if !ok {
			t.Fatalf("rewritten manifest %s missing", md.Digest)
		}
		if mmt != ocispec.MediaTypeImageManifest || int64(len(mb)) != md.Size {
			t.Errorf("rewritten manifest %s: %q, %d bytes (descriptor %d)", md.Digest, mmt, len(mb), md.Size)
		}
		var m, orig ocispec.Manifest
		if err := json.Unmarshal(mb, &m); err != nil {
			t.Fatal(err)
		}
		json.Unmarshal(im.Manifest, &orig)
		if m.MediaType != ocispec.MediaTypeImageManifest || m.Config.MediaType != ocispec.MediaTypeImageConfig ||
			m.Config.Digest != orig.Config.Digest || m.Config.Size != orig.Config.Size {
			t.Errorf("rewritten manifest %s: media type %q, config %+v", md.Digest, m.MediaType, m.Config)
		}
		if !slices.EqualFunc(m.Layers, orig.Layers, func(a, b ocispec.Descriptor) bool {
			return a.MediaType == b.MediaType && a.Digest == b.Digest && a.Size == b.Size && len(a.Annotations) == 0
		}) {
			t.Errorf("rewritten manifest layers %+v, source %+v", m.Layers, orig.Layers)
		}
		for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
			if !BlobExists(t, addr, repo, d.Digest) {
				t.Errorf("blob %s of the rewritten manifest is not in %s", d.Digest, repo)
			}
		}
		// The source manifest is in DST too.
		if _, _, ok := Manifest(t, addr, repo, im.Desc.Digest.String()); !ok {
			t.Errorf("source manifest %s not copied to %s", im.Desc.Digest, repo)
		}
		v2 := digest.Digest(m.Annotations[index.AnnotationIndexDigest])
		if v2 != vd.Digest || md.Annotations[index.AnnotationIndexDigest] != vd.Digest.String() {
			t.Errorf("rewritten manifest names index %q (descriptor %q), index descriptor is %s", v2, md.Annotations[index.AnnotationIndexDigest], vd.Digest)
		}
		if vd.MediaType != ocispec.MediaTypeImageManifest || vd.ArtifactType != index.MediaTypeIndexV2 || vd.Platform == nil ||
			vd.Platform.OS != md.Platform.OS || vd.Platform.Architecture != md.Platform.Architecture || vd.Annotations[index.AnnotationImageManifestDigest] != md.Digest.String() {
			t.Errorf("index descriptor %d: %+v (image manifest %s)", i, vd, md.Digest)
		}
		CheckIndex(t, addr, repo, vd.Digest, index.V2, nil, indexed[i])
	}
	return idx
}

// CheckUploads fails the test if any blob other than the given artifacts
// (zTOCs and packs) and the `{}` config was uploaded to repo through the
// proxy, or if a blob of the src images reached repo other than by a
// cross-repository mount (unless it was there already).
func CheckUploads(t testing.TB, proxy *Proxy, repo string, artifacts []digest.Digest, src ...Image) {
	t.Helper()
	allowed := map[digest.Digest]bool{index.EmptyConfigDigest: true}
	for _, z := range artifacts {
		allowed[z] = true
	}
	var blobs []digest.Digest
	for _, im := range src {
		var m ocispec.Manifest
		json.Unmarshal(im.Manifest, &m)
		for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
			blobs = append(blobs, d.Digest)
		}
	}
	ups := proxy.Uploads(repo)
	for _, d := range ups {
		if !allowed[d] {
			t.Errorf("blob %s was uploaded to %s through the indexer; only zTOCs and the {} config may be", d, repo)
		}
	}
	// Every source blob reached DST by a mount, or was already there (the
	// referrers registry keeps blobs per registry, not per repository).
	mounts := 0
	for _, d := range blobs {
		how := ""
		for _, r := range proxy.Requests() {
			switch {
			case strings.HasPrefix(r, "POST /v2/"+repo+"/blobs/uploads/?") && (strings.Contains(r, "mount="+d.String()) || strings.Contains(r, "mount="+url.QueryEscape(d.String()))) && strings.HasSuffix(r, "-> 201"):
				how = "mounted"
				mounts++
			case r == "HEAD /v2/"+repo+"/blobs/"+d.String()+" -> 200" && how == "":
				how = "present"
			}
		}
		if how == "" {
			t.Errorf("source blob %s was neither mounted into %s nor there already; requests:\n%s", d, repo, strings.Join(proxy.Requests(), "\n"))
		}
	}
	t.Logf("%s: %d uploads, %d mount requests", repo, len(ups), mounts)
}
