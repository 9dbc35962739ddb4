//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"time"
)

// report is results.json.
type report struct {
	Started time.Time `json:"started"`
	Seconds float64   `json:"seconds"`
	// Command is the harness's command line.
	Command string               `json:"command"`
	Options options              `json:"options"`
	Machine machine              `json:"machine"`
	Images  map[string]imageInfo `json:"images"`
	// Registry is the address pulls go to (the delay proxy).
	Registry string      `json:"registry"`
	Runs     []runResult `json:"runs"`
	Cells    []cell      `json:"cells"`
	Targets  []target    `json:"targets"`
}

// imageInfo describes a workload's image.
type imageInfo struct {
	Full string `json:"full_ref"`
	Lazy string `json:"lazy_ref"`
	// Bytes is the compressed image (layers, config, manifest).
	Bytes      int64    `json:"bytes"`
	LayerBytes int64    `json:"layer_bytes"`
	Command    []string `json:"command"`
}

// cell holds the medians of one workload on one link.
type cell struct {
	Workload string `json:"workload"`
	Link     string `json:"link"`
	Runs     int    `json:"runs"`
	Failed   int    `json:"failed_runs"`
	// Time to the first line, median seconds, and lazy/full.
	FullSeconds float64 `json:"full_s"`
	LazySeconds float64 `json:"lazy_s"`
	TimeRatio   float64 `json:"time_ratio"`
	// Pull shares of those times.
	FullPullSeconds float64 `json:"full_pull_s"`
	LazyPullSeconds float64 `json:"lazy_pull_s"`
	// Bytes the registry sent, median, and lazy as a share of the
	// compressed image.
	FullBytes        int64   `json:"full_bytes"`
	LazyBytes        int64   `json:"lazy_bytes"`
	ImageBytes       int64   `json:"image_bytes"`
	LazyPercent      float64 `json:"lazy_percent_of_image"`
	LazySpanBytes    float64 `json:"lazy_span_bytes"`
	LazyZtocBytes    float64 `json:"lazy_ztoc_bytes"`
	LazySpansFetched float64 `json:"lazy_spans_fetched"`
	// The snapshotter during the lazy runs: largest peak RSS and median
	// CPU seconds.
	DaemonPeakRSS    int64   `json:"daemon_peak_rss_bytes"`
	DaemonCPUSeconds float64 `json:"daemon_cpu_s"`
}

// target is one goal the issues set.
type target struct {
	Name     string  `json:"name"`
	Goal     string  `json:"goal"`
	Measured string  `json:"measured"`
	Value    float64 `json:"value"`
	Met      bool    `json:"met"`
}

// machine describes where the benchmark ran.
type machine struct {
	Kernel        string `json:"kernel"`
	CPU           string `json:"cpu"`
	Cores         int    `json:"cores"`
	RAM           string `json:"ram"`
	Containerd    string `json:"containerd"`
	Runc          string `json:"runc"`
	Go            string `json:"go"`
	Registry      string `json:"registry"`
	SpanpullRev   string `json:"spanpull_revision"`
	DropCacheNote string `json:"page_cache"`
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(s)
}

func output(ctx context.Context, dir, name string, args ...string) string {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	b, err := cmd.CombinedOutput()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return firstLine(string(b))
}

func machineInfo(ctx context.Context, repo string) machine {
	m := machine{
		Kernel:        output(ctx, "", "uname", "-r"),
		Cores:         runtime.NumCPU(),
		Containerd:    output(ctx, "", "/usr/bin/containerd", "--version"),
		Runc:          output(ctx, "", "runc", "--version"),
		Go:            output(ctx, repo, "go", "version"),
		Registry:      output(ctx, "", "docker-registry", "--version"),
		SpanpullRev:   output(ctx, repo, "git", "describe", "--always", "--dirty"),
		DropCacheNote: "dropped (echo 3 > /proc/sys/vm/drop_caches) before every run",
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				var kb float64
				fmt.Sscan(f[1], &kb)
				m.RAM = fmt.Sprintf("%.1f GiB", kb/(1<<20))
			}
		}
	}
	return m
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (rep *report) failedRuns() int {
	n := 0
	for _, r := range rep.Runs {
		if r.Error != "" {
			n++
		}
	}
	return n
}

// summarize computes the cells (medians of the successful runs) and checks
// the targets.
func (rep *report) summarize(o options) {
	rep.Cells = nil
	for _, w := range o.Workloads {
		for _, l := range o.Links {
			c := cell{Workload: w, Link: l, ImageBytes: rep.Images[w].Bytes}
			var ft, lt, fp, lp, fb, lb, span, ztoc, spans, cpu []float64
			for _, r := range rep.Runs {
				if r.Workload != w || r.Link != l {
					continue
				}
				if r.Error != "" {
					c.Failed++
					continue
				}
				switch r.Mode {
				case modeFull:
					ft, fp, fb = append(ft, r.FirstLineSeconds), append(fp, r.PullSeconds), append(fb, float64(r.BytesFetched))
				case modeLazy:
					c.Runs++
					lt, lp, lb = append(lt, r.FirstLineSeconds), append(lp, r.PullSeconds), append(lb, float64(r.BytesFetched))
					span = append(span, r.SnapshotterMetrics[`spanpull_resolver_fetched_bytes_total{kind="span"}`])
					ztoc = append(ztoc, r.SnapshotterMetrics[`spanpull_resolver_fetched_bytes_total{kind="ztoc"}`])
					spans = append(spans, r.SnapshotterMetrics["spanpull_resolver_spans_fetched_total"])
					cpu = append(cpu, r.DaemonCPUSeconds)
					c.DaemonPeakRSS = max(c.DaemonPeakRSS, r.DaemonPeakRSS)
				}
			}
			if len(ft) == 0 && len(lt) == 0 {
				if c.Failed > 0 {
					rep.Cells = append(rep.Cells, c)
				}
				continue
			}
			c.FullSeconds, c.LazySeconds = median(ft), median(lt)
			c.FullPullSeconds, c.LazyPullSeconds = median(fp), median(lp)
			c.FullBytes, c.LazyBytes = int64(median(fb)), int64(median(lb))
			c.LazySpanBytes, c.LazyZtocBytes, c.LazySpansFetched = median(span), median(ztoc), median(spans)
			c.DaemonCPUSeconds = median(cpu)
			if c.FullSeconds > 0 {
				c.TimeRatio = c.LazySeconds / c.FullSeconds
			}
			if c.ImageBytes > 0 {
				c.LazyPercent = 100 * float64(c.LazyBytes) / float64(c.ImageBytes)
			}
			rep.Cells = append(rep.Cells, c)
		}
	}
	rep.Targets = nil
	find := func(w, l string) (cell, bool) {
		for _, c := range rep.Cells {
			if c.Workload == w && c.Link == l && c.FullSeconds > 0 && c.LazySeconds > 0 {
				return c, true
			}
		}
		return cell{}, false
	}
	ratio := func(w, l string, goal float64) {
		if c, ok := find(w, l); ok {
			rep.Targets = append(rep.Targets, target{
				Name: fmt.Sprintf("%s image, %s: lazy/full time to first line", w, linkLabel(l, o)), Goal: fmt.Sprintf("<= %.2fx", goal),
				Measured: fmt.Sprintf("%.2fx", c.TimeRatio), Value: c.TimeRatio, Met: c.TimeRatio <= goal,
			})
		}
	}
	share := func(w, l string, goal float64, strict bool) {
		if c, ok := find(w, l); ok {
			op, met := "<=", c.LazyPercent <= goal
			if strict {
				op, met = "<", c.LazyPercent < goal
			}
			rep.Targets = append(rep.Targets, target{
				Name: fmt.Sprintf("%s image, %s: lazy bytes / compressed image", w, linkLabel(l, o)), Goal: fmt.Sprintf("%s %.0f%%", op, goal),
				Measured: fmt.Sprintf("%.1f%%", c.LazyPercent), Value: c.LazyPercent, Met: met,
			})
		}
	}
	ratio("python", "100mbit", 0.35)
	share("python", "100mbit", 30, true)
	ratio("large", "100mbit", 0.2)
	share("large", "100mbit", 25, false)
	for _, w := range o.Workloads {
		ratio(w, "unshaped", 1.2)
	}
}

// linkLabel names a link with its round-trip time.
func linkLabel(l string, o options) string {
	if l == "unshaped" {
		return "unshaped"
	}
	return fmt.Sprintf("%s + %g ms RTT", l, o.RTTms)
}

func mb(b float64) string { return fmt.Sprintf("%.1f MB", b/1e6) }

// markdown renders the section for BENCHMARKS.md.
func (rep *report) markdown() string {
	o := rep.Options
	var b strings.Builder
	fmt.Fprintf(&b, "## Lazy pull vs full pull (scripts/bench-lazy.sh)\n\n")
	fmt.Fprintf(&b, "Time from the start of the pull to the container's first output line, and bytes the registry sent, "+
		"median of cold runs (runs column). **Full**: `ctr image pull` into overlayfs, then `ctr run`. "+
		"**Lazy**: `snapshotter pull` (SOCI index from `indexer convert`), then `ctr run --snapshotter spanpull`. "+
		"Same registry, same run, modes alternating. Links: tbf on both ends of a veth pair to a network namespace "+
		"holding docker-registry, plus %g ms RTT from a delay proxy (unshaped: no tbf, no delay). "+
		"Bytes are counted in that proxy for both modes (HTTP responses, headers included). "+
		"Background fill: %s. Span size: %s.\n\n", o.RTTms, map[bool]string{true: "on (daemon defaults)", false: "off (fill_rate_bytes = -1), so lazy bytes are what the workload needs"}[o.BackgroundFill],
		map[bool]string{true: fmt.Sprintf("%d bytes (`indexer convert --span-size %d`)", o.SpanSize, o.SpanSize), false: "the indexer's default, 4 MiB"}[o.SpanSize > 0])
	fmt.Fprintf(&b, "| workload | link | runs | full (s) | lazy (s) | lazy/full | bytes full | bytes lazy | lazy %% of image |\n")
	fmt.Fprintf(&b, "|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range rep.Cells {
		runs := fmt.Sprint(c.Runs)
		if c.Failed > 0 {
			runs += fmt.Sprintf(" (%d failed)", c.Failed)
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %.2f | %.2f | %.2fx | %s | %s | %.1f%% |\n", c.Workload, linkLabel(c.Link, o), runs,
			c.FullSeconds, c.LazySeconds, c.TimeRatio, mb(float64(c.FullBytes)), mb(float64(c.LazyBytes)), c.LazyPercent)
	}
	b.WriteString("\nImages (one gzip layer each, linux/amd64):\n\n")
	names := make([]string, 0, len(rep.Images))
	for n := range rep.Images {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		im := rep.Images[n]
		fmt.Fprintf(&b, "- %s: %s compressed; command `%s`\n", n, mb(float64(im.Bytes)), strings.Join(quoteArgs(im.Command), " "))
	}

	b.WriteString("\nPull share of the time to first line, and what the snapshotter fetched (lazy, medians):\n\n")
	b.WriteString("| workload | link | full pull (s) | lazy pull (s) | spans fetched | span bytes | zTOC bytes |\n|---|---|---|---|---|---|---|\n")
	for _, c := range rep.Cells {
		fmt.Fprintf(&b, "| %s | %s | %.2f | %.2f | %.0f | %s | %s |\n", c.Workload, linkLabel(c.Link, o),
			c.FullPullSeconds, c.LazyPullSeconds, c.LazySpansFetched, mb(c.LazySpanBytes), mb(c.LazyZtocBytes))
	}

	b.WriteString("\n### Snapshotter daemon (lazy runs; it starts empty for every run)\n\n")
	b.WriteString("Peak RSS is VmHWM from /proc/PID/status (largest over the runs), CPU is user + system time from /proc/PID/stat (median), both read at the container's exit.\n\n")
	b.WriteString("| workload | link | peak RSS | CPU (s) |\n|---|---|---|---|\n")
	for _, c := range rep.Cells {
		fmt.Fprintf(&b, "| %s | %s | %.1f MiB | %.2f |\n", c.Workload, linkLabel(c.Link, o), float64(c.DaemonPeakRSS)/(1<<20), c.DaemonCPUSeconds)
	}

	if len(rep.Targets) > 0 {
		b.WriteString("\n### Targets set by the issues\n\n| target | goal | measured | met |\n|---|---|---|---|\n")
		for _, t := range rep.Targets {
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.Name, t.Goal, t.Measured, map[bool]string{true: "yes", false: "**no**"}[t.Met])
		}
	}

	m := rep.Machine
	b.WriteString("\n### Machine\n\n")
	fmt.Fprintf(&b, "- kernel %s; CPU %s, %d cores; RAM %s\n", m.Kernel, m.CPU, m.Cores, m.RAM)
	fmt.Fprintf(&b, "- %s; %s; %s; %s\n", m.Containerd, m.Runc, m.Go, m.Registry)
	fmt.Fprintf(&b, "- spanpull %s; page cache %s\n", m.SpanpullRev, m.DropCacheNote)
	fmt.Fprintf(&b, "- %s, took %.0f s\n", rep.Started.UTC().Format(time.RFC3339), rep.Seconds)

	b.WriteString("\n### Commands\n\n```\n")
	fmt.Fprintf(&b, "# harness\n%s\n", rep.Command)
	fmt.Fprintf(&b, "# REG=%s (the delay proxy in the registry's namespace), SOCK=containerd 1.6's socket, W=workload\n", rep.Registry)
	b.WriteString("# full, timed from before the pull to ctr run's first stdout line\n")
	b.WriteString("ctr -a $SOCK -n bench images pull --plain-http $REG/bench/$W:image\n")
	b.WriteString("ctr -a $SOCK -n bench run --rm $REG/bench/$W:image $ID $CMD\n")
	b.WriteString("# lazy\n")
	b.WriteString("snapshotter pull -a $SOCK -n bench --plain-http $REG/bench/$W:image-soci\n")
	b.WriteString("ctr -a $SOCK -n bench run --rm --snapshotter spanpull $REG/bench/$W:image-soci $ID $CMD\n")
	b.WriteString("# before every run\n")
	b.WriteString("ctr tasks/containers rm; ctr images rm --sync (GC removes content and snapshots; checked empty)\n")
	b.WriteString("snapshotter serve restarted with an empty --root; proxy counters reset, its connections closed\n")
	b.WriteString("sync; echo 3 > /proc/sys/vm/drop_caches\n")
	b.WriteString("# image set-up (once, unshaped)\n")
	b.WriteString("push the cached layer as a linux/amd64 OCI image (go-containerregistry), then\n")
	b.WriteString("indexer convert --plain-http $REG/bench/$W:image $REG/bench/$W:image-soci\n")
	b.WriteString("```\n")
	if names := rep.chartNames(); len(names) > 0 {
		b.WriteString("\n")
		for _, n := range names {
			fmt.Fprintf(&b, "![%s](%s)\n", strings.TrimSuffix(n, ".png"), n)
		}
	}
	return b.String()
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " \"'();") {
			a = "'" + a + "'"
		}
		out[i] = a
	}
	return out
}
