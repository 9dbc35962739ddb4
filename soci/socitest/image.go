// Package socitest builds images for tests of the indexing engine and the
// indexer: random gzip, tar and zstd layers whose files the test knows, OCI
// and Docker schema 2 manifests and image indexes pushed with registrytest's
// raw client, and raw HTTP checks of what ended up in a registry (a SOCI
// index checked the way SOCI's runtime reads it, a zTOC that reproduces its
// layer's files, no manifest pointing at a missing blob). It also has a
// recording proxy to count requests and corrupt blobs on their way.
//
// The checks talk HTTP to the registry directly, not through package
// registry, so that a bug there cannot hide one in what was pushed.
package socitest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/registry/registrytest"
)

// Layer media types of the test images.
const (
	OCIGzip       = ocispec.MediaTypeImageLayerGzip
	OCITar        = ocispec.MediaTypeImageLayer
	OCIZstd       = ocispec.MediaTypeImageLayerZstd
	DockerGzip    = images.MediaTypeDockerSchema2LayerGzip
	DockerConfig  = images.MediaTypeDockerSchema2Config
	DockerList    = images.MediaTypeDockerSchema2ManifestList
	DockerImage   = images.MediaTypeDockerSchema2Manifest
	manifestTypes = ocispec.MediaTypeImageManifest + "," + ocispec.MediaTypeImageIndex + "," + DockerImage + "," + DockerList
)

// Layer is a layer blob with what the test knows of its content.
type Layer struct {
	Desc ocispec.Descriptor
	Data []byte
	// DiffID is the digest of the uncompressed tar.
	DiffID digest.Digest
	// Files are the regular files of the tar, by cleaned path.
	Files map[string][]byte
}

// tarball builds a tar of about size bytes of random (incompressible)
// file content: a few directories, files of up to 96 KiB, a symlink and a
// hardlink. The same seed gives the same bytes.
func tarball(seed uint64, size int64) ([]byte, map[string][]byte) {
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

// GzipLayer makes a gzip layer whose compressed size is about size.
func GzipLayer(seed uint64, size int64, mediaType string) Layer {
	raw, files := tarball(seed, size)
	var gz bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		panic(err)
	}
	zw.Write(raw)
	zw.Close()
	return NewLayer(mediaType, gz.Bytes(), digest.FromBytes(raw), files)
}

// TarLayer makes an uncompressed tar layer of about size bytes.
func TarLayer(seed uint64, size int64) Layer {
	raw, files := tarball(seed, size)
	return NewLayer(OCITar, raw, digest.FromBytes(raw), files)
}

// LayerKinds are one layer of each kind the indexer treats differently,
// with a minimum layer size of about 200 KB (the small layers are 40 and
// 60 KiB, the large ones 400 KiB and more): [0] a large gzip
// layer and [3] a tar layer, indexed; [1] and [4] small gzip layers,
// skipped as small; [2] a zstd layer, skipped by media type; [5] another
// large gzip layer, indexed.
func LayerKinds() []Layer {
	return []Layer{
		GzipLayer(1, 400<<10, OCIGzip),
		GzipLayer(2, 40<<10, OCIGzip),
		ZstdLayer(3, 300<<10),
		TarLayer(4, 500<<10),
		GzipLayer(5, 60<<10, OCIGzip),
		GzipLayer(6, 700<<10, OCIGzip),
	}
}

// ZstdLayer makes a blob labelled as a zstd layer (zstd magic, random
// bytes): the indexer must skip it by media type without reading it.
func ZstdLayer(seed uint64, size int) Layer {
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	copy(b, []byte{0x28, 0xb5, 0x2f, 0xfd})
	return NewLayer(OCIZstd, b, digest.FromBytes(b), nil)
}

func NewLayer(mediaType string, data []byte, diffID digest.Digest, files map[string][]byte) Layer {
	return Layer{
		Desc:   ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))},
		Data:   data,
		DiffID: diffID,
		Files:  files,
	}
}

// Image is a pushed image manifest.
type Image struct {
	Desc     ocispec.Descriptor // media type, digest, size (and platform when in an index)
	Manifest []byte
	Config   []byte
	Layers   []Layer
	Platform ocispec.Platform
}

// PushImage pushes layers, a config for os/arch and an image manifest
// (Docker schema 2 when docker is set, OCI otherwise) to addr/repo, tagged
// tag (if not empty).
func PushImage(t testing.TB, addr, repo, tag, platform string, docker bool, layers ...Layer) Image {
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
		m.MediaType = DockerImage
		m.Config.MediaType = DockerConfig
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
	return Image{Desc: desc, Manifest: b, Config: cfgBytes, Layers: layers, Platform: cfg.Platform}
}

// PushIndex pushes an image index (a Docker manifest list when docker is
// set) of already pushed images, tagged tag.
func PushIndex(t testing.TB, addr, repo, tag string, docker bool, imgs ...Image) (ocispec.Descriptor, []byte) {
	t.Helper()
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex}
	idx.SchemaVersion = 2
	if docker {
		idx.MediaType = DockerList
	}
	for _, im := range imgs {
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

// PushMultiPlatform pushes an untagged linux/amd64 image of the layers
// amd and an untagged linux/arm64 image of the layers arm to addr/repo,
// and an image index of the two (a Docker manifest list, with Docker
// manifests, when docker is set) tagged tag: the multi-platform image the
// index, convert and inspect tests start from.
func PushMultiPlatform(t testing.TB, addr, repo, tag string, docker bool, amd, arm []Layer) (a, b Image) {
	t.Helper()
	a = PushImage(t, addr, repo, "", "linux/amd64", docker, amd...)
	b = PushImage(t, addr, repo, "", "linux/arm64", docker, arm...)
	PushIndex(t, addr, repo, tag, docker, a, b)
	return a, b
}

// Registry is a running registry under test.
type Registry struct {
	Name string
	Addr string
	// Referrers: the registry serves the OCI referrers API (otherwise
	// referrers live in the sha256-<hex> fallback tag).
	Referrers bool
}

// EachRegistry runs f as a subtest against a fresh Debian
// docker-registry (fallback tag) and a fresh go-containerregistry registry
// with the referrers API.
func EachRegistry(t *testing.T, f func(t *testing.T, reg Registry)) {
	t.Run("distribution", func(t *testing.T) {
		f(t, Registry{Name: "distribution", Addr: registrytest.StartDistribution(t)})
	})
	t.Run("referrers", func(t *testing.T) {
		f(t, Registry{Name: "referrers", Addr: registrytest.StartReferrersRegistry(t), Referrers: true})
	})
}

// DefaultPlatform is the platform an image index is indexed for when no
// platform is requested: this machine's.
func DefaultPlatform() string { return "linux/" + runtime.GOARCH }
