//go:build linux

package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/soci"
)

// daemonRecords says whether "snapshotter serve" feeds its access
// recorder (record.Store) from its FUSE filesystems and span engine and
// serves it on /record. Until it does, "record run" goes through the
// whole run and then fails to export, and this test checks exactly that.
// TODO(lead): set to true when serve wires the recorder.
const daemonRecords = true

// TestRecordRunPython is the CI step end to end on real parts: the Debian
// + python3 image in docker-registry, converted by the indexer CLI, then
// "snapshotter record run" with Debian's containerd 1.6: private
// containerd and daemon, lazy pull, python run until its output matches,
// the record exported, and everything stopped, unmounted and removed.
// The record must name the python layer, with spans inside it and
// python's files; "indexer prefetch attach" then publishes it, and the
// published artifact gives back the recorded order.
func TestRecordRunPython(t *testing.T) {
	testenv.RequireRoot(t)
	dir := testenv.Dir(t)
	reg := testenv.StartRegistryDaemon(t, dir)
	layer := lazyDebianLayer(t)
	src, _ := testenv.PushImage(t, reg.Addr, "py/rec", "src", []string{"python3"}, layer)
	snapBin, indexerBin := testenv.BuildBinaries(t, dir)
	ref := reg.Addr + "/py/rec:soci"
	runTool(t, indexerBin, "convert", "--plain-http", "--cache-dir", filepath.Join(dir, "indexer-cache"), src, ref)

	work := filepath.Join(dir, "w")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	recordRun := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		args = append([]string{"record", "run", "--plain-http", "--hosts-dir", "", "--containerd", testenv.Containerd16Binary, "--work-dir", work}, args...)
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, snapBin, args...)
		cmd.Stderr = &stderr
		err := cmd.Run()
		t.Logf("snapshotter %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
		checkRecordRunCleanedUp(t, work)
		return stderr.String(), err
	}

	// A start that never gets ready fails after --timeout, and cleans up
	// a running container too.
	out := filepath.Join(dir, "rec.json")
	stderr, err := recordRun("--ready", "^never$", "--timeout", "3s", "-o", out, ref, "--", "python3", "-c", "import time; print('up', flush=True); time.sleep(600)")
	if err == nil || !strings.Contains(stderr, `did not match "^never$" within 3s; its output ends:`+"\nup\n") {
		t.Fatalf("record run of a start that never gets ready: %v", err)
	}

	stderr, err = recordRun("--ready", `^\{"v": 3\}$`, "--timeout", "2m", "--name", "py", "-o", out,
		ref, "--", "python3", "-c", `import json,sys; print(json.dumps({"v": sys.version_info[0]}))`)
	if !strings.Contains(stderr, "layer "+digest.FromBytes(layer.Blob).String()+"  lazy\n") ||
		!strings.Contains(stderr, "ready after") || !strings.Contains(stderr, `{"v": 3}`) {
		t.Fatalf("record run did not pull lazily, run python and see it ready:\n%s", stderr)
	}
	if !daemonRecords {
		if err == nil || !strings.Contains(stderr, "serves no access records") {
			t.Fatalf("record run against a daemon that does not record: %v, want the export to fail saying so", err)
		}
		if _, err := os.Stat(out); !os.IsNotExist(err) {
			t.Fatalf("record run failed but wrote %s (%v)", out, err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	checkPythonRecord(t, ref, out)
	runTool(t, indexerBin, "prefetch", "attach", "--plain-http", ref, out)
	checkAttachedRecord(t, ref, out)
}

// runTool runs one of the built binaries and fails the test on error.
func runTool(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	b, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, b)
	}
	return string(b)
}

// checkRecordRunCleanedUp checks that record run left nothing in work: no
// directory, no mount, no process naming it.
func checkRecordRunCleanedUp(t *testing.T, work string) {
	t.Helper()
	if ents, err := os.ReadDir(work); err != nil || len(ents) != 0 {
		t.Errorf("record run left %v in %s (%v)", ents, work, err)
	}
	if ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(work)); err != nil || len(ms) != 0 {
		t.Errorf("record run left %d mounts below %s (%v)", len(ms), work, err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(work+"/")) {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			t.Errorf("process %d still runs from %s: %q", pid, work, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}
}

// pythonLayer returns the registry client of ref, the python layer, its
// zTOC (from the index) and the image's one SOCI index.
func pythonLayer(t *testing.T, ref string) (*registry.Repository, ocispec.Descriptor, *soci.LayerIndex, *index.Index) {
	t.Helper()
	ctx := context.Background()
	repo, err := registry.New(ref, registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	list, err := soci.List(ctx, repo)
	if err != nil || len(list) != 1 {
		t.Fatalf("indexes of %s: %v %v", ref, list, err)
	}
	ix, _, err := soci.FetchIndex(ctx, repo, list[0].Index)
	if err != nil {
		t.Fatal(err)
	}
	mb, _, err := repo.FetchManifest(ctx, list[0].Manifest.String())
	if err != nil {
		t.Fatal(err)
	}
	m, err := index.ParseImageManifest(mb)
	if err != nil {
		t.Fatal(err)
	}
	li, err := soci.LoadLayer(ctx, repo, ix, m.Layers[0], 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	return repo, m.Layers[0], li, ix
}

// readRecord reads the record file at path.
func readRecord(t *testing.T, path string) *record.Record {
	t.Helper()
	rec, err := record.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// checkPythonRecord checks the record file: the python layer, spans within
// it, python's files.
func checkPythonRecord(t *testing.T, ref, path string) {
	t.Helper()
	rec := readRecord(t, path)
	_, layer, li, _ := pythonLayer(t, ref)
	if rec.Name != "py" || rec.Empty() || len(rec.Layers) != 1 || rec.Layers[0].Digest != layer.Digest {
		t.Fatalf("record %s: name %q, layers %d (want the python layer %s)", path, rec.Name, len(rec.Layers), layer.Digest)
	}
	l := rec.Layers[0]
	for _, s := range l.Spans {
		if int(s.ID) >= li.Ztoc.NumSpans() {
			t.Errorf("recorded span %d is beyond the layer's %d spans", s.ID, li.Ztoc.NumSpans())
		}
	}
	python := regexp.MustCompile(`^/usr/(bin/python3\.\d+|lib/x86_64-linux-gnu/libpython3\.\d+\.so.*|lib/python3\.\d+/.*)$`)
	if !slices.ContainsFunc(l.Files, func(f record.File) bool { return python.MatchString(f.Path) }) {
		t.Errorf("the record's %d files name neither python3.x nor its libraries: %v", len(l.Files), l.Files)
	}
	t.Logf("record: %d spans of %d, %d files", len(l.Spans), li.Ztoc.NumSpans(), len(l.Files))
}

// checkAttachedRecord checks that the image's index now has the record as
// prefetch artifact, in the recorded order.
func checkAttachedRecord(t *testing.T, ref, path string) {
	t.Helper()
	rec := readRecord(t, path)
	repo, layer, li, ix := pythonLayer(t, ref)
	ids, err := soci.LoadPrefetch(context.Background(), repo, ix, layer.Digest, rec.Name, li.Ztoc.NumSpans())
	if err != nil || !slices.Equal(ids, rec.Layers[0].SpanIDs()) {
		t.Fatalf("published prefetch order %v (%v), recorded %v", ids, err, rec.Layers[0].SpanIDs())
	}
}
