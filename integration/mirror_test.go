//go:build linux

package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// TestMirrorTwoNodes: P2P through a pull-through mirror on the node. Two
// "nodes" (a snapshotter daemon and a containerd 1.6 each, with their own
// roots and sockets, on loopback ports of this machine: no network
// namespaces) use the same containerd host configuration for the
// registry: a dead mirror first, then a pull-through mirror (Debian's
// docker-registry in proxy mode), then the registry. Both pull the same
// indexed image lazily and read the same files. The registry sees each
// byte range at most once across both nodes, the second node's spans all
// come through the mirror (with the ns parameter), and the dead mirror
// costs nothing once it has failed.
//
// The registry's access log is a recording proxy in front of it (the
// nodes' and the mirror's "upstream"): docker-registry's own access log
// shows no Range headers.
func TestMirrorTwoNodes(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)
	snapBin, indexerBin := testenv.BuildBinaries(t, dir)

	origin := testenv.StartRegistryDaemon(t, mkdir(t, filepath.Join(dir, "origin")))
	img := pushNodeImage(t, indexerBin, origin.Addr, "mirror/app", 7, map[string]int{
		"data/a.bin": 400 << 10, "data/b.bin": 400 << 10, "data/unread.bin": 1 << 20})
	upstream := registrytest.StartFaultProxy(t, origin.Addr) // the registry as the nodes see it
	img.ref = strings.Replace(img.ref, origin.Addr, upstream.Addr, 1)
	layerDigest := digest.FromBytes(img.layer.Blob)

	mirror, err := registrytest.LaunchDistribution(context.Background(), registrytest.DistributionOptions{
		Dir: mkdir(t, filepath.Join(dir, "mirror")), ProxyRemoteURL: "http://" + upstream.Addr, AccessLog: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mirror.Stop() })
	dead := freeAddr(t)
	certs := filepath.Join(dir, "certs.d")
	host, port, _ := strings.Cut(upstream.Addr, ":")
	hostsToml := fmt.Sprintf(`server = "http://%s"
[host."http://%s"]
  capabilities = ["pull", "resolve"]
[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, upstream.Addr, dead, mirror.Addr)
	if err := os.WriteFile(filepath.Join(mkdir(t, filepath.Join(certs, host+"_"+port+"_")), "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
		t.Fatal(err)
	}

	startNode := func(name string) *node {
		d := mkdir(t, filepath.Join(dir, name))
		n := &node{dir: d, snapBin: snapBin}
		n.sn = testenv.StartSnapshotter(t, d, testenv.SnapshotterConfig{Binary: snapBin,
			Config: "[remote]\nfill_rate_bytes = -1\nconfig_path = \"" + certs + "\"\n"})
		n.cd = testenv.StartContainerd16(t, d, testenv.ContainerdConfig{Snapshotters: map[string]string{"spanpull": n.sn.Socket}})
		return n
	}
	read := []string{"/data/a.bin", "/data/b.bin"}

	node1 := startNode("node1")
	node1.pull(t, img.ref, "--hosts-dir", certs)
	if !isLazy(t, node1.cd, img.layer) {
		t.Fatal("node 1: layer not lazy")
	}
	node1.readSums(t, img, read...)
	// The mirror fetches a blob it lacks whole, in the background, and
	// serves ranges of it once it has it.
	waitFor(t, time.Minute, "the mirror to hold the layer", func() bool {
		_, err := os.Stat(blobData(mirror.Storage, layerDigest))
		return err == nil
	})
	mark := len(upstream.RequestLog())

	node2 := startNode("node2")
	node2.pull(t, img.ref, "--hosts-dir", certs)
	if !isLazy(t, node2.cd, img.layer) {
		t.Fatal("node 2: layer not lazy")
	}
	node2.readSums(t, img, read...)

	// The registry: each range of the layer asked at most once, by
	// either node; whole-layer requests only from the mirror; nothing of
	// the layer asked by anyone once the mirror had it.
	layerPath := "/v2/mirror/app/blobs/" + layerDigest.String()
	ranges := map[string]int{}
	var whole int
	log := upstream.RequestLog()
	for i, r := range log {
		if r.Path != layerPath || r.Method != "GET" {
			continue
		}
		if i >= mark {
			t.Errorf("layer requested from the registry after the mirror held it: %+v", r)
		}
		if r.Range == "" {
			whole++
			if strings.HasPrefix(r.UserAgent, "spanpull") || strings.Contains(r.UserAgent, "containerd") {
				t.Errorf("a node fetched the whole layer from the registry: %+v", r)
			}
			continue
		}
		ranges[r.Range]++
		if ranges[r.Range] > 1 {
			t.Errorf("range %s of the layer asked %d times", r.Range, ranges[r.Range])
		}
	}
	t.Logf("registry: %d range requests of the layer (node 1 while the mirror filled), %d whole-layer GETs (the mirror filling itself)", len(ranges), whole)

	// Node 2's spans came through the mirror, with ns=.
	lines, err := mirror.AccessLogLines()
	if err != nil {
		t.Fatal(err)
	}
	ns := "ns=" + strings.ReplaceAll(upstream.Addr, ":", "%3A")
	var viaMirror int
	for _, l := range lines {
		if strings.Contains(l, "GET "+layerPath+"?"+ns) && strings.Contains(l, `" 206 `) && strings.Contains(l, `"spanpull"`) {
			viaMirror++
		}
	}
	if viaMirror == 0 {
		t.Fatalf("no range of the layer served by the mirror:\n%s", strings.Join(lines, "\n"))
	}
	t.Logf("mirror: %d ranges of the layer served", viaMirror)
}

// mkdir creates dir (and its parents) and returns it.
func mkdir(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// blobData is where docker-registry keeps blob d under storage.
func blobData(storage string, d digest.Digest) string {
	return filepath.Join(storage, "docker", "registry", "v2", "blobs", d.Algorithm().String(), d.Encoded()[:2], d.Encoded(), "data")
}

// waitFor polls cond every 100ms until it holds, failing the test after
// timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
