//go:build linux

package integration

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/ztoc"
)

var debianLayer struct {
	once sync.Once
	blob testenv.LayerBlob
	err  error
}

// lazyDebianLayer returns the Debian + python3 layer and its diff ID,
// building the layer with scripts/debian-layer.sh when it is missing.
func lazyDebianLayer(t testing.TB) testenv.LayerBlob {
	t.Helper()
	path := layertest.DebianLayer(t)
	debianLayer.once.Do(func() {
		b, err := os.ReadFile(path)
		if err != nil {
			debianLayer.err = err
			return
		}
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			debianLayer.err = err
			return
		}
		h := sha256.New()
		if _, err := io.Copy(h, zr); err != nil {
			debianLayer.err = err
			return
		}
		debianLayer.blob = testenv.LayerBlob{Blob: b, DiffID: digest.Digest("sha256:" + hex.EncodeToString(h.Sum(nil)))}
	})
	if debianLayer.err != nil {
		t.Fatal(debianLayer.err)
	}
	return debianLayer.blob
}

// lazyEnv is the whole lazy path on real parts: docker-registry holding
// the Debian + python3 image, spanpull's snapshotter daemon (started
// first) and a containerd (Debian's 1.6 unless newLazyEnvOn says
// otherwise) using it as the proxy plugin "spanpull".
type lazyEnv struct {
	dir        string
	reg        *testenv.Registry
	snapBin    string
	indexerBin string
	config     string
	sn         *testenv.Snapshotter
	cd         *testenv.Containerd
	layer      testenv.LayerBlob
	layerDesc  ocispec.Descriptor
	runs       int
}

// newLazyEnv starts everything, with Debian's containerd 1.6 and the
// daemon's config file content config (TOML).
func newLazyEnv(t *testing.T, config string) *lazyEnv {
	t.Helper()
	return newLazyEnvOn(t, config, testenv.StartContainerd16)
}

// newLazyEnvOn is newLazyEnv with the containerd that startContainerd
// starts (see TestLazyPythonContainerd2).
func newLazyEnvOn(t *testing.T, config string, startContainerd startContainerdFunc) *lazyEnv {
	t.Helper()
	e := newLazyBase(t, config)
	e.startSnapshotter(t)
	e.cd = startContainerd(t, e.dir, testenv.ContainerdConfig{
		Snapshotters: map[string]string{"spanpull": e.sn.Socket},
	})
	return e
}

// newLazyBase is the part of newLazyEnv that tests starting the daemon or
// containerd their own way share: the test directory, the Debian layer,
// the registry and the daemon and indexer binaries. Neither the daemon nor
// containerd is started.
func newLazyBase(t *testing.T, config string) *lazyEnv {
	t.Helper()
	testenv.RequireRoot(t)
	e := &lazyEnv{dir: testenv.Dir(t), config: config, layer: lazyDebianLayer(t)}
	e.layerDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip,
		Digest: digest.FromBytes(e.layer.Blob), Size: int64(len(e.layer.Blob))}
	e.reg = testenv.StartRegistryDaemon(t, e.dir)
	e.snapBin, e.indexerBin = testenv.BuildBinaries(t, e.dir)
	return e
}

// startSnapshotter (re)starts the daemon on the env's socket and root,
// with metrics on a free port.
func (e *lazyEnv) startSnapshotter(t *testing.T) {
	t.Helper()
	e.sn = testenv.StartSnapshotter(t, e.dir, testenv.SnapshotterConfig{Binary: e.snapBin, Config: e.config, Metrics: true})
}

// pushPython pushes the Debian + python3 image (OCI manifest,
// linux/amd64, Cmd python3) as repo:tag and returns its reference.
func (e *lazyEnv) pushPython(t *testing.T, repo, tag string) (string, ocispec.Descriptor) {
	t.Helper()
	return testenv.PushImage(t, e.reg.Addr, repo, tag, []string{"python3"}, e.layer)
}

// indexer runs an indexer CLI command (args[0]) against the env's
// registry, with plain HTTP and a zTOC cache in the test directory.
func (e *lazyEnv) indexer(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args = append(args[:1:1], append([]string{"--plain-http", "--cache-dir", filepath.Join(e.dir, "indexer-cache")}, args[1:]...)...)
	out, err := exec.CommandContext(ctx, e.indexerBin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("indexer %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// pull runs "snapshotter pull" against containerd and returns its report.
func (e *lazyEnv) pull(t *testing.T, ref string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, e.snapBin, "pull", "-a", e.cd.Socket, "-n", e.cd.Namespace, "--plain-http", ref).CombinedOutput()
	if err != nil {
		t.Fatalf("snapshotter pull %s: %v\n%s", ref, err, out)
	}
	t.Logf("snapshotter pull %s:\n%s", ref, out)
	return string(out)
}

// pullLazy pushes the Debian + python3 image as repo:src, converts it to
// repo:soci, pulls that with the snapshotter and checks the layer is
// mounted lazily. It returns the converted image's reference.
func (e *lazyEnv) pullLazy(t *testing.T, repo string) string {
	t.Helper()
	src, _ := e.pushPython(t, repo, "src")
	ref := e.reg.Addr + "/" + repo + ":soci"
	e.indexer(t, "convert", src, ref)
	if out := e.pull(t, ref); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	return ref
}

// run runs a container of ref with the spanpull snapshotter and returns
// its output, failing after timeout.
func (e *lazyEnv) run(ref string, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	e.runs++
	id := fmt.Sprintf("lazy-%d", e.runs)
	return e.cd.Run(ctx, append([]string{"run", "--rm", "--snapshotter", "spanpull", ref, id}, args...)...)
}

// pythonJSON is the container command of TestLazyPython and its output.
var (
	pythonJSON    = []string{"python3", "-c", `import json,sys; print(json.dumps({"v": sys.version_info[0]}))`}
	pythonJSONOut = `{"v": 3}`
)

// runPython runs pythonJSON in a container of ref and checks its output.
func (e *lazyEnv) runPython(t *testing.T, ref string) {
	t.Helper()
	out, err := e.run(ref, 2*time.Minute, pythonJSON...)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out) != pythonJSONOut {
		t.Fatalf("container printed %q, want %q", out, pythonJSONOut)
	}
}

// snapshotMode returns the spanpull mode label ("lazy", "unpacked", or ""
// when containerd unpacked the layer) of the Debian layer's committed
// snapshot, whose name is its chain ID: the layer's diff ID, as it is the
// image's only layer.
func (e *lazyEnv) snapshotMode(t *testing.T) string {
	t.Helper()
	out := e.cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "info", e.layer.DiffID.String())
	var info struct{ Labels map[string]string }
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("ctr snapshots info %s: %v\n%s", e.layer.DiffID, err, out)
	}
	return info.Labels[snapshotter.LabelMode]
}

// metrics scrapes the daemon's Prometheus metrics: series (name with
// labels, as printed) to value.
func (e *lazyEnv) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	m, err := testenv.ScrapeMetrics(context.Background(), e.sn.MetricsURL, "")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Series of the lazy read path.
const (
	mSpanBytes     = `spanpull_resolver_fetched_bytes_total{kind="span"}`
	mZtocBytes     = `spanpull_resolver_fetched_bytes_total{kind="ztoc"}`
	mSpansFetched  = `spanpull_resolver_spans_fetched_total`
	mVerifyFailed  = `spanpull_resolver_span_verify_failures_total`
	mCacheHits     = `spanpull_resolver_span_cache_hits_total`
	mReadErrors    = `spanpull_resolver_read_errors_total`
	mMountedLazy   = `spanpull_resolver_layers_mounted_total{mode="lazy"}`
	mFallbackNoIdx = `spanpull_resolver_fallbacks_total{reason="no_index"}`
)

// fuseMounts lists the FUSE mounts below the daemon's root.
func (e *lazyEnv) fuseMounts(t *testing.T) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(e.sn.Root))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		if strings.HasPrefix(m.FSType, "fuse") {
			out = append(out, m.Mountpoint)
		}
	}
	return out
}

// lazyMount returns the one FUSE mount serving the Debian layer.
func (e *lazyEnv) lazyMount(t *testing.T) string {
	t.Helper()
	ms := e.fuseMounts(t)
	if len(ms) != 1 {
		t.Fatalf("%d FUSE mounts below %s, want 1: %v", len(ms), e.sn.Root, ms)
	}
	return ms[0]
}

// ztocsDir and spansDir are where the daemon keeps zTOCs and cached spans.
func (e *lazyEnv) ztocsDir() string { return filepath.Join(e.sn.Root, "remote", "meta", "ztocs") }
func (e *lazyEnv) spansDir() string { return filepath.Join(e.sn.Root, "remote", "cache", "spans") }

// storedZtoc returns the zTOC the daemon stored for the Debian layer and
// its span table.
func (e *lazyEnv) storedZtoc(t *testing.T) (*ztoc.Ztoc, []ztoc.Span) {
	t.Helper()
	ents, err := os.ReadDir(e.ztocsDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 {
		t.Fatalf("%d zTOCs stored in %s, want 1", len(ents), e.ztocsDir())
	}
	b, err := os.ReadFile(filepath.Join(e.ztocsDir(), ents[0].Name()))
	if err != nil {
		t.Fatal(err)
	}
	// The daemon stores the blob it mounted the layer from: the pack head
	// of the zTOC when the index has one (the zTOC is then rebuilt with the
	// windows blob from the registry's storage), else the zTOC.
	z, err := ztoc.Unmarshal(b)
	if err != nil {
		h, herr := ztoc.UnmarshalPackHead(b)
		if herr != nil {
			t.Fatalf("stored blob is neither a zTOC (%v) nor a pack head (%v)", err, herr)
		}
		windows, err := os.ReadFile(e.reg.BlobPath(h.WindowsDigest))
		if err != nil {
			t.Fatal(err)
		}
		if z, _, err = h.Restore(windows); err != nil {
			t.Fatal(err)
		}
	}
	if z.CompressedArchiveSize != e.layerDesc.Size {
		t.Fatalf("stored zTOC is for a %d-byte layer, want %d", z.CompressedArchiveSize, e.layerDesc.Size)
	}
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	return z, spans
}

// cachedSpans returns the IDs of the Debian layer's spans in the span
// cache.
// keptWindows counts the checkpoint windows the daemon keeps on disk
// (fetched from packs' windows blobs), over all layers: files named by
// their span, not the temporary files of writes in progress.
func (e *lazyEnv) keptWindows(t *testing.T) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(filepath.Join(e.sn.Root, "remote", "windows"), func(_ string, d fs.DirEntry, err error) error {
		if os.IsNotExist(err) {
			return filepath.SkipDir
		}
		if err == nil && d.Type().IsRegular() && !strings.HasPrefix(d.Name(), atomicfile.TempPrefix) {
			n++
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (e *lazyEnv) cachedSpans(t *testing.T) map[ztoc.SpanID]bool {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.spansDir(), e.layerDesc.Digest.Encoded()))
	if os.IsNotExist(err) {
		return map[ztoc.SpanID]bool{}
	}
	if err != nil {
		t.Fatal(err)
	}
	ids := map[ztoc.SpanID]bool{}
	for _, en := range ents {
		if id, err := strconv.Atoi(en.Name()); err == nil {
			ids[ztoc.SpanID(id)] = true
		}
	}
	return ids
}

// removeImage removes ref (containers must be gone) and waits until
// containerd's garbage collector removed its snapshots and the daemon
// unmounted the FUSE layer and deleted the layer's zTOC and span cache:
// nothing may leak under --root/remote.
func (e *lazyEnv) removeImage(t *testing.T, ref string) {
	t.Helper()
	e.cd.MustRun(t, "image", "rm", "--sync", ref)
	deadline := time.Now().Add(60 * time.Second)
	for {
		snaps := e.cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "ls")
		spans, _ := os.ReadDir(e.spansDir())
		ztocs, _ := os.ReadDir(e.ztocsDir())
		mounts := e.fuseMounts(t)
		if strings.Count(strings.TrimSpace(snaps), "\n") == 0 && len(mounts) == 0 && len(spans) == 0 && len(ztocs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("60 s after image rm %s: FUSE mounts %v, %d span cache dirs, %d zTOCs left; snapshots:\n%s",
				ref, mounts, len(spans), len(ztocs), snaps)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// daemonLog returns everything the snapshotter daemons of the env logged.
func (e *lazyEnv) daemonLog(t *testing.T) string {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(e.dir, "snapshotter*.log"))
	var b strings.Builder
	for _, l := range logs {
		data, err := os.ReadFile(l)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(data)
	}
	return b.String()
}

// pushManifest pushes a manifest built from m under repo:tag.
func (e *lazyEnv) pushManifest(t *testing.T, repo, tag string, m any) string {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	registrytest.PushManifest(t, e.reg.Addr, repo, tag, ocispec.MediaTypeImageManifest, b)
	return e.reg.Addr + "/" + repo + ":" + tag
}

// fetchManifest fetches repo's image manifest reference from the
// registry.
func (e *lazyEnv) fetchManifest(t *testing.T, repo, reference string) ocispec.Manifest {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(e.fetchRaw(t, repo, reference), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// fetchRaw fetches repo's manifest or image index reference.
func (e *lazyEnv) fetchRaw(t *testing.T, repo, reference string) []byte {
	t.Helper()
	r := registrytest.Do(t, http.MethodGet, "http://"+e.reg.Addr+"/v2/"+repo+"/manifests/"+reference,
		http.Header{"Accept": {ocispec.MediaTypeImageManifest + ", " + ocispec.MediaTypeImageIndex}}, nil)
	if r.StatusCode != http.StatusOK {
		t.Fatalf("GET manifest %s:%s: %s %s", repo, reference, r.Status, r.Body)
	}
	return r.Body
}
