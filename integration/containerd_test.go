//go:build linux

package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
)

// TestContainerd16PullRun proves the non-lazy path end to end on Debian's
// containerd 1.6: with spanpull as a proxy snapshotter, "ctr image pull"
// unpacks a real image into it and "ctr run" runs a container from it.
// Removing the image must let containerd's garbage collector remove every
// snapshot through the snapshotter, leaving its snapshot directory empty.
func TestContainerd16PullRun(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)

	bin := testenv.BuildGo(t, dir, "github.com/spanpull/spanpull/cmd/snapshotter", "snapshotter")
	reg := testenv.StartRegistry(t)
	const msg = "hello from a spanpull snapshot"
	ref, _ := testenv.PushImage(t, reg, "e2e/hello", "v1", []string{"/hello"},
		testenv.HelloLayer(t, msg, testenv.Entry{Name: "etc/motd", Data: []byte("first layer\n")}),
		layerOf(t, testenv.Entry{Name: "etc/motd", Data: []byte("second layer wins\n")}))

	sn := testenv.StartSnapshotter(t, dir, testenv.SnapshotterConfig{Binary: bin})
	cd := testenv.StartContainerd16(t, dir, testenv.ContainerdConfig{
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

	// Upper layers win over lower ones.
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
