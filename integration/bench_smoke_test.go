//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
)

// TestBenchSmoke runs the lazy-pull benchmark harness (./bench, a module
// of its own) in its smallest configuration: the python workload,
// unshaped, one cold run of every mode (full, lazy, lazy+prefetch with
// its record made and attached, lazy-nofill, lazy-noverify) and one pass
// of the read benchmark. It proves the whole harness works (network
// namespace, registry, delay proxy and its request counts, snapshotter,
// containerd 1.6, record run and prefetch attach, mounting both rootfs
// views, report, charts), that the numbers it reports are sane and that
// each mode runs with its setting, and that it leaves nothing behind.
func TestBenchSmoke(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "bench")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = "bench"
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build in ./bench: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "out")
	tmp := filepath.Join(dir, "tmp")
	if err := os.Mkdir(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-smoke", "-out", out, "-tmp", tmp)
	cmd.WaitDelay = 30 * time.Second
	start := time.Now()
	b, err := cmd.CombinedOutput()
	t.Logf("bench -smoke took %v", time.Since(start).Round(time.Second))
	if err != nil {
		t.Fatalf("bench -smoke: %v\n%s", err, b)
	}
	if !strings.Contains(string(b), "### python image (64.0 MB compressed), unshaped") {
		t.Errorf("printed markdown lacks the python table:\n%s", b)
	}

	rep := readSmokeReport(t, filepath.Join(out, "results.json"))
	image := rep.Images["python"].Bytes
	if image < 30e6 {
		t.Fatalf("python image is %d bytes; the cached Debian + python3 layer is about 64 MB", image)
	}
	byMode := map[string]smokeRun{}
	for _, r := range rep.Runs {
		checkSmokeRun(t, r, image)
		byMode[r.Mode] = r
	}
	if len(rep.Runs) != 5 || len(byMode) != 5 {
		t.Fatalf("%d runs in modes %v, want one in each of the 5 modes", len(rep.Runs), byMode)
	}
	checkSmokeModes(t, byMode)
	if len(rep.Cells) != 1 || len(rep.Cells[0].Modes) != 5 {
		t.Fatalf("cells %+v", rep.Cells)
	}
	for _, m := range rep.Cells[0].Modes {
		if m.TimeRatio <= 0 || m.Percent <= 0 || (m.Mode != "full" && m.Percent >= 100) {
			t.Errorf("cell of %s: %+v", m.Mode, m)
		}
	}
	checkSmokeRead(t, rep)
	if rep.Machine.Kernel == "" || !strings.Contains(rep.Machine.Containerd, "1.6") {
		t.Errorf("machine %+v", rep.Machine)
	}
	md, err := os.ReadFile(filepath.Join(out, "bench-lazy.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| mode | runs | ready (s) | x full |", "| lazy+prefetch | 1 |", "| python | spanpull |",
		"### Targets set by the issues", "### Machine", "![time-python](time-python.png)", "![read](read.png)"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("bench-lazy.md lacks %q", want)
		}
	}
	for _, n := range []string{"time-python.png", "bytes.png", "read.png"} {
		f, err := os.Open(filepath.Join(out, n))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := png.DecodeConfig(f); err != nil {
			t.Errorf("%s: %v", n, err)
		}
		f.Close()
	}

	// Nothing left behind: the temporary directory is gone, and so are
	// the network namespace and mounts.
	if ents, err := os.ReadDir(tmp); err != nil || len(ents) != 0 {
		t.Errorf("left in %s: %v %v", tmp, ents, err)
	}
	ns := fmt.Sprintf("spbench-%d", cmd.Process.Pid)
	b, err = exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(string(b)) {
		if f == ns {
			t.Errorf("network namespace %s left behind", ns)
		}
	}
}

// The parts of results.json the smoke test checks.
type (
	smokeStats struct {
		Down, Requests, RangeGets int64
	}
	smokeRun struct {
		Mode           string             `json:"mode"`
		ReadySeconds   float64            `json:"ready_s"`
		PullSeconds    float64            `json:"pull_s"`
		ReadyLine      string             `json:"ready_line"`
		Before         smokeStats         `json:"before_ready"`
		Exit           smokeStats         `json:"at_exit"`
		MetricsAtReady map[string]float64 `json:"snapshotter_metrics_at_ready"`
		Metrics        map[string]float64 `json:"snapshotter_metrics"`
		DaemonPeakRSS  int64              `json:"daemon_peak_rss_bytes"`
		DaemonCPU      float64            `json:"daemon_cpu_s"`
		HolderPeakRSS  int64              `json:"holder_peak_rss_bytes"`
		PullOutput     string             `json:"pull_output"`
		Leftovers      string             `json:"leftovers"`
		Error          string             `json:"error"`
	}
	smokeReport struct {
		Images map[string]struct {
			Bytes int64 `json:"bytes"`
		} `json:"images"`
		Runs  []smokeRun `json:"runs"`
		Cells []struct {
			Modes []struct {
				Mode      string  `json:"mode"`
				TimeRatio float64 `json:"time_ratio"`
				Percent   float64 `json:"percent_of_image_before_ready"`
			} `json:"modes"`
		} `json:"cells"`
		Reads []struct {
			Files         int      `json:"files"`
			Bytes         int64    `json:"bytes"`
			VerifiedLabel string   `json:"verified_label"`
			DaemonNotes   []string `json:"daemon_notes"`
			Passes        []struct {
				FS          string  `json:"fs"`
				MBps        float64 `json:"mb_per_s"`
				RandomReads int     `json:"random_reads"`
				Median      float64 `json:"median_us"`
			} `json:"passes"`
			Error string `json:"error"`
		} `json:"reads"`
		ReadSums []struct {
			ThroughputRatio float64 `json:"throughput_ratio"`
			LatencyRatio    float64 `json:"latency_ratio"`
		} `json:"read_summaries"`
		Targets []struct{ Name string } `json:"targets"`
		Machine struct {
			Kernel, Containerd string
		} `json:"machine"`
	}
)

func readSmokeReport(t *testing.T, path string) smokeReport {
	t.Helper()
	var rep smokeReport
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	return rep
}

// checkSmokeRun checks what every run of any mode must show.
func checkSmokeRun(t *testing.T, r smokeRun, image int64) {
	t.Helper()
	if r.Error != "" {
		t.Errorf("%s run failed: %s", r.Mode, r.Error)
		return
	}
	if r.ReadyLine != "hello" {
		t.Errorf("%s: ready line %q", r.Mode, r.ReadyLine)
	}
	if r.ReadySeconds <= r.PullSeconds || r.PullSeconds <= 0 || r.ReadySeconds > 120 {
		t.Errorf("%s: ready after %.2f s, pull %.2f s", r.Mode, r.ReadySeconds, r.PullSeconds)
	}
	if r.Leftovers != "" {
		t.Errorf("%s run did not start cold: %s", r.Mode, r.Leftovers)
	}
	if r.Before.Down > r.Exit.Down || r.Before.Requests <= 0 || r.Before.RangeGets > r.Exit.RangeGets {
		t.Errorf("%s: before ready %+v, at exit %+v", r.Mode, r.Before, r.Exit)
	}
	if r.Mode == "full" {
		// The whole image, plus HTTP headers, in plain GETs.
		if r.Exit.Down < image || r.Exit.Down > image+image/20 || r.Exit.RangeGets != 0 {
			t.Errorf("full pull fetched %+v of a %d-byte image", r.Exit, image)
		}
		return
	}
	if !strings.Contains(r.PullOutput, "1 lazy") {
		t.Errorf("%s pull did not mount the layer lazily:\n%s", r.Mode, r.PullOutput)
	}
	spans := r.Metrics[`spanpull_resolver_fetched_bytes_total{kind="span"}`]
	if r.Before.Down <= 0 || r.Before.Down >= image || spans <= 0 || r.Before.RangeGets <= 0 {
		t.Errorf("%s run fetched %+v before ready (spans %v) of a %d-byte image", r.Mode, r.Before, spans, image)
	}
	if r.DaemonPeakRSS < 1<<20 || r.DaemonCPU <= 0 || r.HolderPeakRSS < 1<<20 {
		t.Errorf("%s: snapshotter peak RSS %d, CPU %v s, fd holder peak RSS %d", r.Mode, r.DaemonPeakRSS, r.DaemonCPU, r.HolderPeakRSS)
	}
}

// checkSmokeModes checks each lazy mode ran with its own setting.
func checkSmokeModes(t *testing.T, byMode map[string]smokeRun) {
	t.Helper()
	const (
		prefetch = `spanpull_resolver_class_fetched_bytes_total{class="prefetch"}`
		fill     = `spanpull_resolver_class_fetched_bytes_total{class="fill"}`
		headers  = `spanpull_resolver_header_checks_total`
	)
	if v := byMode["lazy+prefetch"].MetricsAtReady[prefetch]; v <= 0 {
		t.Errorf("lazy+prefetch prefetched %v bytes by the ready line", v)
	}
	if v := byMode["lazy"].Metrics[prefetch]; v != 0 {
		t.Errorf("lazy (no record attached) prefetched %v bytes", v)
	}
	if v := byMode["lazy-nofill"].Metrics[fill]; v != 0 {
		t.Errorf("lazy-nofill filled %v bytes", v)
	}
	if v := byMode["lazy"].Metrics[headers]; v <= 0 {
		t.Errorf("lazy checked %v file headers", v)
	}
	if v := byMode["lazy-noverify"].Metrics[headers]; v != 0 {
		t.Errorf("lazy-noverify checked %v file headers", v)
	}
}

// checkSmokeRead checks the read benchmark's pass on both file systems.
func checkSmokeRead(t *testing.T, rep smokeReport) {
	t.Helper()
	if len(rep.Reads) != 1 {
		t.Fatalf("%d read benchmarks, want 1", len(rep.Reads))
	}
	rd := rep.Reads[0]
	if rd.Error != "" {
		t.Fatalf("read benchmark failed: %s", rd.Error)
	}
	// One pass on each file system: overlayfs, spanpull (the local tree)
	// and spanpull-fuse.
	if rd.Files < 1000 || rd.Bytes < 100e6 || len(rd.Passes) != 3 || len(rd.DaemonNotes) != 0 {
		t.Errorf("read benchmark: %d files, %d bytes, passes %+v, daemon notes %q", rd.Files, rd.Bytes, rd.Passes, rd.DaemonNotes)
	}
	for _, p := range rd.Passes {
		if p.MBps <= 0 || p.RandomReads != 500 || p.Median <= 0 {
			t.Errorf("read pass %+v", p)
		}
	}
	if len(rep.ReadSums) != 1 || rep.ReadSums[0].ThroughputRatio <= 0 || rep.ReadSums[0].LatencyRatio <= 0 {
		t.Errorf("read summaries %+v", rep.ReadSums)
	}
	var readTargets int
	for _, tg := range rep.Targets {
		if strings.Contains(tg.Name, "fully fetched layer") {
			readTargets++
		}
	}
	if readTargets != 2 {
		t.Errorf("targets %+v: want the read throughput and latency targets", rep.Targets)
	}
}
