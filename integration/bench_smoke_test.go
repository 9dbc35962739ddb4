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
// unshaped, one cold run of each mode. It proves the whole harness works (network namespace,
// registry, delay proxy, snapshotter, containerd 1.6, report, charts) and
// that the numbers it reports are sane, and that it leaves nothing behind.
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
	if !strings.Contains(string(b), "| python | unshaped | 1 |") {
		t.Errorf("printed markdown lacks the python row:\n%s", b)
	}

	var rep struct {
		Images map[string]struct {
			Bytes int64 `json:"bytes"`
		} `json:"images"`
		Runs []struct {
			Mode             string             `json:"mode"`
			FirstLineSeconds float64            `json:"first_line_s"`
			PullSeconds      float64            `json:"pull_s"`
			FirstLine        string             `json:"first_line"`
			BytesFetched     int64              `json:"bytes_fetched"`
			BytesAtFirstLine int64              `json:"bytes_at_first_line"`
			Metrics          map[string]float64 `json:"snapshotter_metrics"`
			DaemonPeakRSS    int64              `json:"daemon_peak_rss_bytes"`
			DaemonCPU        float64            `json:"daemon_cpu_s"`
			PullOutput       string             `json:"pull_output"`
			Leftovers        string             `json:"leftovers"`
			Error            string             `json:"error"`
		} `json:"runs"`
		Cells []struct {
			TimeRatio   float64 `json:"time_ratio"`
			LazyPercent float64 `json:"lazy_percent_of_image"`
		} `json:"cells"`
		Machine struct {
			Kernel, Containerd string
		} `json:"machine"`
	}
	raw, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("results.json: %v", err)
	}
	image := rep.Images["python"].Bytes
	if image < 30e6 {
		t.Fatalf("python image is %d bytes; the cached Debian + python3 layer is about 64 MB", image)
	}
	if len(rep.Runs) != 2 {
		t.Fatalf("%d runs, want one full and one lazy", len(rep.Runs))
	}
	for _, r := range rep.Runs {
		if r.Error != "" {
			t.Errorf("%s run failed: %s", r.Mode, r.Error)
			continue
		}
		if r.FirstLine != "hello" {
			t.Errorf("%s: first line %q", r.Mode, r.FirstLine)
		}
		if r.FirstLineSeconds <= r.PullSeconds || r.PullSeconds <= 0 || r.FirstLineSeconds > 120 {
			t.Errorf("%s: first line after %.2f s, pull %.2f s", r.Mode, r.FirstLineSeconds, r.PullSeconds)
		}
		if r.Leftovers != "" {
			t.Errorf("%s run did not start cold: %s", r.Mode, r.Leftovers)
		}
		if r.BytesAtFirstLine > r.BytesFetched {
			t.Errorf("%s: %d bytes at the first line, %d at exit", r.Mode, r.BytesAtFirstLine, r.BytesFetched)
		}
		switch r.Mode {
		case "full":
			// The whole image, plus HTTP headers.
			if r.BytesFetched < image || r.BytesFetched > image+image/20 {
				t.Errorf("full pull fetched %d bytes of a %d-byte image", r.BytesFetched, image)
			}
		case "lazy":
			if !strings.Contains(r.PullOutput, "1 lazy") {
				t.Errorf("lazy pull did not mount the layer lazily:\n%s", r.PullOutput)
			}
			spans := r.Metrics[`spanpull_resolver_fetched_bytes_total{kind="span"}`]
			if r.BytesFetched <= 0 || r.BytesFetched >= image || spans <= 0 || spans > float64(r.BytesFetched) {
				t.Errorf("lazy run fetched %d bytes (spans %v) of a %d-byte image", r.BytesFetched, spans, image)
			}
			if r.DaemonPeakRSS < 1<<20 || r.DaemonCPU <= 0 {
				t.Errorf("snapshotter peak RSS %d, CPU %v s", r.DaemonPeakRSS, r.DaemonCPU)
			}
		default:
			t.Errorf("unknown mode %q", r.Mode)
		}
	}
	if len(rep.Cells) != 1 || rep.Cells[0].TimeRatio <= 0 || rep.Cells[0].LazyPercent <= 0 || rep.Cells[0].LazyPercent >= 100 {
		t.Errorf("cells %+v", rep.Cells)
	}
	if rep.Machine.Kernel == "" || !strings.Contains(rep.Machine.Containerd, "1.6") {
		t.Errorf("machine %+v", rep.Machine)
	}
	md, err := os.ReadFile(filepath.Join(out, "bench-lazy.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| workload | link | runs | full (s) | lazy (s) |", "### Machine", "![time-python](time-python.png)"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("bench-lazy.md lacks %q", want)
		}
	}
	for _, n := range []string{"time-python.png", "bytes.png"} {
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
