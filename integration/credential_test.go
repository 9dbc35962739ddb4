//go:build linux

package integration

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/testutil/dirtest"
)

// TestCredentialRotation: images in an htpasswd-protected docker-registry,
// credentials from the daemon's Docker config. When the password is
// rotated while the daemon runs, a pull whose index lookup the registry
// refuses falls back with reason "unauthorized" (not "no_index"); once the
// config file has the new password, reads of an already mounted layer and
// new pulls are lazy again: the daemon reads the config again on a 401,
// without a restart.
func TestCredentialRotation(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)
	snapBin, indexerBin := testenv.BuildBinaries(t, dir)

	// Images are pushed and indexed before the registry requires auth.
	htpasswd := filepath.Join(dir, "htpasswd")
	writeHtpasswd(t, htpasswd, "alice", "one")
	files := map[string]int{"data/a.bin": 300 << 10, "data/b.bin": 300 << 10}
	var imgs []nodeImage
	reg := startAuthRegistry(t, mkdir(t, filepath.Join(dir, "registry")), htpasswd, func(addr string) {
		for i, repo := range []string{"cred/one", "cred/two", "cred/three"} {
			imgs = append(imgs, pushNodeImage(t, indexerBin, addr, repo, uint64(100*i), files))
		}
	})

	daemonDocker := filepath.Join(dir, "daemon-docker")
	clientDocker := filepath.Join(dir, "client-docker")
	writeDockerConfig(t, daemonDocker, reg.Addr, "alice", "one")
	writeDockerConfig(t, clientDocker, reg.Addr, "alice", "one")
	n := &node{dir: dir, snapBin: snapBin, env: []string{"DOCKER_CONFIG=" + clientDocker}}
	n.sn = testenv.StartSnapshotter(t, dir, testenv.SnapshotterConfig{Binary: snapBin, Metrics: true,
		Config: "[remote]\nfill_rate_bytes = -1\nconfig_path = \"\"\ndocker_config = \"" + filepath.Join(daemonDocker, "config.json") + "\"\n"})
	n.cd = testenv.StartContainerd16(t, dir, testenv.ContainerdConfig{Snapshotters: map[string]string{"spanpull": n.sn.Socket}})
	metrics := func() map[string]float64 {
		m, err := testenv.ScrapeMetrics(context.Background(), n.sn.MetricsURL, "")
		if err != nil {
			t.Fatal(err)
		}
		return m
	}

	n.pull(t, imgs[0].ref)
	if !isLazy(t, n.cd, imgs[0].layer) {
		t.Fatal("first image not lazy with the configured credentials")
	}
	n.readSums(t, imgs[0], "/data/a.bin")

	// Rotation: the registry and the client know the new password, the
	// daemon's config still has the old one.
	writeHtpasswd(t, htpasswd, "alice", "two")
	if err := reg.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := reg.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	writeDockerConfig(t, clientDocker, reg.Addr, "alice", "two")
	const unauthorized = `spanpull_resolver_fallbacks_total{reason="unauthorized"}`
	before := metrics()
	n.pull(t, imgs[1].ref)
	if isLazy(t, n.cd, imgs[1].layer) {
		t.Fatal("second image lazy although the daemon's password is stale")
	}
	after := metrics()
	if metricDelta(before, after, unauthorized) != 1 || metricDelta(before, after, mFallbackNoIdx) != 0 {
		t.Fatalf("fallbacks: unauthorized %v -> %v, no_index %v -> %v; want +1 unauthorized",
			before[unauthorized], after[unauthorized], before[mFallbackNoIdx], after[mFallbackNoIdx])
	}
	if log := dirtest.ReadString(t, n.sn.Log); !strings.Contains(log, "fallback=unauthorized") {
		t.Fatalf("daemon log has no fallback=unauthorized line:\n%s", log)
	}

	// The config file changes; the daemon keeps running.
	pid := n.sn.Pid()
	writeDockerConfig(t, daemonDocker, reg.Addr, "alice", "two")
	n.readSums(t, imgs[0], "/data/b.bin") // spans not fetched before
	n.pull(t, imgs[2].ref)
	if !isLazy(t, n.cd, imgs[2].layer) {
		t.Fatal("third image not lazy after the config changed")
	}
	n.readSums(t, imgs[2], "/data/a.bin", "/data/b.bin")
	if n.sn.Pid() != pid || n.sn.Exited() {
		t.Fatal("the daemon restarted")
	}
}
