//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/testutil/proc"
)

// Modes of a run.
const (
	modeLazy = "lazy" // snapshotter pull + ctr run --snapshotter spanpull
	modeFull = "full" // ctr image pull (overlayfs) + ctr run
)

// runResult is one cold measurement.
type runResult struct {
	Workload string `json:"workload"`
	Link     string `json:"link"`
	Mode     string `json:"mode"`
	Run      int    `json:"run"`
	// FirstLineSeconds runs from the start of the pull to the first line
	// the container printed; PullSeconds is the pull's share of it;
	// ExitSeconds runs to the exit of ctr run.
	FirstLineSeconds float64 `json:"first_line_s"`
	PullSeconds      float64 `json:"pull_s"`
	ExitSeconds      float64 `json:"exit_s"`
	FirstLine        string  `json:"first_line"`
	// Bytes the registry sent through the proxy (HTTP responses, headers
	// included) by the first line and by the container's exit, and bytes
	// sent to it.
	BytesAtFirstLine int64 `json:"bytes_at_first_line"`
	BytesFetched     int64 `json:"bytes_fetched"`
	BytesSent        int64 `json:"bytes_sent"`
	Connections      int64 `json:"connections"`
	// SnapshotterMetrics are the daemon's spanpull_* counters at the
	// container's exit (the daemon starts empty for every run).
	SnapshotterMetrics map[string]float64 `json:"snapshotter_metrics,omitempty"`
	// DaemonPeakRSS (VmHWM) and DaemonCPUSeconds (user + system) of the
	// snapshotter since its start for this run, read at the container's
	// exit.
	DaemonPeakRSS    int64   `json:"daemon_peak_rss_bytes"`
	DaemonCPUSeconds float64 `json:"daemon_cpu_s"`
	// PullOutput is what the pull printed (lazy: each layer's mode).
	PullOutput string `json:"pull_output,omitempty"`
	// Leftovers is what containerd still held before the run started
	// (empty for a cold run).
	Leftovers string `json:"leftovers,omitempty"`
	Error     string `json:"error,omitempty"`
}

// cold brings the machine back to a cold start: no container, image,
// content or snapshot in containerd, a snapshotter restarted on an empty
// root, fresh proxy counters and connections, an empty page cache.
func (e *env) cold(ctx context.Context) (string, error) {
	if err := e.removeAll(ctx); err != nil {
		return "", fmt.Errorf("remove images: %w", err)
	}
	left, err := e.leftovers(ctx)
	if err != nil {
		return "", err
	}
	if err := e.restartSnapshotter(ctx); err != nil {
		return left, err
	}
	if err := e.proxy.Reset(ctx); err != nil {
		return left, err
	}
	return left, dropCaches()
}

// measure runs one cold pull-and-run of w in mode and times it.
func (e *env) measure(ctx context.Context, w workload, img image, link string, mode string, n int) runResult {
	r := runResult{Workload: w.Name, Link: link, Mode: mode, Run: n}
	if err := e.measureInto(ctx, w, img, &r); err != nil {
		r.Error = err.Error()
	}
	return r
}

func (e *env) measureInto(ctx context.Context, w workload, img image, r *runResult) error {
	left, err := e.cold(ctx)
	r.Leftovers = left
	if err != nil {
		return fmt.Errorf("cold start: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	id := fmt.Sprintf("bench-%s-%s-%s-%d", w.Name, r.Link, r.Mode, r.Run)

	var pull *exec.Cmd
	var runArgs []string
	switch r.Mode {
	case modeLazy:
		pull = exec.CommandContext(ctx, e.snapshotterBin, "pull", "-a", e.containerd.Socket, "-n", ctrNamespace, "--plain-http", img.Lazy)
		runArgs = []string{"run", "--rm", "--snapshotter", snapshotterName, img.Lazy, id}
	case modeFull:
		pull = e.containerd.Command(ctx, "images", "pull", "--plain-http", img.Full)
		runArgs = []string{"run", "--rm", img.Full, id}
	default:
		return fmt.Errorf("unknown mode %q", r.Mode)
	}
	run := e.containerd.Command(ctx, append(runArgs, w.Cmd...)...)
	var stderr bytes.Buffer
	run.Stderr = &stderr
	stdout, err := run.StdoutPipe()
	if err != nil {
		return err
	}

	start := time.Now()
	out, err := pull.CombinedOutput()
	if err != nil {
		return fmt.Errorf("pull: %w\n%s", err, proc.Tail(string(out), 2048))
	}
	r.PullSeconds = time.Since(start).Seconds()
	if r.Mode == modeLazy {
		r.PullOutput = strings.TrimSpace(string(out))
	}
	if err := run.Start(); err != nil {
		return fmt.Errorf("ctr run: %w", err)
	}
	line, rerr := bufio.NewReader(stdout).ReadString('\n')
	firstLine := time.Since(start)
	atFirst, serr := e.proxy.Stats(ctx)
	_, _ = io.Copy(io.Discard, stdout)
	werr := run.Wait()
	exit := time.Since(start)
	if rerr != nil {
		return fmt.Errorf("ctr run printed no line (%v, exit %v): %s", rerr, werr, proc.Tail(stderr.String(), 2048))
	}
	if werr != nil {
		return fmt.Errorf("ctr run: %w: %s", werr, proc.Tail(stderr.String(), 2048))
	}
	if serr != nil {
		return serr
	}
	r.FirstLine = strings.TrimRight(line, "\r\n")
	r.FirstLineSeconds = firstLine.Seconds()
	r.ExitSeconds = exit.Seconds()
	r.BytesAtFirstLine = atFirst.Down
	final, err := e.proxy.Stats(ctx)
	if err != nil {
		return err
	}
	r.BytesFetched, r.BytesSent, r.Connections = final.Down, final.Up, final.Conns
	if r.SnapshotterMetrics, err = e.snapshotterMetrics(ctx); err != nil {
		return err
	}
	if r.DaemonPeakRSS, r.DaemonCPUSeconds, err = procUsage(e.snap.Pid()); err != nil {
		return fmt.Errorf("snapshotter usage: %w", err)
	}
	if r.FirstLine != w.Expect {
		return fmt.Errorf("first line %q, want %q", r.FirstLine, w.Expect)
	}
	return nil
}

// snapshotterMetrics scrapes the daemon's spanpull_* counters and gauges
// (histograms left out) from its Prometheus endpoint, by series.
func (e *env) snapshotterMetrics(ctx context.Context) (map[string]float64, error) {
	return testenv.ScrapeMetrics(ctx, e.snap.MetricsURL, "spanpull_")
}
