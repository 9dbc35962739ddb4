//go:build linux

package testenv

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// Entry is one member of a layer tar built by Layer.
type Entry struct {
	// Name is the path in the layer, without a leading slash.
	Name string
	// Mode holds the permission bits; 0 means 0755 for directories and
	// 0644 for files.
	Mode int64
	// Dir makes a directory; otherwise Data is a regular file's content.
	Dir  bool
	Data []byte
}

// epoch is the fixed mtime of built layers, so they are reproducible.
var epoch = time.Unix(1700000000, 0)

// Layer builds a gzip-compressed PAX tar layer of entries and returns the
// blob and its diff ID (the digest of the uncompressed tar).
func Layer(t testing.TB, entries []Entry) (blob []byte, diffID digest.Digest) {
	t.Helper()
	members := make([]layertest.Entry, len(entries))
	for i, e := range entries {
		mode := e.Mode
		m := layertest.Reg(e.Name, mode, e.Data)
		if e.Dir {
			if mode == 0 {
				mode = 0o755
			}
			m = layertest.Dir(e.Name, mode)
		} else if mode == 0 {
			m.Header.Mode = 0o644
		}
		m.Header.ModTime, m.Header.Format = epoch, tar.FormatPAX
		members[i] = m
	}
	tarball := layertest.Tar(t, members...)
	return layertest.Gzip(t, tarball, gzip.DefaultCompression), digest.FromBytes(tarball)
}

// LayerBlob is a pushed or to-be-pushed layer.
type LayerBlob struct {
	Blob   []byte
	DiffID digest.Digest
}

// PushImage pushes a linux/amd64 OCI image made of layers (bottom first)
// with the given command to the registry at addr as repo:tag, and returns
// the pullable reference "addr/repo:tag" and the manifest descriptor.
func PushImage(t testing.TB, addr, repo, tag string, cmd []string, layers ...LayerBlob) (string, ocispec.Descriptor) {
	t.Helper()
	img := ocispec.Image{
		Platform: ocispec.Platform{Architecture: "amd64", OS: "linux"},
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cmd: cmd,
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
	}
	for _, l := range layers {
		img.RootFS.DiffIDs = append(img.RootFS.DiffIDs, l.DiffID)
		d := registrytest.PushBlob(t, addr, repo, l.Blob)
		m.Layers = append(m.Layers, ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageLayerGzip,
			Digest:    digest.Digest(d),
			Size:      int64(len(l.Blob)),
		})
	}
	cfg, err := json.Marshal(img)
	if err != nil {
		t.Fatal(err)
	}
	m.Config = ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageConfig,
		Digest:    digest.Digest(registrytest.PushBlob(t, addr, repo, cfg)),
		Size:      int64(len(cfg)),
	}
	mb, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	registrytest.PushManifest(t, addr, repo, tag, ocispec.MediaTypeImageManifest, mb)
	return addr + "/" + repo + ":" + tag, ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageManifest,
		Digest:    digest.FromBytes(mb),
		Size:      int64(len(mb)),
	}
}

// HelloBinary builds a static linux/amd64 program that prints message and
// a newline when run without arguments, and otherwise copies the files named
// by its arguments to stdout (a tiny cat, to read files in a container); an
// argument sha256:PATH prints the file's SHA-256 and size instead, so big
// files are checked inside the container.
// busybox is not available here, so test images get their one executable
// this way.
func HelloBinary(t testing.TB, message string) []byte {
	t.Helper()
	src := `package main

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"strconv"
	"strings"
)

func main() {
	if len(os.Args) < 2 {
		os.Stdout.WriteString(` + strconv.Quote(message+"\n") + `)
		return
	}
	for _, arg := range os.Args[1:] {
		name, hash := strings.CutPrefix(arg, "sha256:")
		f, err := os.Open(name)
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		var w io.Writer = os.Stdout
		h := sha256.New()
		if hash {
			w = h
		}
		n, err := io.Copy(w, f)
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		if hash {
			os.Stdout.WriteString(hex.EncodeToString(h.Sum(nil)) + " " + strconv.FormatInt(n, 10) + "\n")
		}
		f.Close()
	}
}
`
	return buildStatic(t, "hello", src)
}

// HelloLayer is a minimal root file system: the directories runc mounts
// over, and /hello (HelloBinary printing message), plus extra entries.
func HelloLayer(t testing.TB, message string, extra ...Entry) LayerBlob {
	t.Helper()
	entries := []Entry{
		{Name: "dev/", Dir: true}, {Name: "proc/", Dir: true}, {Name: "sys/", Dir: true},
		{Name: "etc/", Dir: true}, {Name: "tmp/", Dir: true, Mode: 0o1777},
		{Name: "hello", Mode: 0o755, Data: HelloBinary(t, message)},
	}
	blob, diffID := Layer(t, append(entries, extra...))
	return LayerBlob{Blob: blob, DiffID: diffID}
}
