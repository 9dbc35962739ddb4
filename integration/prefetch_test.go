//go:build linux

package integration

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// prefetchConfig turns background fill off, so that every span a node
// fetches is one a read or the recorded prefetch asked for, and the span
// cache shows which.
const prefetchConfig = "[remote]\nfill_rate_bytes = -1\n"

// Series of recorded prefetch.
const (
	mPrefetchFetches  = `spanpull_resolver_class_span_fetches_total{class="prefetch"}`
	mPrefetchFailures = `spanpull_resolver_class_fetch_failures_total{class="prefetch"}`
	mDemandFetches    = `spanpull_resolver_class_span_fetches_total{class="demand"}`
	mPrefetchHits     = `spanpull_resolver_prefetched_spans_total{outcome="hit"}`
	mPrefetchWaste    = `spanpull_resolver_prefetched_spans_total{outcome="waste"}`
	mWindowBytes      = `spanpull_resolver_fetched_bytes_total{kind="window"}`
)

// TestPrefetchRecordedPython is recorded prefetch end to end on real
// parts: python's start is recorded by a node's daemon and exported with
// "snapshotter record export", published with "indexer prefetch attach"
// on a SOCI index v2 (new image digest) and v1 (new referrer), and a
// FRESH node (new daemon root, new containerd) pulling either image
// prefetches exactly the recorded spans with their windows, runs python
// right, and reads the prefetched spans (hits) instead of fetching them.
// With range reads slowed down, a node that runs python at once, while
// the prefetch goes on, starts it no slower than without prefetch, even
// when the prefetch names only spans python does not read: demand reads
// go first.
func TestPrefetchRecordedPython(t *testing.T) {
	e := newLazyEnv(t, prefetchConfig)
	src, _ := e.pushPython(t, "py/pf", "src")
	v2 := e.reg.Addr + "/py/pf:soci"
	e.indexer(t, "convert", src, v2)
	e.indexer(t, "create", src)
	// The SOCI-enabled image without prefetch, for the baseline.
	registrytest.PushManifest(t, e.reg.Addr, "py/pf", "base", ocispec.MediaTypeImageIndex, e.fetchRaw(t, "py/pf", "soci"))
	base := e.reg.Addr + "/py/pf:base"

	// Record python's start on this node, and export the record.
	if out := e.pull(t, v2); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	e.runPython(t, v2)
	recPath := filepath.Join(e.dir, "rec.json")
	runTool(t, e.snapBin, "record", "export", "--metrics-address", metricsAddress(t, e.sn), "--name", "py", "-o", recPath, v2)
	checkPythonRecord(t, v2, recPath)
	rec := readRecord(t, recPath)
	recorded := rec.Layers[0].SpanIDs()

	// Publish it: v2 moves the tag to a new image digest, v1 pushes a
	// referrer of src that supersedes the index "indexer create" pushed
	// (the record was made with the v2 image's manifest, which has the
	// same layers).
	out := runTool(t, e.indexerBin, "prefetch", "attach", "--plain-http", v2, recPath)
	if !strings.Contains(out, "new SOCI-enabled image digest") {
		t.Fatalf("attach to the v2 image:\n%s", out)
	}
	if out := runTool(t, e.indexerBin, "prefetch", "attach", "--plain-http", src, recPath); !strings.Contains(out, "same layers") {
		t.Fatalf("attach to the v1 image says nothing of the record's other manifest:\n%s", out)
	}
	for _, ref := range []string{v2, src} {
		checkAttachedRecord(t, ref, recPath)
		checkUpstreamPrefetch(t, ref, e.layerDesc.Digest, 1)
	}

	for _, c := range []struct{ name, ref string }{{"v2", v2}, {"v1", src}} {
		t.Run(c.name, func(t *testing.T) {
			n := e.freshNode(t, prefetchConfig)
			checkPrefetchedStart(t, n, c.ref, "py", recorded)
		})
	}
	t.Run("demand-first", func(t *testing.T) {
		// The same image again, with a prefetch of every span python does
		// not read: pure competition for its demand reads.
		registrytest.PushManifest(t, e.reg.Addr, "py/pf", "waste", ocispec.MediaTypeImageIndex, e.fetchRaw(t, "py/pf", "base"))
		waste := e.reg.Addr + "/py/pf:waste"
		var unread []ztoc.SpanID
		for id := range ztoc.SpanID(indexedZtoc(t, v2, e.layerDesc.Digest).NumSpans()) {
			if !slices.Contains(recorded, id) {
				unread = append(unread, id)
			}
		}
		wastePath := writePrefetchRecord(t, e.dir, "waste", waste, rec.Image.Manifest, e.layerDesc.Digest, unread)
		runTool(t, e.indexerBin, "prefetch", "attach", "--plain-http", waste, wastePath)
		checkDemandFirst(t, e.freshNode(t, prefetchConfig), e.reg.Addr, base, v2, waste)
	})
}

// TestPrefetchFiles: a SOCI-style hand list of files (indexer prefetch
// attach --files) prefetches the spans of those files' tar headers and
// data, on a node that selects the list by name among two.
func TestPrefetchFiles(t *testing.T) {
	e := newLazyEnv(t, prefetchConfig+"prefetch = \"boot\"\n")
	src, _ := e.pushPython(t, "py/files", "src")
	ref := e.reg.Addr + "/py/files:soci"
	e.indexer(t, "convert", src, ref)
	z := indexedZtoc(t, ref, e.layerDesc.Digest)

	// python itself and the json package (its sources and compiled
	// modules): regular files of the layer.
	pick := regexp.MustCompile(`^/usr/(bin/python3\.\d+|lib/python3\.\d+/json/.*)$`)
	var paths []string
	for _, f := range z.Files {
		if f.Type == ztoc.TypeReg && pick.MatchString(record.CleanPath(f.Name)) {
			paths = append(paths, record.CleanPath(f.Name))
		}
	}
	if len(paths) < 3 {
		t.Fatalf("the layer has %d files of python and its json package: %v", len(paths), paths)
	}
	want := fileSpans(t, z, paths)
	// Another workload's list first, so that it is the one a node that
	// names none would take: a file of the layer's last span.
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	last := ztoc.SpanID(z.NumSpans() - 1)
	other := ""
	for i, f := range z.Files {
		if first, end := fileSpanRange(t, z, spans, i); f.Type == ztoc.TypeReg && first == last && end == last {
			other = record.CleanPath(f.Name)
		}
	}
	if other == "" || slices.Contains(want, last) {
		t.Fatalf("no file of the last span (%q) apart from the listed ones", other)
	}
	attachFiles := func(name string, paths ...string) {
		list := filepath.Join(e.dir, name+".txt")
		if err := os.WriteFile(list, []byte("# workload "+name+"\n"+strings.Join(paths, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		runTool(t, e.indexerBin, "prefetch", "attach", "--plain-http", "--name", name, "--files", list, ref)
	}
	attachFiles("other", other)
	attachFiles("boot", paths...)
	checkUpstreamPrefetch(t, ref, e.layerDesc.Digest, 2)
	t.Logf("%d files listed: %d spans of %d", len(paths), len(want), z.NumSpans())
	checkPrefetchedStart(t, e, ref, "boot", want)
}

// TestPrefetchRefusedAndCorrupt: "indexer prefetch attach" refuses a
// record naming spans beyond the layer or a layer the image does not have,
// saying so and pushing nothing; a prefetch artifact corrupted in the
// registry is ignored by the daemon with a log line, and the image is
// still lazy and runs.
func TestPrefetchRefusedAndCorrupt(t *testing.T) {
	e := newLazyEnv(t, prefetchConfig)
	src, _ := e.pushPython(t, "py/bad", "src")
	ref := e.reg.Addr + "/py/bad:soci"
	e.indexer(t, "convert", src, ref)
	repo, layer, li, _ := pythonLayer(t, ref)
	before, err := soci.List(context.Background(), repo)
	if err != nil {
		t.Fatal(err)
	}
	n := li.Ztoc.NumSpans()
	for _, c := range []struct {
		name  string
		layer digest.Digest
		spans []ztoc.SpanID
		want  string
	}{
		{"beyond", layer.Digest, []ztoc.SpanID{0, ztoc.SpanID(n)}, fmt.Sprintf("span %d is beyond the layer's %d spans", n, n)},
		{"other-layer", digest.FromString("another layer"), []ztoc.SpanID{0}, "is not a layer of image manifest " + before[0].Manifest.String()},
	} {
		path := writePrefetchRecord(t, e.dir, c.name, ref, before[0].Manifest, c.layer, c.spans)
		b, err := exec.Command(e.indexerBin, "prefetch", "attach", "--plain-http", ref, path).CombinedOutput()
		if err == nil || !strings.Contains(string(b), c.want) {
			t.Errorf("attach of a record naming %s: %v, want an error saying %q:\n%s", c.name, err, c.want, b)
		}
		t.Logf("attach of a record naming %s: %s", c.name, strings.TrimSpace(string(b)))
	}
	after, err := soci.List(context.Background(), repo)
	if err != nil || len(after) != 1 || after[0].Index.Digest != before[0].Index.Digest || after[0].Prefetches != 0 {
		t.Fatalf("after the refused attaches the image has indexes %+v (%v), want only %s", after, err, before[0].Index.Digest)
	}

	// A good artifact, then corrupted in the registry's storage.
	list := filepath.Join(e.dir, "paths.txt")
	if err := os.WriteFile(list, []byte(pythonBinary(t, li)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	runTool(t, e.indexerBin, "prefetch", "attach", "--plain-http", "--files", list, ref)
	_, _, _, ix := pythonLayer(t, ref)
	p, ok := ix.Prefetch(record.DefaultName, layer.Digest)
	if !ok {
		t.Fatal("attach --files published no prefetch artifact")
	}
	blobPath := e.reg.BlobPath(p.Blob.Digest)
	b, err := os.ReadFile(blobPath)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x20
	if err := os.WriteFile(blobPath, b, 0o644); err != nil {
		t.Fatal(err)
	}

	if out := e.pull(t, ref); !hasLine(out, "layer", "1", layer.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy with a corrupt prefetch artifact:\n%s", out)
	}
	logged := regexp.MustCompile(`level=warning msg="spanpull: recorded prefetch ignored".*` + regexp.QuoteMeta(p.Blob.Digest.String()))
	line := logged.FindString(e.daemonLog(t))
	if line == "" {
		t.Errorf("the daemon did not log that it ignored prefetch artifact %s", p.Blob.Digest)
	}
	t.Logf("the daemon logged: %s", line)
	e.runPython(t, ref)
	m := e.metrics(t)
	if m[mPrefetchFetches] != 0 || m[mDemandFetches] == 0 {
		t.Errorf("with a corrupt artifact: %v prefetch and %v demand fetches, want none and some", m[mPrefetchFetches], m[mDemandFetches])
	}
}

// freshNode starts another node on the env's registry: a new snapshotter
// daemon (new root, log and metrics) with config, and a new containerd
// 1.6 using it. Use the env itself for the indexer.
func (e *lazyEnv) freshNode(t *testing.T, config string) *lazyEnv {
	t.Helper()
	n := &lazyEnv{dir: testenv.Dir(t), reg: e.reg, snapBin: e.snapBin, indexerBin: e.indexerBin, config: config,
		layer: e.layer, layerDesc: e.layerDesc}
	n.startSnapshotter(t)
	n.cd = testenv.StartContainerd16(t, n.dir, testenv.ContainerdConfig{Snapshotters: map[string]string{"spanpull": n.sn.Socket}})
	return n
}

// The daemon's debug lines about a layer's recorded prefetch.
var (
	prefetchStartRE = regexp.MustCompile(`msg="spanpull: recorded prefetch" .*name=(\S+) spans=(\d+)`)
	prefetchDoneRE  = regexp.MustCompile(`msg="spanpull: recorded prefetch done" .*spans=(\d+)`)
)

// waitPrefetch waits until the node's daemon logged that the recorded
// prefetch of its one lazy layer is done, and returns the prefetch's name
// and span count as it logged them.
func (e *lazyEnv) waitPrefetch(t *testing.T) (name string, spans int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		log := e.daemonLog(t)
		start := prefetchStartRE.FindAllStringSubmatch(log, -1)
		if len(start) > 1 {
			t.Fatalf("the daemon prefetched %d times, want once:\n%s", len(start), log)
		}
		if len(start) == 1 && prefetchDoneRE.MatchString(log) {
			spans, _ := strconv.Atoi(start[0][2])
			return start[0][1], spans
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recorded prefetch done within a minute of the pull (started: %v)", start)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkPrefetchedStart pulls ref on node n (which pulled nothing before),
// waits for its prefetch, checks that it fetched exactly the spans want
// (prefetch named name), runs python, and checks that the prefetched
// spans were read (hits) and that, once the image is removed, every
// prefetched span counts as a hit or as waste.
func checkPrefetchedStart(t *testing.T, n *lazyEnv, ref, name string, want []ztoc.SpanID) {
	t.Helper()
	start := time.Now()
	if out := n.pull(t, ref); !hasLine(out, "layer", "1", n.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	gotName, count := n.waitPrefetch(t)
	prefetched := time.Since(start)
	m := n.metrics(t)
	if gotName != name || count != len(want) || int(m[mPrefetchFetches]) != len(want) || m[mPrefetchFailures] != 0 || m[mDemandFetches] != 0 {
		t.Fatalf("prefetch %q of %d spans, %v fetches (%v failed), %v demand fetches; want prefetch %q of the %d recorded spans, each fetched once, nothing else",
			gotName, count, m[mPrefetchFetches], m[mPrefetchFailures], m[mDemandFetches], name, len(want))
	}
	if cached := slices.Sorted(maps.Keys(n.cachedSpans(t))); !slices.Equal(cached, sortedIDs(want)) {
		t.Fatalf("spans cached after the prefetch:\n%v\nwant the prefetched ones:\n%v", cached, sortedIDs(want))
	}
	windows := m[mWindowBytes]
	if slices.Max(want) > 0 && windows == 0 {
		t.Fatal("the prefetch fetched no window: the first read of each prefetched span waits on the registry for it")
	}
	runStart := time.Now()
	n.runPython(t, ref)
	run := time.Since(runStart)
	m = n.metrics(t)
	hits, demand := m[mPrefetchHits], m[mDemandFetches]
	if hits == 0 {
		t.Fatalf("python read none of the %d prefetched spans", len(want))
	}
	if demand == 0 && m[mWindowBytes] != windows {
		t.Fatalf("python fetched nothing on demand but %v window bytes: the prefetch left windows behind", m[mWindowBytes]-windows)
	}
	n.removeImage(t, ref)
	waste := n.metrics(t)[mPrefetchWaste]
	if int(hits+waste) != len(want) {
		t.Fatalf("prefetched spans: %v hits + %v waste, want %d", hits, waste, len(want))
	}
	t.Logf("%s: %d spans prefetched in %s after the pull started; python ran in %s: %v hits, %v waste, %v demand fetches",
		ref, len(want), prefetched.Round(time.Millisecond), run.Round(time.Millisecond), hits, waste, demand)
}

// demandLatency is added to every range read of a blob (span bytes and
// windows) in checkDemandFirst, so that the prefetch is still in flight
// when python reads.
const demandLatency = 100 * time.Millisecond

// checkDemandFirst runs python on node n right after each pull through a
// proxy of the registry at addr that delays range reads by demandLatency,
// so that python's reads meet the prefetch in flight: alternately from
// base (no prefetch), ref (the recorded prefetch) and waste (a prefetch of
// the spans python does not read). Best of rounds, the runs with prefetch
// are not slower than those without, within noise: demand reads go first.
func checkDemandFirst(t *testing.T, n *lazyEnv, addr, base, ref, waste string) {
	t.Helper()
	px := registrytest.StartFaultProxy(t, addr)
	px.Set(registrytest.Faults{Match: func(r *http.Request) bool { return r.Header.Get("Range") != "" }, Latency: demandLatency})
	const rounds = 2
	best := map[string]time.Duration{}
	demand, prefetch := map[string]float64{}, map[string]float64{}
	for range rounds {
		for _, r := range []string{base, ref, waste} {
			pr := strings.Replace(r, addr, px.Addr, 1)
			before := n.metrics(t)
			n.pull(t, pr)
			start := time.Now()
			n.runPython(t, pr)
			d := time.Since(start)
			after := n.metrics(t)
			t.Logf("%s: python ran in %s", r, d.Round(time.Millisecond))
			if best[r] == 0 || d < best[r] {
				best[r] = d
			}
			demand[r] += (after[mDemandFetches] - before[mDemandFetches]) / rounds
			prefetch[r] += (after[mPrefetchFetches] - before[mPrefetchFetches]) / rounds
			n.removeImage(t, pr)
		}
	}
	for _, r := range []string{base, ref, waste} {
		t.Logf("%s: python ran in %s (best of %d) after a pull, with %v demand and %v prefetch fetches",
			r, best[r].Round(time.Millisecond), rounds, demand[r], prefetch[r])
	}
	if demand[base] == 0 || prefetch[base] != 0 || prefetch[ref] == 0 || prefetch[waste] == 0 {
		t.Fatal("want demand fetches and no prefetch without prefetch, and prefetch fetches with it")
	}
	limit := best[base]*5/4 + 300*time.Millisecond
	for _, r := range []string{ref, waste} {
		if best[r] > limit {
			t.Errorf("python ran in %s with the prefetch of %s, %s without: demand reads waited behind the prefetch (limit %s)", best[r], r, best[base], limit)
		}
	}
}

// checkUpstreamPrefetch checks the SOCI index of ref against what SOCI
// reads (SOCI-FORMAT.md §1.10, through socitest's independent checks):
// the index's layers in SOCI's order with the layer annotation, and each
// of its want prefetch blobs for layer in SOCI's encoding.
func checkUpstreamPrefetch(t *testing.T, ref string, layer digest.Digest, want int) {
	t.Helper()
	repo, _, _, _ := pythonLayer(t, ref)
	list, err := soci.List(context.Background(), repo)
	if err != nil || len(list) != 1 {
		t.Fatalf("indexes of %s: %v %v", ref, list, err)
	}
	host, name := hostAndName(repo)
	b, _, ok := socitest.Manifest(t, host, name, list[0].Index.Digest.String())
	if !ok {
		t.Fatalf("index %s not in %s", list[0].Index.Digest, name)
	}
	m := socitest.CheckSOCIReadable(t, b, []digest.Digest{layer})
	ps := socitest.PrefetchDescriptors(m)
	if len(ps) != want {
		t.Fatalf("index %s has %d prefetch descriptors, want %d", list[0].Index.Digest, len(ps), want)
	}
	for _, p := range ps {
		if p.Annotations[index.AnnotationImageLayerDigest] != layer.String() {
			t.Errorf("prefetch descriptor %s names layer %q, want %s", p.Digest, p.Annotations[index.AnnotationImageLayerDigest], layer)
		}
		socitest.CheckPrefetchBlob(t, socitest.Blob(t, host, name, p.Digest))
	}
}

// indexedZtoc returns the whole zTOC (with its TOC) of layer in ref's
// SOCI index, as pushed.
func indexedZtoc(t *testing.T, ref string, layer digest.Digest) *ztoc.Ztoc {
	t.Helper()
	repo, _, _, ix := pythonLayer(t, ref)
	d, ok := ix.Ztoc(layer)
	if !ok {
		t.Fatalf("layer %s is not indexed", layer)
	}
	host, name := hostAndName(repo)
	return socitest.FetchZtoc(t, host, name, d)
}

// hostAndName splits repo's name into the registry's host:port and the
// repository's name in it, as socitest takes them.
func hostAndName(repo *registry.Repository) (host, name string) {
	host, name, _ = strings.Cut(repo.Name(), "/")
	return host, name
}

// fileSpans returns the spans holding the tar headers and data of the
// listed regular files of z (see fileSpanRange).
func fileSpans(t *testing.T, z *ztoc.Ztoc, paths []string) []ztoc.SpanID {
	t.Helper()
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	ids := map[ztoc.SpanID]bool{}
	for i, f := range z.Files {
		if !slices.Contains(paths, record.CleanPath(f.Name)) {
			continue
		}
		first, last := fileSpanRange(t, z, spans, i)
		for id := first; id <= last; id++ {
			ids[id] = true
		}
	}
	return slices.Sorted(maps.Keys(ids))
}

// fileSpanRange returns the first and last of spans (z's) holding the tar
// header and data of z.Files[i]: from the end of the data of the entry
// before it (rounded up to a tar block) through its last data byte.
func fileSpanRange(t *testing.T, z *ztoc.Ztoc, spans []ztoc.Span, i int) (first, last ztoc.SpanID) {
	t.Helper()
	f := z.Files[i]
	var start int64
	if i > 0 {
		prev := z.Files[i-1]
		start = (prev.UncompressedOffset + prev.UncompressedSize + 511) &^ 511
	}
	end := max(f.UncompressedOffset+f.UncompressedSize-1, start)
	first, ok1 := ztoc.SpanForOffset(spans, start)
	last, ok2 := ztoc.SpanForOffset(spans, end)
	if !ok1 || !ok2 {
		t.Fatalf("%s [%d, %d] is in no span", f.Name, start, end)
	}
	return first, last
}

// pythonBinary returns the path of python3.x in the layer of li.
func pythonBinary(t *testing.T, li *soci.LayerIndex) string {
	t.Helper()
	re := regexp.MustCompile(`^/usr/bin/python3\.\d+$`)
	var found string
	err := li.Files(func(f *ztoc.FileMetadata) error {
		if p := record.CleanPath(f.Name); f.Type == ztoc.TypeReg && re.MatchString(p) {
			found = p
		}
		return nil
	})
	if err != nil || found == "" {
		t.Fatalf("no python3.x in the layer (%v)", err)
	}
	return found
}

// writePrefetchRecord writes a record named name of one start of ref
// (image manifest m) that read spans of layer, as a file in dir.
func writePrefetchRecord(t *testing.T, dir, name, ref string, m, layer digest.Digest, spans []ztoc.SpanID) string {
	t.Helper()
	l := record.Layer{Digest: layer, Files: []record.File{{Path: "/usr/bin/python3", AtMicros: 1}}}
	for i, id := range spans {
		l.Spans = append(l.Spans, record.Span{ID: id, AtMicros: int64(10 * (i + 1))})
	}
	rec := &record.Record{Version: record.Version, Name: name, Image: record.Image{Reference: ref, Manifest: m}, Layers: []record.Layer{l}}
	path := filepath.Join(dir, name+".json")
	if err := record.WriteFile(path, rec); err != nil {
		t.Fatal(err)
	}
	return path
}

// metricsAddress is the host:port the daemon serves metrics (and records)
// on.
func metricsAddress(t *testing.T, sn *testenv.Snapshotter) string {
	t.Helper()
	u, err := url.Parse(sn.MetricsURL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

// sortedIDs returns a sorted copy of ids.
func sortedIDs(ids []ztoc.SpanID) []ztoc.SpanID {
	return slices.Sorted(slices.Values(ids))
}
