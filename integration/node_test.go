//go:build linux

package integration

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/snapshotter"
)

// Helpers of the node tests (credentials, mirrors, CRI): small indexed
// images whose layer has many spans, so that a container reading one file
// fetches a few of them, and one "node" = a snapshotter daemon and a
// containerd.

// smallSpan is the span size small test images are indexed with.
const smallSpan = 64 << 10

// nodeImage is a one-layer indexed image: the hello program (a tiny cat
// and sha256 tool) and random data files.
type nodeImage struct {
	ref   string
	layer testenv.LayerBlob
	// sums maps a data file's path to "sha256hex size", what
	// "/hello sha256:PATH" prints for it.
	sums map[string]string
}

// pushNodeImage pushes a one-layer image with data files (name -> size,
// random content seeded by seed) as addr/repo:src and converts it to
// addr/repo:soci with the indexer; the converted image is returned.
func pushNodeImage(t *testing.T, indexerBin, addr, repo string, seed uint64, files map[string]int) nodeImage {
	t.Helper()
	img := nodeImage{sums: map[string]string{}}
	extra := []testenv.Entry{{Name: "data/", Dir: true}}
	for _, name := range slices.Sorted(maps.Keys(files)) {
		size := files[name]
		data := layertest.Random(seed+uint64(len(name)), size)
		sum := sha256.Sum256(data)
		img.sums["/"+name] = hex.EncodeToString(sum[:]) + " " + strconv.Itoa(size)
		extra = append(extra, testenv.Entry{Name: name, Data: data})
	}
	img.layer = testenv.HelloLayer(t, "hello from "+repo, extra...)
	src, _ := testenv.PushImage(t, addr, repo, "src", []string{"/hello"}, img.layer)
	img.ref = addr + "/" + repo + ":soci"
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, indexerBin, "convert", "--plain-http", "--no-cache",
		"--min-layer-size", "1", "--span-size", strconv.Itoa(smallSpan), src, img.ref)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("indexer convert %s: %v\n%s", src, err, out)
	}
	return img
}

// node is one machine of a test: a snapshotter daemon and the containerd
// using it, with their own directories and sockets.
type node struct {
	dir     string
	snapBin string
	sn      *testenv.Snapshotter
	cd      *testenv.Containerd
	env     []string // environment of "snapshotter pull"
	runs    int
}

// pull runs "snapshotter pull" (with the node's environment and extra
// flags) and returns its report.
func (n *node) pull(t *testing.T, ref string, flags ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := append([]string{"pull", "-a", n.cd.Socket, "-n", n.cd.Namespace, "--plain-http"}, flags...)
	cmd := exec.CommandContext(ctx, n.snapBin, append(args, ref)...)
	cmd.Env = append(os.Environ(), n.env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("snapshotter pull %s: %v\n%s", ref, err, out)
	}
	t.Logf("snapshotter pull %s:\n%s", ref, out)
	return string(out)
}

// readSums runs a container of img on the node that prints the sha256 of
// the given data files, and checks the output.
func (n *node) readSums(t *testing.T, img nodeImage, files ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n.runs++
	args := []string{"run", "--rm", "--snapshotter", "spanpull", img.ref, fmt.Sprintf("read-%d", n.runs), "/hello"}
	var want []string
	for _, f := range files {
		args = append(args, "sha256:"+f)
		want = append(want, img.sums[f])
	}
	out, err := n.cd.Run(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != strings.Join(want, "\n") {
		t.Fatalf("container printed %q, want %q", got, strings.Join(want, "\n"))
	}
}

// snapshotLabels returns the labels of committed snapshot name (a chain
// ID) in the node's spanpull snapshotter.
func snapshotLabels(t *testing.T, cd *testenv.Containerd, name string) map[string]string {
	t.Helper()
	out := cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "info", name)
	var info struct{ Labels map[string]string }
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("ctr snapshots info %s: %v\n%s", name, err, out)
	}
	return info.Labels
}

// isLazy reports whether the one-layer image's layer is served lazily.
func isLazy(t *testing.T, cd *testenv.Containerd, layer testenv.LayerBlob) bool {
	t.Helper()
	return snapshotLabels(t, cd, layer.DiffID.String())[snapshotter.LabelMode] == "lazy"
}

// writeDockerConfig writes a Docker config.json in dir with the
// credentials of user on host.
func writeDockerConfig(t *testing.T, dir, host, user, password string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	cfg := `{"auths":{"` + host + `":{"auth":"` + auth + `"}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeHtpasswd writes an htpasswd file at path with the one entry of user
// and password.
func writeHtpasswd(t *testing.T, path, user, password string) {
	t.Helper()
	line, err := registrytest.HtpasswdEntry(user, password)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(line), 0o600); err != nil {
		t.Fatal(err)
	}
}

// startAuthRegistry runs docker-registry with its storage in dir twice:
// open, while push publishes the test's images at the address it is
// given, then on the same address and storage requiring HTTP basic auth
// of the users in the htpasswd file. The second one is returned, and
// stopped in Cleanup.
func startAuthRegistry(t *testing.T, dir, htpasswd string, push func(addr string)) *registrytest.Distribution {
	t.Helper()
	open, err := registrytest.LaunchDistribution(context.Background(), registrytest.DistributionOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	push(open.Addr)
	if err := open.Stop(); err != nil {
		t.Fatal(err)
	}
	reg, err := registrytest.LaunchDistribution(context.Background(), registrytest.DistributionOptions{
		Dir: dir, Listen: open.Addr, Htpasswd: htpasswd})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = reg.Stop() })
	return reg
}

// metricDelta is after[series] - before[series].
func metricDelta(before, after map[string]float64, series string) float64 {
	return after[series] - before[series]
}
