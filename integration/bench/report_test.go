//go:build linux

package main

import (
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeReport is a report with runs for every workload, link and mode:
// full runs take 10*k s and fetch the image, lazy runs k s and a tenth.
func fakeReport(t *testing.T) *report {
	t.Helper()
	o, err := parseFlags([]string{"-runs", "3"})
	if err != nil {
		t.Fatal(err)
	}
	rep := &report{Options: o, Images: map[string]imageInfo{
		"python": {Bytes: 64e6, Command: []string{"python3", "-c", `print("hello")`}},
		"large":  {Bytes: 400e6, Command: []string{"python3", "-c", "import numpy"}},
	}}
	for _, w := range o.Workloads {
		for li, l := range o.Links {
			for n := 1; n <= 3; n++ {
				k := float64(li+1) * float64(n) // medians: run 2
				img := rep.Images[w].Bytes
				rep.Runs = append(rep.Runs,
					runResult{Workload: w, Link: l, Mode: modeFull, Run: n, FirstLineSeconds: 10 * k, BytesFetched: img},
					runResult{Workload: w, Link: l, Mode: modeLazy, Run: n, FirstLineSeconds: k, BytesFetched: img / 10,
						DaemonPeakRSS: int64(n) << 20, SnapshotterMetrics: map[string]float64{"spanpull_resolver_spans_fetched_total": float64(n)}})
			}
		}
	}
	// A failed run is counted, not averaged in.
	rep.Runs = append(rep.Runs, runResult{Workload: "python", Link: "unshaped", Mode: modeLazy, Run: 4, Error: "boom"})
	rep.summarize(o)
	return rep
}

func TestSummarize(t *testing.T) {
	rep := fakeReport(t)
	if len(rep.Cells) != 8 {
		t.Fatalf("%d cells, want 8", len(rep.Cells))
	}
	c := rep.Cells[0]
	if c.Workload != "python" || c.Link != "unshaped" || c.Runs != 3 || c.Failed != 1 {
		t.Errorf("first cell %+v", c)
	}
	if c.FullSeconds != 20 || c.LazySeconds != 2 || c.TimeRatio != 0.1 || c.LazyPercent != 10 ||
		c.DaemonPeakRSS != 3<<20 || c.LazySpansFetched != 2 {
		t.Errorf("medians of the first cell: %+v", c)
	}
	if len(rep.Targets) != 6 {
		t.Errorf("%d targets, want 6: %+v", len(rep.Targets), rep.Targets)
	}
	for _, tg := range rep.Targets {
		if !tg.Met {
			t.Errorf("target %+v not met by 0.1x and 10%%", tg)
		}
	}
	if rep.failedRuns() != 1 {
		t.Errorf("failedRuns = %d", rep.failedRuns())
	}
	md := rep.markdown()
	for _, want := range []string{"| python | unshaped | 3 (1 failed) | 20.00 | 2.00 | 0.10x | 64.0 MB | 6.4 MB | 10.0% |",
		"| large | 100mbit + 20 ms RTT |", "![time-large](time-large.png)", "### Machine", "ctr -a $SOCK -n bench run --rm --snapshotter spanpull"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestCharts draws every chart of a full matrix and decodes the PNGs.
func TestCharts(t *testing.T) {
	rep := fakeReport(t)
	dir := t.TempDir()
	if out := os.Getenv("BENCH_CHART_DIR"); out != "" {
		dir = out // to look at them
	}
	if err := rep.charts(dir); err != nil {
		t.Fatal(err)
	}
	names := rep.chartNames()
	if len(names) != 3 {
		t.Fatalf("charts %v", names)
	}
	for _, n := range names {
		f, err := os.Open(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := png.DecodeConfig(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		if cfg.Width < 800 || cfg.Height < 500 {
			t.Errorf("%s is %dx%d", n, cfg.Width, cfg.Height)
		}
	}
}
