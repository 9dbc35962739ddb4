package main

import (
	"encoding/json"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestCreateDockerSchema2 indexes a Docker v2 schema 2 image: the SOCI
// index's subject keeps the Docker manifest media type and the zTOC
// descriptors the Docker layer media type.
func TestCreateDockerSchema2(t *testing.T) {
	l0 := itGzipLayer(70, 150<<10, itDockerGzip)
	l1 := itGzipLayer(71, 250<<10, itDockerGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		img := itPushImage(t, reg.Addr, "docker", "v1", "linux/amd64", true, l0, l1)
		rep := itReport(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "1000", reg.Addr+"/docker:v1")
		if len(rep.Platforms) != 1 || rep.Platforms[0].Index == "" {
			t.Fatalf("report %+v", rep)
		}
		subject := img.Desc
		if subject.MediaType != itDockerImage {
			t.Fatalf("test image is %s", subject.MediaType)
		}
		itCheckIndex(t, reg.Addr, "docker", rep.Platforms[0].Index, index.V1, &subject, []itWant{{l0, ztoc.DefaultSpanSize}, {l1, ztoc.DefaultSpanSize}})
		if refs := itSociReferrers(t, reg, "docker", img.Desc.Digest); len(refs) != 1 || refs[0].Digest != rep.Platforms[0].Index {
			t.Errorf("referrers %+v", refs)
		}
	})
}

// itCheckConverted checks a SOCI-enabled image index pushed by convert to
// addr/repo:tag for the source images, all of which must have been indexed
// with the given layers. It returns the image index.
func itCheckConverted(t *testing.T, addr, repo, tag string, src []itImage, indexed [][]itWant) ocispec.Index {
	t.Helper()
	b, mt, ok := itManifest(t, addr, repo, tag)
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
		mb, mmt, ok := itManifest(t, addr, repo, md.Digest.String())
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
			if !itBlobExists(t, addr, repo, d.Digest) {
				t.Errorf("blob %s of the rewritten manifest is not in %s", d.Digest, repo)
			}
		}
		// The source manifest is in DST too.
		if _, _, ok := itManifest(t, addr, repo, im.Desc.Digest.String()); !ok {
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
		itCheckIndex(t, addr, repo, vd.Digest, index.V2, nil, indexed[i])
	}
	return idx
}

// TestConvert converts a Docker manifest list and a single Docker
// manifest into SOCI-enabled images in another repository of the same
// registry, through a proxy that records every request: the layers must
// be mounted, and only zTOCs and the `{}` config uploaded.
func TestConvert(t *testing.T) {
	shared := itGzipLayer(80, 200<<10, itDockerGzip)
	amd := itGzipLayer(81, 300<<10, itDockerGzip)
	arm := itGzipLayer(82, 260<<10, itDockerGzip)
	small := itGzipLayer(83, 20<<10, itDockerGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		a := itPushImage(t, reg.Addr, "src", "", "linux/amd64", true, shared, amd, small)
		b := itPushImage(t, reg.Addr, "src", "", "linux/arm64", true, shared, arm)
		itPushIndex(t, reg.Addr, "src", "list", true, a, b)
		single := itPushImage(t, reg.Addr, "src", "single", "linux/amd64", true, amd)

		proxy := itStartProxy(t, reg.Addr)
		host := proxy.Addr
		rep := itReport(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000", "--all-platforms",
			host+"/src:list", host+"/dst:list-soci")
		if len(rep.Platforms) != 2 || rep.Target != host+"/dst:list-soci" {
			t.Fatalf("report %+v", rep)
		}
		if st := itStatuses(rep); st[small.Desc.Digest] != "skipped" || st[amd.Desc.Digest] != "indexed" {
			t.Errorf("statuses %v", st)
		}
		want := [][]itWant{
			{{shared, ztoc.DefaultSpanSize}, {amd, ztoc.DefaultSpanSize}},
			{{shared, ztoc.DefaultSpanSize}, {arm, ztoc.DefaultSpanSize}},
		}
		idx := itCheckConverted(t, reg.Addr, "dst", "list-soci", []itImage{a, b}, want)
		for i, p := range rep.Platforms {
			if p.Index != idx.Manifests[2+i].Digest {
				t.Errorf("report platform %s index %s, image index has %s", p.Platform, p.Index, idx.Manifests[2+i].Digest)
			}
		}
		itCheckUploads(t, proxy, "dst", rep, a, b)

		// A single Docker manifest: wrapped into an index of its own.
		rep = itReport(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000",
			host+"/src:single", host+"/dst2:single-soci")
		itCheckConverted(t, reg.Addr, "dst2", "single-soci", []itImage{single}, [][]itWant{{{amd, ztoc.DefaultSpanSize}}})
		itCheckUploads(t, proxy, "dst2", rep, single)

		// The human output ends with the image line.
		out := itMustRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000",
			host+"/src:single", host+"/dst2:single-soci")
		if !strings.Contains(out.Stdout, "reused   "+short(amd.Desc.Digest)) || !strings.Contains(out.Stdout, "image    sha256:") ||
			!strings.Contains(out.Stdout, "SOCI index v2 for linux/amd64") {
			t.Errorf("convert re-run output:\n%s", out.Stdout)
		}

		// Converting the converted image again changes nothing: same
		// zTOCs (reused), same indexes, same rewritten manifests, and the
		// old v2 descriptors replaced rather than duplicated.
		first, _, _ := itManifest(t, reg.Addr, "dst", "list-soci")
		again := itReport(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000", "--all-platforms",
			host+"/dst:list-soci", host+"/dst:list-soci-again")
		for d, st := range itStatuses(again) {
			if st == "indexed" {
				t.Errorf("converting the converted image rebuilt layer %s", short(d))
			}
		}
		if b, _, _ := itManifest(t, reg.Addr, "dst", "list-soci-again"); string(b) != string(first) {
			t.Errorf("converting the converted image gave\n%s\nwant\n%s", b, first)
		}
		// -q prints digests only, one per line.
		out = itMustRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000", "-q",
			host+"/src:single", host+"/dst2:single-soci")
		for _, line := range strings.Split(strings.TrimSuffix(out.Stdout, "\n"), "\n") {
			if _, err := digest.Parse(line); err != nil {
				t.Errorf("convert -q printed %q", line)
			}
		}
		for _, repo := range []string{"src", "dst", "dst2"} {
			itWalk(t, reg, repo)
		}
	})
}

// TestConvertAcrossRegistries converts an image from docker-registry into
// the referrers registry: blobs are copied, and the result is complete.
func TestConvertAcrossRegistries(t *testing.T) {
	l0 := itGzipLayer(95, 200<<10, itOCIGzip)
	l1 := itTarLayer(96, 150<<10)
	src := itRegistry{Name: "distribution", Addr: registrytest.StartDistribution(t)}
	dst := itRegistry{Name: "referrers", Addr: registrytest.StartReferrersRegistry(t), Referrers: true}
	img := itPushImage(t, src.Addr, "app", "v1", "linux/arm64", false, l0, l1)
	itReport(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "1000", src.Addr+"/app:v1", dst.Addr+"/mirror/app:v1-soci")
	itCheckConverted(t, dst.Addr, "mirror/app", "v1-soci", []itImage{img}, [][]itWant{{{l0, ztoc.DefaultSpanSize}, {l1, ztoc.DefaultSpanSize}}})
	if got := itWalk(t, dst, "mirror/app"); len(got) != 1 {
		t.Errorf("SOCI indexes in DST: %v", got)
	}
	for _, l := range []itLayer{l0, l1} {
		if b := itBlob(t, dst.Addr, "mirror/app", l.Desc.Digest); len(b) != len(l.Data) {
			t.Errorf("layer %s copied as %d bytes", l.Desc.Digest, len(b))
		}
	}
}

// itCheckUploads fails the test if any blob other than the zTOCs of rep
// and the `{}` config was uploaded to repo through the proxy.
func itCheckUploads(t *testing.T, proxy *itProxy, repo string, rep runReport, src ...itImage) {
	t.Helper()
	allowed := map[digest.Digest]bool{index.EmptyConfigDigest: true}
	for _, p := range rep.Platforms {
		for _, l := range p.Layers {
			if l.Ztoc != "" {
				allowed[l.Ztoc] = true
			}
		}
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

// TestConvertErrors: DST without a tag, and a source whose platforms all
// fail (nothing indexable) must fail without pushing an image.
func TestConvertErrors(t *testing.T) {
	addr := startReferrers(t)
	small := itGzipLayer(90, 10<<10, itOCIGzip)
	itPushImage(t, addr, "src", "v1", "linux/amd64", false, small)
	if out := itRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), addr+"/src:v1", addr+"/dst"); out.Err == nil || !strings.Contains(out.Err.Error(), "tag") {
		t.Errorf("DST without tag: %v", out.Err)
	}
	out := itRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), addr+"/src:v1", addr+"/dst:soci")
	if out.Err == nil {
		t.Errorf("convert of an image with no indexable layer succeeded:\n%s", out.Stdout)
	}
	if _, _, ok := itManifest(t, addr, "dst", "soci"); ok {
		t.Error("convert pushed an image though nothing was indexed")
	}
}

// TestConvertReusesAcrossImages: converting a second image that shares a
// base layer with an image already converted into DST reuses the base
// layer's zTOC from DST, without a local cache.
func TestConvertReusesAcrossImages(t *testing.T) {
	base := itGzipLayer(190, 200<<10, itOCIGzip)
	a1 := itGzipLayer(191, 100<<10, itOCIGzip)
	b1 := itGzipLayer(192, 100<<10, itOCIGzip)
	itEachRegistry(t, func(t *testing.T, reg itRegistry) {
		a := itPushImage(t, reg.Addr, "src", "a", "linux/amd64", false, base, a1)
		b := itPushImage(t, reg.Addr, "src", "b", "linux/amd64", false, base, b1)
		flags := []string{"convert", "--plain-http", "--no-cache", "--min-layer-size", "1000"}
		itReport(t, append(flags, reg.Addr+"/src:a", reg.Addr+"/dst:a-soci")...)
		rep := itReport(t, append(flags, reg.Addr+"/src:b", reg.Addr+"/dst:b-soci")...)
		if st := itStatuses(rep); st[base.Desc.Digest] != "reused" || st[b1.Desc.Digest] != "indexed" {
			t.Errorf("second conversion: base %s, own layer %s; want reused and indexed", st[base.Desc.Digest], st[b1.Desc.Digest])
		}
		itCheckConverted(t, reg.Addr, "dst", "b-soci", []itImage{b}, [][]itWant{{{base, ztoc.DefaultSpanSize}, {b1, ztoc.DefaultSpanSize}}})
		itCheckConverted(t, reg.Addr, "dst", "a-soci", []itImage{a}, [][]itWant{{{base, ztoc.DefaultSpanSize}, {a1, ztoc.DefaultSpanSize}}})
	})
}
