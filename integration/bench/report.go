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
	Registry string       `json:"registry"`
	Runs     []runResult  `json:"runs"`
	Reads    []readResult `json:"reads,omitempty"`
	Cells    []cell       `json:"cells"`
	ReadSums []readSum    `json:"read_summaries,omitempty"`
	Targets  []target     `json:"targets"`
}

// imageInfo describes a workload's image.
type imageInfo struct {
	Full         string `json:"full_ref"`
	Lazy         string `json:"lazy_ref"`
	LazyPrefetch string `json:"lazy_prefetch_ref,omitempty"`
	ChainID      string `json:"chain_id"`
	// Bytes is the compressed image (layers, config, manifest).
	Bytes      int64    `json:"bytes"`
	LayerBytes int64    `json:"layer_bytes"`
	Command    []string `json:"command"`
	// SetupSeconds is the push, index, record and attach, unshaped.
	SetupSeconds float64 `json:"setup_s"`
}

// cell holds one workload on one link: the medians of every mode.
type cell struct {
	Workload   string     `json:"workload"`
	Link       string     `json:"link"`
	ImageBytes int64      `json:"image_bytes"`
	Modes      []modeCell `json:"modes"`
}

// modeCell is the medians of one mode's successful runs in a cell.
type modeCell struct {
	Mode   string `json:"mode"`
	Runs   int    `json:"runs"`
	Failed int    `json:"failed_runs"`
	// Time to the ready line, its pull share and the exit, seconds;
	// TimeRatio is ReadySeconds over full's.
	ReadySeconds float64 `json:"ready_s"`
	PullSeconds  float64 `json:"pull_s"`
	ExitSeconds  float64 `json:"exit_s"`
	TimeRatio    float64 `json:"time_ratio"`
	// Bytes the registry sent by the ready line (and as a share of the
	// compressed image) and by the container's exit; HTTP requests and
	// range GETs by the ready line and by the exit.
	BytesBeforeReady   int64   `json:"bytes_before_ready"`
	PercentBeforeReady float64 `json:"percent_of_image_before_ready"`
	BytesAtExit        int64   `json:"bytes_at_exit"`
	RequestsBefore     float64 `json:"requests_before_ready"`
	RangeGetsBefore    float64 `json:"range_gets_before_ready"`
	RangeGetsAtExit    float64 `json:"range_gets_at_exit"`
	// Settled runs: time to the layer's verification and bytes by then;
	// Unsettled runs waited for it in vain.
	Settled        int     `json:"settled_runs"`
	Unsettled      int     `json:"unsettled_runs"`
	SettledSeconds float64 `json:"settled_s,omitempty"`
	BytesSettled   int64   `json:"bytes_settled,omitempty"`
	// What the daemon had fetched by the ready line, by kind (index: pack
	// head or zTOC; windows of the pack) and class, and the tar header
	// bytes it read to check files.
	IndexBytes    float64 `json:"index_bytes_before_ready"`
	WindowBytes   float64 `json:"window_bytes_before_ready"`
	DemandBytes   float64 `json:"demand_bytes_before_ready"`
	PrefetchBytes float64 `json:"prefetch_bytes_before_ready"`
	FillBytes     float64 `json:"fill_bytes_before_ready"`
	HeaderBytes   float64 `json:"header_check_bytes_before_ready"`
	// The daemon and its fd holder: largest peak RSS over the runs,
	// median CPU seconds, read at the end of each run.
	DaemonPeakRSS    int64   `json:"daemon_peak_rss_bytes"`
	HolderPeakRSS    int64   `json:"holder_peak_rss_bytes"`
	DaemonCPUSeconds float64 `json:"daemon_cpu_s"`
}

// mode returns the cell's figures for mode m.
func (c cell) mode(m string) (modeCell, bool) {
	for _, mc := range c.Modes {
		if mc.Mode == m && mc.Runs > 0 {
			return mc, true
		}
	}
	return modeCell{}, false
}

// readSum is the medians of the read benchmark of one image.
type readSum struct {
	Workload string `json:"workload"`
	Passes   int    `json:"passes"`
	Files    int    `json:"files"`
	Bytes    int64  `json:"bytes"`
	// By file system (fsOverlay, fsSpanpull): median MB/s and median
	// random 4 KiB latency (and its p99) over the passes.
	MBps         map[string]float64 `json:"mb_per_s"`
	MedianMicros map[string]float64 `json:"median_us"`
	P99Micros    map[string]float64 `json:"p99_us"`
	// ThroughputRatio is spanpull's MB/s over overlayfs's, LatencyRatio
	// spanpull's median latency over overlayfs's.
	ThroughputRatio float64 `json:"throughput_ratio"`
	LatencyRatio    float64 `json:"latency_ratio"`
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
