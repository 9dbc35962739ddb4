//go:build linux

package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/fusefs"
	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// TestContainerd16PullRun proves the non-lazy path end to end on Debian's
// containerd 1.6: with spanpull as a proxy snapshotter, "ctr image pull"
// unpacks a real image into it and "ctr run" runs a container from it.
// Removing the image must let containerd's garbage collector remove every
// snapshot through the snapshotter, leaving its snapshot directory empty.
func TestContainerd16PullRun(t *testing.T) {
	testPullRun(t, testenv.StartContainerd16)
}

// TestContainerd2PullRun is TestContainerd16PullRun on containerd 2.2,
// whose "ctr image pull" goes through the transfer service.
func TestContainerd2PullRun(t *testing.T) {
	testenv.RequireRoot(t)
	bins := testenv.Containerd2Binaries(t)
	testPullRun(t, func(t testing.TB, dir string, c testenv.ContainerdConfig) *testenv.Containerd {
		return testenv.StartContainerd2(t, dir, bins, c)
	})
}

// startContainerdFunc starts one containerd version.
type startContainerdFunc func(t testing.TB, dir string, c testenv.ContainerdConfig) *testenv.Containerd

func testPullRun(t *testing.T, startContainerd startContainerdFunc) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)

	bin := testenv.BuildGo(t, dir, "github.com/spanpull/spanpull/cmd/snapshotter", "snapshotter")
	reg := testenv.StartRegistry(t)
	const msg = "hello from a spanpull snapshot"
	ref, _ := testenv.PushImage(t, reg, "e2e/hello", "v1", []string{"/hello"},
		testenv.HelloLayer(t, msg, testenv.Entry{Name: "etc/motd", Data: []byte("first layer\n")}),
		layerOf(t, testenv.Entry{Name: "etc/motd", Data: []byte("second layer wins\n")}))

	sn := testenv.StartSnapshotter(t, dir, testenv.SnapshotterConfig{Binary: bin})
	cd := startContainerd(t, dir, testenv.ContainerdConfig{
		Snapshotters: map[string]string{"spanpull": sn.Socket},
	})

	plugins := cd.MustRun(t, "plugins", "ls")
	if !hasLine(plugins, "io.containerd.snapshotter.v1", "spanpull", "ok") {
		t.Fatalf("spanpull proxy snapshotter not loaded:\n%s", plugins)
	}

	start := time.Now()
	cd.MustRun(t, "image", "pull", "--plain-http", "--snapshotter", "spanpull", ref)
	t.Logf("pull took %v", time.Since(start))

	snaps := cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "ls")
	if n := strings.Count(snaps, "Committed"); n != 2 {
		t.Fatalf("want 2 committed snapshots after pull, got %d:\n%s", n, snaps)
	}

	out := cd.MustRun(t, "run", "--rm", "--snapshotter", "spanpull", ref, "hello-1", "/hello")
	if strings.TrimSpace(out) != msg {
		t.Fatalf("container printed %q, want %q", out, msg)
	}

	// A snapshotter restart under a running containerd: containerd
	// reconnects, the snapshots are still there.
	if err := sn.Stop(15 * time.Second); err != nil {
		t.Fatalf("snapshotter did not stop cleanly: %v", err)
	}
	sn = testenv.StartSnapshotter(t, dir, testenv.SnapshotterConfig{Binary: bin})

	// Upper layers win over lower ones.
	runRetry(t, cd, "snapshots", "--snapshotter", "spanpull", "ls")
	out = cd.MustRun(t, "run", "--rm", "--snapshotter", "spanpull", ref, "hello-2", "/hello", "/etc/motd")
	if out != "second layer wins\n" {
		t.Fatalf("/etc/motd in the container = %q, want the second layer's", out)
	}

	cd.MustRun(t, "image", "rm", "--sync", ref)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ents, err := os.ReadDir(filepath.Join(sn.Root, "snapshots"))
		if err != nil {
			t.Fatal(err)
		}
		snaps := cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "ls")
		if len(ents) == 0 && strings.Count(snaps, "\n") <= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after image rm: %d snapshot dirs left in %s; ctr lists:\n%s", len(ents), sn.Root, snaps)
		}
		time.Sleep(200 * time.Millisecond)
	}

	if err := sn.Stop(15 * time.Second); err != nil {
		t.Fatalf("snapshotter did not stop cleanly: %v", err)
	}
	if _, err := os.Stat(sn.Socket); !os.IsNotExist(err) {
		t.Fatalf("snapshotter socket left after stop: %v", err)
	}
}

// runRetry runs an idempotent ctr command until it succeeds, for up to
// 20 s: right after a snapshotter restart containerd may still be in its
// reconnect backoff.
func runRetry(t *testing.T, cd *testenv.Containerd, args ...string) string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := cd.Run(ctx, args...)
		cancel()
		if err == nil {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		t.Logf("retrying: %v", err)
		time.Sleep(500 * time.Millisecond)
	}
}

func layerOf(t *testing.T, entries ...testenv.Entry) testenv.LayerBlob {
	blob, diffID := testenv.Layer(t, entries)
	return testenv.LayerBlob{Blob: blob, DiffID: diffID}
}

// hasLine reports whether some line of out has all the fields in order.
func hasLine(out string, fields ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < len(fields) {
			continue
		}
		i := 0
		for _, x := range f {
			if i < len(fields) && x == fields[i] {
				i++
			}
		}
		if i == len(fields) {
			return true
		}
	}
	return false
}

// ztocResolver is a RemoteLayerResolver for tests: it serves layers whose
// zTOCs it was given (built at push time, standing in for SOCI index
// discovery) over FUSE, reading spans from the registry with range
// requests. It is the lazy path in miniature: FUSE, zTOC, range reads.
type ztocResolver struct {
	mu     sync.Mutex
	layers map[digest.Digest]*ztoc.Ztoc
	sizes  map[digest.Digest]int64
	asked  []string
}

func (r *ztocResolver) Mount(ctx context.Context, dir string, labels map[string]string) (snapshotter.RemoteMount, error) {
	dgst := digest.Digest(labels[snapshotters.TargetLayerDigestLabel])
	imageRef := labels[snapshotters.TargetRefLabel]
	r.mu.Lock()
	z, size := r.layers[dgst], r.sizes[dgst]
	r.asked = append(r.asked, dgst.String())
	r.mu.Unlock()
	if z == nil {
		return nil, fmt.Errorf("no zTOC for %s: %w", dgst, snapshotter.ErrNoRemote)
	}
	repo, err := registry.New(imageRef, registry.Options{
		PlainHTTP:  true,
		Credential: func(context.Context, string) (auth.Credential, error) { return auth.EmptyCredential, nil },
	})
	if err != nil {
		return nil, err
	}
	blob, err := repo.BlobReader(ocispec.Descriptor{Digest: dgst, Size: size})
	if err != nil {
		return nil, err
	}
	// No span cache: every read fetches the spans it covers.
	layer, err := span.NewLayer(dgst, z, blob, span.Options{})
	if err != nil {
		return nil, err
	}
	tree, err := fusefs.NewTree(fusefs.Files(z.Files), nil)
	if err != nil {
		layer.Close()
		return nil, err
	}
	root, err := fusefs.NewRoot(tree, layer, fusefs.Options{})
	if err != nil {
		layer.Close()
		return nil, err
	}
	srv, err := fusefs.Mount(ctx, dir, root, fusefs.MountOptions{FsName: dgst.Encoded()[:12]})
	if err != nil {
		layer.Close()
		return nil, err
	}
	return &fuseMount{srv: srv, layer: layer}, nil
}

func (r *ztocResolver) askedFor() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.asked...)
}

// clientPull pulls ref into the spanpull snapshotter the way nerdctl and
// rpull do: client-side, unpacking with the remote-snapshot info labels.
func clientPull(t *testing.T, cd *testenv.Containerd, ref string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), cd.Namespace), 2*time.Minute)
	defer cancel()
	client, err := containerd.New(cd.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts)),
	})
	if _, err := client.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter("spanpull"),
		containerd.WithResolver(resolver),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(ref)),
	); err != nil {
		t.Fatalf("lazy pull: %v", err)
	}
}

type fuseMount struct {
	srv   *fusefs.Server
	layer *span.Layer
}

// Release unmounts: this resolver keeps no connection for a successor.
func (m *fuseMount) Release() error {
	defer m.layer.Close()
	return m.srv.Unmount()
}

// Remove is Release: this resolver caches nothing.
func (m *fuseMount) Remove() error { return m.Release() }

func (m *fuseMount) Labels() map[string]string {
	return map[string]string{snapshotter.LabelMode: "lazy"}
}

func (m *fuseMount) Usage() snapshots.Usage { return snapshots.Usage{} }

// LocalDir is empty: this resolver keeps no local tree.
func (m *fuseMount) LocalDir() string { return "" }

// TestContainerd16LazyPullRun is the remote-snapshot protocol end to end on
// containerd 1.6: a client-side pull with the remote-snapshot labels (as
// nerdctl and rpull do) makes the snapshotter mount every layer from its
// zTOC over FUSE and answer AlreadyExists, so containerd never downloads a
// layer blob; the container then reads its files through overlayfs over
// FUSE, fetched with range requests. Removing the image unmounts the FUSE
// layers (GC otherwise fails with "device or resource busy").
func TestContainerd16LazyPullRun(t *testing.T) {
	testLazyPullRun(t, testenv.StartContainerd16, false)
}

// TestContainerd2LazyPullRun is the same on containerd 2.2 with a plain
// "ctr image pull": its transfer service passes the remote-snapshot labels
// when the proxy plugin exports enable_remote_snapshot_annotations.
func TestContainerd2LazyPullRun(t *testing.T) {
	testenv.RequireRoot(t)
	bins := testenv.Containerd2Binaries(t)
	testLazyPullRun(t, func(t testing.TB, dir string, c testenv.ContainerdConfig) *testenv.Containerd {
		c.RemoteSnapshotAnnotations = true
		return testenv.StartContainerd2(t, dir, bins, c)
	}, true)
}

func testLazyPullRun(t *testing.T, startContainerd startContainerdFunc, ctrPull bool) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)
	reg := testenv.StartRegistry(t)

	const msg = "hello from a lazy layer"
	big := make([]byte, 3<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	bigSum := sha256.Sum256(big)
	layers := []testenv.LayerBlob{
		testenv.HelloLayer(t, msg, testenv.Entry{Name: "etc/motd", Data: []byte("first layer\n")}),
		layerOf(t, testenv.Entry{Name: "etc/", Dir: true},
			testenv.Entry{Name: "etc/motd", Data: []byte("second layer wins\n")},
			testenv.Entry{Name: "data/", Dir: true},
			testenv.Entry{Name: "data/big", Data: big}),
	}
	res := &ztocResolver{layers: map[digest.Digest]*ztoc.Ztoc{}, sizes: map[digest.Digest]int64{}}
	for _, l := range layers {
		z, d, err := ztoc.Build(context.Background(), bytes.NewReader(l.Blob), ztoc.BuildOptions{SpanSize: 256 << 10})
		if err != nil {
			t.Fatalf("build zTOC: %v", err)
		}
		res.layers[d], res.sizes[d] = z, int64(len(l.Blob))
	}
	ref, _ := testenv.PushImage(t, reg, "e2e/lazy", "v1", []string{"/hello"}, layers...)

	sn, err := snapshotter.New(context.Background(), filepath.Join(dir, "snap-root"), snapshotter.WithRemoteLayerResolver(res))
	if err != nil {
		t.Fatal(err)
	}
	sock := testenv.ServeSnapshotter(t, dir, sn)
	cd := startContainerd(t, dir, testenv.ContainerdConfig{
		Snapshotters: map[string]string{"spanpull": sock},
	})

	start := time.Now()
	if ctrPull {
		cd.MustRun(t, "image", "pull", "--plain-http", "--snapshotter", "spanpull", ref)
	} else {
		clientPull(t, cd, ref)
	}
	t.Logf("lazy pull took %v", time.Since(start))

	if asked := res.askedFor(); len(asked) != 2 {
		t.Fatalf("resolver asked for %v, want both layers", asked)
	}
	content := cd.MustRun(t, "content", "ls", "-q")
	for _, l := range layers {
		if d := digest.FromBytes(l.Blob); hasLine(content, d.String()) {
			t.Fatalf("layer %s was downloaded into containerd's content store:\n%s", d, content)
		}
	}
	if n := fuseMountsBelow(t, dir); n != 2 {
		t.Fatalf("%d FUSE mounts, want one per layer", n)
	}

	out := cd.MustRun(t, "run", "--rm", "--snapshotter", "spanpull", ref, "lazy-1", "/hello")
	if strings.TrimSpace(out) != msg {
		t.Fatalf("container printed %q, want %q", out, msg)
	}
	// The container hashes /data/big itself: 3 MiB through ctr's stdout
	// can lose its tail when the task exits under load.
	out = cd.MustRun(t, "run", "--rm", "--snapshotter", "spanpull", ref, "lazy-2", "/hello", "/etc/motd", "sha256:/data/big")
	if want := fmt.Sprintf("second layer wins\n%x %d\n", bigSum, len(big)); out != want {
		t.Fatalf("container read /etc/motd and /data/big as %q, want %q", out, want)
	}

	cd.MustRun(t, "image", "rm", "--sync", ref)
	deadline := time.Now().Add(30 * time.Second)
	for fuseMountsBelow(t, dir) != 0 {
		if time.Now().After(deadline) {
			snaps, _ := cd.Run(context.Background(), "snapshots", "--snapshotter", "spanpull", "ls")
			t.Fatalf("FUSE layers still mounted after image rm; snapshots:\n%s", snaps)
		}
		time.Sleep(200 * time.Millisecond)
	}
	ents, err := os.ReadDir(filepath.Join(dir, "snap-root", "snapshots"))
	if err != nil || len(ents) != 0 {
		t.Fatalf("snapshot dirs left after image rm: %d (%v)", len(ents), err)
	}
	if b, _ := os.ReadFile(cd.Log); bytes.Contains(b, []byte("device or resource busy")) {
		t.Fatalf("containerd logged a busy device:\n%s", b)
	}
}

func fuseMountsBelow(t *testing.T, dir string) int {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, m := range ms {
		if strings.HasPrefix(m.FSType, "fuse") {
			n++
		}
	}
	return n
}
