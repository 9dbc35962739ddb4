//go:build linux

package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/integration/testenv"
)

// TestLazyUnpacksLayersWithoutZtoc: in an indexed image, a layer the
// index has no zTOC for (here: below --min-layer-size) is downloaded,
// verified and unpacked by the snapshotter itself, so containerd fetches
// no layer at all; the container sees both layers, the upper one on top.
func TestLazyUnpacksLayersWithoutZtoc(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_rate_bytes = -1\n")
	top := testenv.HelloLayer(t, "unused", testenv.Entry{Name: "etc/spanpull-top.txt", Data: []byte("from the small top layer\n")})
	topDigest := digest.FromBytes(top.Blob)
	src, _ := testenv.PushImage(t, e.reg.Addr, "py/twolayers", "src", []string{"python3"}, e.layer, top)
	dst := e.reg.Addr + "/py/twolayers:soci"
	out := e.indexer(t, "convert", src, dst)
	if !strings.Contains(out, "skipped") {
		t.Fatalf("indexer did not skip the small layer:\n%s", out)
	}

	report := e.pull(t, dst)
	if !hasLine(report, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("bottom layer not lazy:\n%s", report)
	}
	if !hasLine(report, "layer", "2", topDigest.String(), "unpacked") {
		t.Fatalf("top layer not unpacked by the snapshotter:\n%s", report)
	}
	content := e.cd.MustRun(t, "content", "ls", "-q")
	for _, d := range []digest.Digest{e.layerDesc.Digest, topDigest} {
		if strings.Contains(content, d.String()) {
			t.Fatalf("layer blob %s is in containerd's content store:\n%s", d, content)
		}
	}
	got, err := e.run(dst, 2*time.Minute, "python3", "-c", "print(open('/etc/spanpull-top.txt').read().strip()); import json; print('ok')")
	if err != nil {
		t.Fatalf("run: %v\n%s", err, got)
	}
	if !strings.Contains(got, "from the small top layer") || !strings.Contains(got, "ok") {
		t.Fatalf("container output %q: want the top layer's file and python's output", got)
	}
	if m := e.metrics(t); m[`spanpull_resolver_layers_mounted_total{mode="unpacked"}`] != 1 {
		t.Fatalf("layers unpacked: %v, want 1", m[`spanpull_resolver_layers_mounted_total{mode="unpacked"}`])
	}
	e.removeImage(t, dst)
}
