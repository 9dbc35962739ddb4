//go:build linux

package main

import (
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeReport is a report with runs for every workload, link and mode and
// a read benchmark per workload. Full runs take 10*k s and fetch the
// image; lazy modes take k s (lazy+prefetch k/2) and fetch a tenth of it
// before ready (lazy-noverify 2% less); the run-2 figures are the medians.
func fakeReport(t *testing.T) *report {
	t.Helper()
	o, err := parseFlags([]string{"-runs", "3", "-slow-runs", "3"})
	if err != nil {
		t.Fatal(err)
	}
	rep := &report{Options: o, Images: map[string]imageInfo{
		"python": {Bytes: 64e6, Command: []string{"python3", "-c", `print("hello")`}},
		"large":  {Bytes: 371e6, Command: []string{"python3", "-c", "import numpy, scipy, pandas, matplotlib; print(\"ready\")"}},
	}}
	for _, w := range o.Workloads {
		img := rep.Images[w].Bytes
		for li, l := range o.Links {
			for n := 1; n <= 3; n++ {
				k := float64(li+1) * float64(n)
				for _, m := range o.Modes {
					r := runResult{Workload: w, Link: l, Mode: m, Run: n, ReadySeconds: k, PullSeconds: k / 10,
						Before: proxyStats{Down: img / 10, RangeGets: int64(10 * n)}, Exit: proxyStats{Down: img / 5}}
					switch m {
					case modeFull:
						r.ReadySeconds, r.Before.Down, r.Before.RangeGets, r.Exit.Down = 10*k, img, 0, img
					case modeLazyPrefetch:
						r.ReadySeconds = k / 2
					case modeLazyNoVerify:
						r.Before.Down = img / 10 * 98 / 100
					}
					if modes[m].Lazy {
						r.DaemonPeakRSS, r.HolderPeakRSS = int64(n)<<20, 2<<20
						r.MetricsAtReady = map[string]float64{metricDemandBytes: float64(n), metricIndexBytes: 1e6}
						if !modes[m].Diagnostic {
							r.Settled, r.SettledSeconds = &proxyStats{Down: img}, 20*k
						}
					}
					rep.Runs = append(rep.Runs, r)
				}
			}
		}
		rd := readResult{Workload: w, Files: 10, Bytes: 100e6, SettledSeconds: 30, VerifiedLabel: "verified"}
		for n := 1; n <= 3; n++ {
			rd.Passes = append(rd.Passes,
				readPass{Pass: n, FS: fsOverlay, MBps: 100 * float64(n), MedianMicros: 100 * float64(n), P99Micros: 1000},
				readPass{Pass: n, FS: fsSpanpull, MBps: 90 * float64(n), MedianMicros: 150 * float64(n), P99Micros: 2000})
		}
		rep.Reads = append(rep.Reads, rd)
	}
	// A failed run is counted, not taken into the medians.
	rep.Runs = append(rep.Runs, runResult{Workload: "python", Link: "unshaped", Mode: modeLazy, Run: 4, Error: "boom"})
	rep.summarize(o)
	return rep
}

func TestSummarize(t *testing.T) {
	rep := fakeReport(t)
	if len(rep.Cells) != 6 {
		t.Fatalf("%d cells, want 6", len(rep.Cells))
	}
	c := rep.Cells[0]
	if c.Workload != "python" || c.Link != "unshaped" || len(c.Modes) != len(allModes) {
		t.Fatalf("first cell %+v", c)
	}
	lazy, _ := c.mode(modeLazy)
	if lazy.Runs != 3 || lazy.Failed != 1 || lazy.ReadySeconds != 2 || lazy.TimeRatio != 0.1 || lazy.PercentBeforeReady != 10 ||
		lazy.RangeGetsBefore != 20 || lazy.DaemonPeakRSS != 3<<20 || lazy.HolderPeakRSS != 2<<20 || lazy.DemandBytes != 2 ||
		lazy.Settled != 3 || lazy.SettledSeconds != 40 || lazy.BytesSettled != 64e6 {
		t.Errorf("lazy medians of the first cell: %+v", lazy)
	}
	if pf, _ := c.mode(modeLazyPrefetch); pf.TimeRatio != 0.05 {
		t.Errorf("lazy+prefetch ratio %v, want 0.05", pf.TimeRatio)
	}
	if nf, _ := c.mode(modeLazyNoFill); nf.Settled != 0 {
		t.Errorf("a diagnostic mode settled: %+v", nf)
	}
	if len(rep.ReadSums) != 2 || rep.ReadSums[0].ThroughputRatio != 0.9 || rep.ReadSums[0].LatencyRatio != 1.5 {
		t.Errorf("read summaries %+v", rep.ReadSums)
	}
	// python and large at 100mbit: lazy time, bytes, prefetch time (and
	// bytes for large); unshaped each; the binding on every cell; RSS;
	// read throughput and latency per image.
	want := 3 + 4 + 2 + 6 + 1 + 4
	if len(rep.Targets) != want {
		t.Errorf("%d targets, want %d: %+v", len(rep.Targets), want, rep.Targets)
	}
	for _, tg := range rep.Targets {
		if !tg.Met {
			t.Errorf("target %+v not met by the fake figures", tg)
		}
	}
	if rep.failedRuns() != 1 {
		t.Errorf("failedRuns = %d", rep.failedRuns())
	}
	md := rep.markdown()
	for _, want := range []string{
		"### python image (64.0 MB compressed), unshaped",
		"| lazy | 3 (1 failed, 0 unsettled) | 2.00 | 0.10x | 0.20 | 6.4 MB | 10.0% | 20 | 12.8 MB | 40.0 | 64.0 MB | 3.0 MiB | 2.0 MiB |",
		"| lazy-nofill | 3 | ", "### large image (371.0 MB compressed), 100mbit + 20 ms RTT",
		"| python | spanpull | 10 | 100.0 MB | 0.56 | 180 | 0.90x | 300 | 2000 | 1.50x |",
		"large image: daemon peak RSS", "per-file binding, extra bytes before ready", "![time-large](time-large.png)", "![read](read.png)",
		"### Machine", "ctr -a $SOCK -n bench run --rm --snapshotter spanpull"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

// TestTargetsMissed checks that a target is reported missed when the
// figure is over it.
func TestTargetsMissed(t *testing.T) {
	rep := fakeReport(t)
	for i := range rep.Runs {
		r := &rep.Runs[i]
		if r.Workload == "large" && r.Link == "100mbit" && r.Mode == modeLazyPrefetch {
			r.Before.Down = rep.Images["large"].Bytes / 10 * 2 // 2x lazy's
			r.ReadySeconds = r.ReadySeconds * 4                // 0.2x
		}
		if r.Workload == "large" && r.Mode == modeLazy {
			r.DaemonPeakRSS = 120 << 20
		}
	}
	rep.summarize(rep.Options)
	missed := map[string]bool{}
	for _, tg := range rep.Targets {
		if !tg.Met {
			missed[tg.Name] = true
		}
	}
	for _, want := range []string{
		"large image, 100mbit + 20 ms RTT: lazy+prefetch time to ready / full",
		"large image, 100mbit + 20 ms RTT: lazy+prefetch bytes before ready / lazy's",
		"large image: daemon peak RSS, lazy and lazy+prefetch (through the fill and verification)",
	} {
		if !missed[want] {
			t.Errorf("%q not missed; missed: %v", want, missed)
		}
	}
	if len(missed) != 3 {
		t.Errorf("missed %v", missed)
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
	if len(names) != 4 {
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
