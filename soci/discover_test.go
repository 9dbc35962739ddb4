package soci_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
)

// indexed is a repository "img" with a two-platform image index "multi"
// that has a SOCI index v1 per platform (Create), its SOCI-enabled copy
// "multi-soci" (Convert), and an image "plain" without any index.
type indexed struct {
	reg      socitest.Registry
	amd, arm socitest.Image
	// v1 and v2 are the Create and Convert results, platform by platform
	// (amd64, arm64).
	v1, v2 *soci.Result
	// rewritten are the image manifests of multi-soci.
	rewritten []ocispec.Descriptor
	plain     socitest.Image
}

func newIndexed(t *testing.T, reg socitest.Registry) *indexed {
	t.Helper()
	shared := socitest.GzipLayer(300, 150<<10, socitest.OCIGzip)
	x := &indexed{reg: reg}
	x.amd, x.arm = socitest.PushMultiPlatform(t, reg.Addr, "img", "multi", false,
		[]socitest.Layer{shared, socitest.TarLayer(301, 200<<10)}, []socitest.Layer{shared, socitest.GzipLayer(302, 180<<10, socitest.OCIGzip)})
	x.plain = socitest.PushImage(t, reg.Addr, "img", "plain", "linux/amd64", false, socitest.GzipLayer(303, 100<<10, socitest.OCIGzip))
	opts := soci.Options{MinLayerSize: 1000, AllPlatforms: true}
	x.v1 = create(t, reg.Addr+"/img:multi", opts)
	x.v2 = convert(t, reg.Addr+"/img:multi", reg.Addr+"/img:multi-soci", opts)
	b, _, _ := socitest.Manifest(t, reg.Addr, "img", "multi-soci")
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		t.Fatal(err)
	}
	x.rewritten = idx.Manifests[:2]
	return x
}

// root fetches the image ref names, as Discover takes it.
func root(t *testing.T, r *registry.Repository, ref string) soci.Image {
	t.Helper()
	b, d, err := r.FetchManifest(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	return soci.Image{Descriptor: d, Bytes: b}
}

// discover collects what Discover yields.
func discover(t *testing.T, r *registry.Repository, img soci.Image, opts soci.DiscoverOptions) []soci.Found {
	t.Helper()
	var out []soci.Found
	for f, err := range soci.Discover(context.Background(), r, img, opts) {
		if err != nil {
			t.Fatalf("discover %s: %v", img.Descriptor.Digest, err)
		}
		out = append(out, f)
	}
	return out
}

// foundKey is what a test compares of a Found.
type foundKey struct {
	Index    digest.Digest
	Version  index.Version
	Manifest digest.Digest
	Platform string
	Source   soci.Source
}

func keys(fs []soci.Found) []foundKey {
	out := make([]foundKey, len(fs))
	for i, f := range fs {
		out[i] = foundKey{Index: f.Index.Digest, Version: f.Version, Manifest: f.Manifest, Source: f.Source}
		if f.Platform != nil {
			out[i].Platform = platforms.Format(*f.Platform)
		}
	}
	return out
}

// TestDiscover: the indexes of an image index (v2 descriptors, then the
// referrers of each image manifest), of an image manifest (explicit
// digest, annotation, referrers), in that order, and lazily: a consumer
// that stops early causes no referrers request.
func TestDiscover(t *testing.T) {
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		x := newIndexed(t, reg)
		r := repo(t, reg.Addr+"/img")
		v1a, v1b := x.v1.Platforms[0].Index.Digest, x.v1.Platforms[1].Index.Digest
		v2a, v2b := x.v2.Platforms[0].Index.Digest, x.v2.Platforms[1].Index.Digest
		ra, rb := x.rewritten[0].Digest, x.rewritten[1].Digest

		check := func(what string, got []soci.Found, want []foundKey) {
			t.Helper()
			if !slices.Equal(keys(got), want) {
				t.Errorf("%s: discovered\n%+v\nwant\n%+v", what, keys(got), want)
			}
		}
		check("image index", discover(t, r, root(t, r, "multi"), soci.DiscoverOptions{}), []foundKey{
			{v1a, index.V1, x.amd.Desc.Digest, "linux/amd64", soci.SourceReferrers},
			{v1b, index.V1, x.arm.Desc.Digest, "linux/arm64", soci.SourceReferrers},
		})
		check("SOCI-enabled image index", discover(t, r, root(t, r, "multi-soci"), soci.DiscoverOptions{}), []foundKey{
			{v2a, index.V2, ra, "linux/amd64", soci.SourceImageIndex},
			{v2b, index.V2, rb, "linux/arm64", soci.SourceImageIndex},
		})
		check("rewritten manifest", discover(t, r, root(t, r, ra.String()), soci.DiscoverOptions{Explicit: v1b}), []foundKey{
			{v1b, 0, ra, "", soci.SourceExplicit},
			{v2a, index.V2, ra, "", soci.SourceAnnotation},
		})
		check("image manifest", discover(t, r, root(t, r, x.amd.Desc.Digest.String()), soci.DiscoverOptions{}), []foundKey{
			{v1a, index.V1, x.amd.Desc.Digest, "", soci.SourceReferrers},
		})
		check("without referrers", discover(t, r, root(t, r, "multi"), soci.DiscoverOptions{SkipReferrers: true}), nil)
		check("v1 only", discover(t, r, root(t, r, ra.String()), soci.DiscoverOptions{SkipV2: true}), nil)
		check("v2 only", discover(t, r, root(t, r, "multi-soci"), soci.DiscoverOptions{SkipReferrers: true}), []foundKey{
			{v2a, index.V2, ra, "linux/amd64", soci.SourceImageIndex},
			{v2b, index.V2, rb, "linux/arm64", soci.SourceImageIndex},
		})
		check("no v2", discover(t, r, root(t, r, x.amd.Desc.Digest.String()), soci.DiscoverOptions{SkipV2: true}), []foundKey{
			{v1a, index.V1, x.amd.Desc.Digest, "", soci.SourceReferrers},
		})
		check("plain", discover(t, r, root(t, r, "plain"), soci.DiscoverOptions{}), nil)

		// Laziness: through a recording proxy, stopping at the annotation
		// asks no referrers; going on does.
		proxy := socitest.StartProxy(t, reg.Addr)
		pr := repo(t, proxy.Addr+"/img")
		img := root(t, pr, ra.String())
		referrersRequests := func() int {
			n := 0
			for _, q := range proxy.Requests() {
				if strings.Contains(q, "/referrers/") || strings.Contains(q, "/manifests/sha256-") {
					n++
				}
			}
			return n
		}
		for f, err := range soci.Discover(context.Background(), pr, img, soci.DiscoverOptions{}) {
			if err != nil || f.Source != soci.SourceAnnotation {
				t.Fatalf("first found %+v, %v; want the annotation", f, err)
			}
			break
		}
		if n := referrersRequests(); n != 0 {
			t.Errorf("a consumer that stopped at the annotation caused %d referrers requests", n)
		}
		discover(t, pr, img, soci.DiscoverOptions{})
		if n := referrersRequests(); n == 0 {
			t.Error("a consumer that went on caused no referrers request")
		}

		// A malformed annotation is an error, named.
		bad := strings.Replace(string(img.Bytes), v2a.String(), "sha256:nothex", 1)
		registrytest.PushManifest(t, reg.Addr, "img", "bad-annotation", ocispec.MediaTypeImageManifest, []byte(bad))
		var errs []error
		for _, err := range soci.Discover(context.Background(), r, root(t, r, "bad-annotation"), soci.DiscoverOptions{}) {
			errs = append(errs, err)
		}
		if len(errs) != 1 || errs[0] == nil || !strings.Contains(errs[0].Error(), index.AnnotationIndexDigest) {
			t.Errorf("malformed annotation: %v, want one error naming %s", errs, index.AnnotationIndexDigest)
		}
	})
}

// TestFindIndex: the first index that loads and whose subject is the
// image wins; an image without index gives ErrNoIndex, one whose indexes
// are all unusable an error saying why.
func TestFindIndex(t *testing.T) {
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		x := newIndexed(t, reg)
		r := repo(t, reg.Addr+"/img")
		ctx := context.Background()
		v1a, v1b := x.v1.Platforms[0].Index.Digest, x.v1.Platforms[1].Index.Digest
		v2a := x.v2.Platforms[0].Index.Digest
		ra := x.rewritten[0].Digest
		missing := digest.FromString("no such index")

		for _, c := range []struct {
			what     string
			image    string
			explicit digest.Digest
			want     digest.Digest
			source   soci.Source
		}{
			{"explicit", ra.String(), v2a, v2a, soci.SourceExplicit},
			{"explicit for another manifest, then the annotation", ra.String(), v1b, v2a, soci.SourceAnnotation},
			{"missing explicit, then the referrer", x.amd.Desc.Digest.String(), missing, v1a, soci.SourceReferrers},
			{"referrer", x.arm.Desc.Digest.String(), "", v1b, soci.SourceReferrers},
		} {
			f, ix, err := soci.FindIndex(ctx, r, root(t, r, c.image), soci.DiscoverOptions{Explicit: c.explicit})
			if err != nil || f.Index.Digest != c.want || f.Source != c.source || ix == nil || len(ix.Layers) != 2 {
				t.Errorf("%s: found %+v (%v), want %s from source %d", c.what, f, err, c.want, c.source)
			}
		}
		if _, _, err := soci.FindIndex(ctx, r, root(t, r, "plain"), soci.DiscoverOptions{}); !errors.Is(err, soci.ErrNoIndex) {
			t.Errorf("image without index: %v, want ErrNoIndex", err)
		}
		_, _, err := soci.FindIndex(ctx, r, root(t, r, "plain"), soci.DiscoverOptions{Explicit: v1a})
		if err == nil || errors.Is(err, soci.ErrNoIndex) || !strings.Contains(err.Error(), "no usable SOCI index") || !strings.Contains(err.Error(), "is for manifest") {
			t.Errorf("only an index of another manifest: %v", err)
		}
	})
}

// TestListAndInfo: List gives the v1 indexes of an image index and the v2
// ones of its SOCI-enabled copy with their platforms, manifests and zTOC
// totals; Info gives an index's exact bytes, from its digest or its only
// image, and says when an image has none or several.
func TestListAndInfo(t *testing.T) {
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		x := newIndexed(t, reg)
		ctx := context.Background()
		at := func(ref string) *registry.Repository { return repo(t, reg.Addr+"/img"+ref) }
		entry := func(res *soci.Result, i int, manifest digest.Digest) listed {
			p := res.Platforms[i]
			e := listed{Index: p.Index.Digest, Manifest: manifest, Platform: platforms.Format(p.Platform), Descriptors: 2}
			for _, l := range p.Layers {
				e.Size += l.Ztoc.Size
				for _, d := range []ocispec.Descriptor{l.Pack.Head, l.Pack.Windows} {
					if d.Digest != "" {
						e.Packs++
						e.PackSize += d.Size
					}
				}
			}
			if e.Packs < 2 {
				t.Errorf("platform %d: %d pack blobs, want a head per zTOC", i, e.Packs)
			}
			return e
		}
		list := func(ref string) []listed {
			t.Helper()
			got, err := soci.List(ctx, at(ref))
			if err != nil {
				t.Fatalf("list %s: %v", ref, err)
			}
			out := make([]listed, len(got))
			for i, s := range got {
				out[i] = listed{Index: s.Index.Digest, Manifest: s.Manifest, Descriptors: s.Descriptors, Size: s.Size, Packs: s.Packs, PackSize: s.PackSize}
				if s.Platform != nil {
					out[i].Platform = platforms.Format(*s.Platform)
				}
			}
			return out
		}
		if got, want := list(":multi"), []listed{entry(x.v1, 0, x.amd.Desc.Digest), entry(x.v1, 1, x.arm.Desc.Digest)}; !slices.Equal(got, want) {
			t.Errorf("list multi: %+v, want %+v", got, want)
		}
		if got, want := list(":multi-soci"), []listed{entry(x.v2, 0, x.rewritten[0].Digest), entry(x.v2, 1, x.rewritten[1].Digest)}; !slices.Equal(got, want) {
			t.Errorf("list multi-soci: %+v, want %+v", got, want)
		}
		if got := list("@" + x.rewritten[0].Digest.String()); len(got) != 0 {
			t.Errorf("list of a rewritten manifest (no v1 referrer): %+v", got)
		}

		v1a := x.v1.Platforms[0].Index.Digest
		v1aBytes, _, _ := socitest.Manifest(t, reg.Addr, "img", v1a.String())
		for _, ref := range []string{"@" + x.amd.Desc.Digest.String(), "@" + v1a.String()} {
			if b, err := soci.Info(ctx, at(ref)); err != nil || string(b) != string(v1aBytes) {
				t.Errorf("info %s: %v\n%s\nwant\n%s", ref, err, b, v1aBytes)
			}
		}
		v2b := x.v2.Platforms[1].Index.Digest
		if b, err := soci.Info(ctx, at("@"+v2b.String())); err != nil || digest.FromBytes(b) != v2b {
			t.Errorf("info of a v2 index: %v", err)
		}
		var ambiguous *soci.AmbiguousError
		if _, err := soci.Info(ctx, at(":multi")); !errors.As(err, &ambiguous) || ambiguous.Indexes != 2 {
			t.Errorf("info of a two-index image: %v", err)
		}
		for _, ref := range []string{":plain", "@" + x.rewritten[0].Digest.String()} {
			if _, err := soci.Info(ctx, at(ref)); !errors.Is(err, soci.ErrNoIndex) {
				t.Errorf("info %s (no index): %v, want ErrNoIndex", ref, err)
			}
		}
		if _, err := soci.Info(ctx, at("@sha256:"+strings.Repeat("0", 64))); !errors.Is(err, registry.ErrNotFound) {
			t.Errorf("info of a missing manifest: %v", err)
		}
	})
}

// listed is what TestListAndInfo compares of a listed index.
type listed struct {
	Index       digest.Digest
	Manifest    digest.Digest
	Platform    string
	Descriptors int
	Size        int64
	Packs       int
	PackSize    int64
}
