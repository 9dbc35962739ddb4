//go:build linux

package testenv

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/ztoc"
)

// Forged SOCI indexes. A SOCI index v1 is a referrer: anyone who can push
// to a repository can attach one to an image without changing its digest,
// and a v2 index is whatever the image's publisher put there. The trust
// tests publish indexes whose zTOC was edited, the way such a party
// would, to show that a lazy layer never serves what the index claims
// unless the layer agrees.

// ForgeZtoc returns a copy of z changed by edit, and its encoding. The copy
// is decoded from z's encoding, so edit may change anything (TOC entries,
// span digests, the checkpoint blob) without touching z; z's chunk table,
// which the encoding leaves out, is kept for a pack.
func ForgeZtoc(t testing.TB, z *ztoc.Ztoc, edit func(*ztoc.Ztoc)) (*ztoc.Ztoc, []byte) {
	t.Helper()
	b, err := ztoc.Marshal(z)
	if err != nil {
		t.Fatal(err)
	}
	f, err := ztoc.Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	f.Chunks = z.Chunks
	edit(f)
	fb, err := ztoc.Marshal(f)
	if err != nil {
		t.Fatalf("encode the forged zTOC: %v", err)
	}
	return f, fb
}

// SOCIIndex is a SOCI index of one image layer, to publish.
type SOCIIndex struct {
	// Layer is the image layer the zTOC claims to index.
	Layer ocispec.Descriptor
	// Ztoc is the zTOC, Encoded its encoding (as ForgeZtoc returns them).
	Ztoc    *ztoc.Ztoc
	Encoded []byte
	// Pack also publishes ztoc.MarshalPack(Ztoc) as the layer's pack, which
	// a runtime mounts the layer from instead of the zTOC.
	Pack bool
}

// publishTimeout bounds the pushes of one index.
const publishTimeout = 2 * time.Minute

// PublishV1 pushes ix's zTOC (and pack) and a SOCI index v1 of them whose
// subject is manifest, an image manifest already in repo (on the registry
// at addr): the index becomes one of the image's referrers. It returns
// the index's descriptor.
func PublishV1(t testing.TB, addr, repo string, manifest ocispec.Descriptor, ix SOCIIndex) ocispec.Descriptor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
	defer cancel()
	r := repository(t, addr, repo)
	subject := ocispec.Descriptor{MediaType: manifest.MediaType, Digest: manifest.Digest, Size: manifest.Size}
	return publishIndex(ctx, t, r, index.BuildOptions{Version: index.V1, Subject: &subject}, ix)
}

// PublishV2 publishes a SOCI-enabled copy of the image manifest mb (in
// repo, on the registry at addr, for platform linux/amd64) as repo:tag:
// ix's zTOC (and pack), a SOCI index v2 of them, the manifest rewritten
// to name that index, and an image index listing both, as "indexer
// convert" does. It returns the copy's reference and the index's
// descriptor.
func PublishV2(t testing.TB, addr, repo, tag string, mb []byte, ix SOCIIndex) (string, ocispec.Descriptor) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
	defer cancel()
	r := repository(t, addr, repo)
	idx := publishIndex(ctx, t, r, index.BuildOptions{Version: index.V2}, ix)
	rb, rd, err := index.RewriteManifest(mb, idx.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, rd, rb, ""); err != nil {
		t.Fatal(err)
	}
	platform := ocispec.Platform{OS: "linux", Architecture: "amd64"}
	ib, id, err := index.WrapManifest(platform, index.Converted{Source: digest.FromBytes(mb), Manifest: rd, Index: &idx})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, id, ib, tag); err != nil {
		t.Fatal(err)
	}
	return addr + "/" + repo + ":" + tag, idx
}

// PushManifestCopy pushes m, an image manifest of repo, as repo:tag with
// annotation dev.spanpull.test.copy = tag added, so that the copy's
// digest differs from m's while its config and layers are m's. It
// returns the copy's bytes and descriptor.
func PushManifestCopy(t testing.TB, addr, repo, tag string, m ocispec.Manifest) ([]byte, ocispec.Descriptor) {
	t.Helper()
	ann := map[string]string{"dev.spanpull.test.copy": tag}
	for k, v := range m.Annotations {
		ann[k] = v
	}
	m.Annotations = ann
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	d := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(b), Size: int64(len(b))}
	ctx, cancel := context.WithTimeout(context.Background(), publishTimeout)
	defer cancel()
	if err := repository(t, addr, repo).PushManifest(ctx, d, b, tag); err != nil {
		t.Fatal(err)
	}
	return b, d
}

// repository is a plain-HTTP client of repo on the registry at addr.
func repository(t testing.TB, addr, repo string) *registry.Repository {
	t.Helper()
	r, err := registry.New(addr+"/"+repo, registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// publishIndex pushes ix's blobs and the index opts describes with them
// (untagged), and returns the index's descriptor.
func publishIndex(ctx context.Context, t testing.TB, r *registry.Repository, opts index.BuildOptions, ix SOCIIndex) ocispec.Descriptor {
	t.Helper()
	zd, err := r.PushBlobBytes(ctx, index.MediaTypeZtoc, ix.Encoded)
	if err != nil {
		t.Fatal(err)
	}
	opts.Layers = []index.Layer{{LayerDigest: ix.Layer.Digest, LayerMediaType: ix.Layer.MediaType, Ztoc: zd}}
	if ix.Pack {
		head, windows, err := ztoc.MarshalPack(ix.Ztoc, zd.Digest, zd.Size)
		if err != nil {
			t.Fatal(err)
		}
		p := index.Pack{LayerDigest: ix.Layer.Digest, Ztoc: zd.Digest}
		if p.Head, err = r.PushBlobBytes(ctx, index.MediaTypePackHead, head); err != nil {
			t.Fatal(err)
		}
		if len(windows) > 0 {
			if p.Windows, err = r.PushBlobBytes(ctx, index.MediaTypePackWindows, windows); err != nil {
				t.Fatal(err)
			}
		}
		opts.Packs = []index.Pack{p}
	}
	built, err := index.Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	cfg := index.ConfigDescriptor(opts.Version)
	if _, err := r.PushBlobBytes(ctx, cfg.MediaType, []byte(index.EmptyConfigData)); err != nil {
		t.Fatal(err)
	}
	if err := r.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		t.Fatal(err)
	}
	return built.Descriptor
}
