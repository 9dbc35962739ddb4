//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/proc"
)

// workload is an image and the command whose first output line the
// benchmark waits for.
type workload struct {
	Name string
	// Layer is the cached gzip layer (scripts/debian-layer.sh builds it
	// with Packages when it is missing).
	Layer    string
	Packages []string
	Cmd      []string
	// Expect is the first line the command prints.
	Expect string
}

// workloads are the ones the benchmark knows, by name. Each prints one
// line when it is ready: the time to it is what the issues set targets
// for.
func workloads(cache string) map[string]workload {
	return map[string]workload{
		"python": {
			Name:     "python",
			Layer:    filepath.Join(cache, "debian-python3.tar.gz"),
			Packages: []string{"python3"},
			Cmd:      []string{"python3", "-c", `print("hello")`},
			Expect:   "hello",
		},
		// The large image of issue 9: 371 MB of gzip.
		"large": {
			Name:     "large",
			Layer:    filepath.Join(cache, "debian-scientific.tar.gz"),
			Packages: []string{"python3", "python3-numpy", "python3-scipy", "python3-pandas", "python3-matplotlib"},
			Cmd:      []string{"python3", "-c", `import numpy, scipy, pandas, matplotlib; print("ready")`},
			Expect:   "ready",
		},
	}
}

// image is a workload's image in the benchmark registry.
type image struct {
	// Full is the plain image (pulled whole by containerd), Lazy its
	// SOCI-enabled copy from "indexer convert", LazyPrefetch that copy
	// with the workload's recorded start attached (empty unless a mode
	// needs it); all through the proxy.
	Full, Lazy, LazyPrefetch string
	// ChainID names the image's top layer snapshot.
	ChainID string
	// Bytes is the compressed image: layers, config and manifest.
	Bytes      int64
	LayerBytes int64
}

// ensureLayer builds the workload's layer with scripts/debian-layer.sh
// when the cache lacks it.
func ensureLayer(ctx context.Context, repo string, w workload) error {
	if st, err := os.Stat(w.Layer); err == nil && st.Size() > 0 {
		return nil
	}
	args := append([]string{w.Layer}, w.Packages...)
	cmd := exec.CommandContext(ctx, filepath.Join(repo, "scripts", "debian-layer.sh"), args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build layer %s: %w\n%s", w.Layer, err, out)
	}
	return nil
}

// pushImage pushes the workload's layer as a linux/amd64 OCI image to the
// registry (directly, before any shaping) and indexes it with
// "indexer convert" into a -soci tag.
func (e *env) pushImage(ctx context.Context, w workload) (image, error) {
	var img image
	layer, err := tarball.LayerFromFile(w.Layer, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return img, fmt.Errorf("layer %s: %w", w.Layer, err)
	}
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON)
	im, err := mutate.AppendLayers(base, layer)
	if err != nil {
		return img, fmt.Errorf("image of %s: %w", w.Layer, err)
	}
	cf, err := im.ConfigFile()
	if err != nil {
		return img, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	cf.Config.Cmd = []string{"/usr/bin/python3"}
	if im, err = mutate.ConfigFile(im, cf); err != nil {
		return img, err
	}
	repo := "bench/" + w.Name
	src := e.registryAddr + "/" + repo + ":image"
	tag, err := name.NewTag(src, name.Insecure)
	if err != nil {
		return img, err
	}
	if err := remote.Write(tag, im, remote.WithContext(ctx)); err != nil {
		return img, fmt.Errorf("push %s: %w", src, err)
	}
	if img.Bytes, img.LayerBytes, err = imageSize(im); err != nil {
		return img, err
	}
	if img.ChainID, err = chainID(im); err != nil {
		return img, err
	}
	args := []string{"convert", "--plain-http", "--cache-dir", filepath.Join(e.dir, "indexer-cache")}
	if e.spanSize > 0 {
		args = append(args, "--span-size", strconv.FormatInt(e.spanSize, 10))
	}
	out, err := proc.CombinedOutput(ctx, e.indexerBin, append(args, src, src+"-soci")...)
	if err != nil {
		return img, fmt.Errorf("index %s: %w", src, err)
	}
	e.logf("indexed %s:\n%s", src, strings.TrimSpace(out))
	img.Full = e.proxyAddr + "/" + repo + ":image"
	img.Lazy = img.Full + "-soci"
	return img, nil
}

// chainID names the snapshot of an image's top layer (the parent of a
// container's rootfs).
func chainID(im v1.Image) (string, error) {
	cf, err := im.ConfigFile()
	if err != nil {
		return "", err
	}
	var diffs []digest.Digest
	for _, d := range cf.RootFS.DiffIDs {
		diffs = append(diffs, digest.Digest(d.String()))
	}
	if len(diffs) == 0 {
		return "", errors.New("image has no layers")
	}
	return identity.ChainID(diffs).String(), nil
}

// recordPrefetch records the workload's start once (snapshotter record
// run, its own containerd and daemon, straight from the registry, before
// any shaping), tags the SOCI-enabled image again as image-soci-prefetch
// and attaches the record to that tag (indexer prefetch attach, which
// moves the tag to a new image whose index has the prefetch artifacts),
// leaving image-soci without them.
func (e *env) recordPrefetch(ctx context.Context, w workload, img *image) error {
	repo := e.registryAddr + "/bench/" + w.Name
	rec := filepath.Join(e.dir, "record-"+w.Name+".json")
	args := append([]string{"record", "run", "--plain-http", "--hosts-dir=", "--containerd", testenv.Containerd16Binary,
		"--ready", "^" + regexp.QuoteMeta(w.Expect) + "$", "--timeout", "10m", "-o", rec, repo + ":image-soci", "--"}, w.Cmd...)
	out, err := proc.CombinedOutput(ctx, e.snapshotterBin, args...)
	if err != nil {
		return fmt.Errorf("record the start of %s: %w", w.Name, err)
	}
	e.logf("recorded %s:\n%s", w.Name, proc.Tail(strings.TrimSpace(out), 1024))
	src, err := name.NewTag(repo+":image-soci", name.Insecure)
	if err != nil {
		return err
	}
	dst, err := name.NewTag(repo+":image-soci-prefetch", name.Insecure)
	if err != nil {
		return err
	}
	desc, err := remote.Get(src, remote.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("get %s: %w", src, err)
	}
	if err := remote.Tag(dst, desc, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("tag %s: %w", dst, err)
	}
	out, err = proc.CombinedOutput(ctx, e.indexerBin, "prefetch", "attach", "--plain-http", dst.String(), rec)
	if err != nil {
		return fmt.Errorf("attach the record of %s: %w", w.Name, err)
	}
	e.logf("attached the record of %s:\n%s", w.Name, strings.TrimSpace(out))
	img.LazyPrefetch = e.proxyAddr + "/bench/" + w.Name + ":image-soci-prefetch"
	return nil
}

func imageSize(im v1.Image) (total, layers int64, err error) {
	m, err := im.Manifest()
	if err != nil {
		return 0, 0, err
	}
	raw, err := im.RawManifest()
	if err != nil {
		return 0, 0, err
	}
	for _, l := range m.Layers {
		layers += l.Size
	}
	return layers + m.Config.Size + int64(len(raw)), layers, nil
}
