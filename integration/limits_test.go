//go:build linux

package integration

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/ztoc"
)

// Tests of the limits a node daemon that runs for months must keep: how
// long a read waits for a registry, how much disk and memory lazy layers
// take.

// timeoutFetchSeconds is the fetch timeout of TestTimeout.
const timeoutFetchSeconds = 2

// TestTimeoutHungRegistry reads a lazy layer through a registry that
// accepts connections and never answers (the fault proxy holds every blob
// request): a read of an uncached file must fail with EIO after
// fetch_timeout_seconds, not a multiple of it (the kernel's retry of the
// failed read, the per-file header check and the span's window must not
// each wait for a fetch of their own). The same read succeeds once the
// registry answers again.
func TestTimeoutHungRegistry(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_rate_bytes = -1\nfetch_timeout_seconds = 2\n")
	proxy := registrytest.StartFaultProxy(t, e.reg.Addr)
	src, _ := e.pushPython(t, "py/hung", "src")
	e.indexer(t, "convert", src, e.reg.Addr+"/py/hung:soci")
	// The daemon reaches the registry through the proxy only.
	ref := proxy.Addr + "/py/hung:soci"
	if out := e.pull(t, ref); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	mnt := e.lazyMount(t)
	z, spans := e.storedZtoc(t)
	byspan := spanFiles(z, spans)
	read := func(f ztoc.FileMetadata) ([]byte, error) {
		return os.ReadFile(filepath.Join(mnt, ztoc.CleanPath(f.Name)))
	}
	timeout := timeoutFetchSeconds * time.Second
	limit := timeout * 3 / 2

	// Files in distinct spans, none of them read before.
	var files []ztoc.FileMetadata
	for i := 1; i < len(spans)-1 && len(files) < 3; i += len(spans) / 4 {
		if fs := byspan[spans[i].ID]; len(fs) > 0 {
			files = append(files, fs[len(fs)-1])
		}
	}
	if len(files) < 3 {
		t.Fatalf("found %d files in distinct spans, want 3", len(files))
	}
	hung := registrytest.Faults{Match: registrytest.MatchBlobGET, Latency: 10 * time.Minute}
	proxy.Set(hung)
	for _, f := range files[:2] {
		elapsed := readFailsEIO(t, read, f, "hung")
		if elapsed < timeout || elapsed >= limit {
			t.Fatalf("read of %s failed after %v, want between the fetch timeout %v and %v", f.Name, elapsed, timeout, limit)
		}
	}
	proxy.Set(registrytest.Faults{})
	f := files[2]
	b, err := read(f)
	if err != nil || !bytes.Equal(b, fileBytes(t, z, e.layer.Blob, f)) {
		t.Fatalf("read %s once the registry answers: %v", f.Name, err)
	}
}
