//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spanpull/spanpull/fdstore"
	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/internal/proc"
)

// runResult is one cold measurement.
type runResult struct {
	Workload string `json:"workload"`
	Link     string `json:"link"`
	Mode     string `json:"mode"`
	Run      int    `json:"run"`
	// ReadySeconds runs from the start of the pull to the container's
	// ready line (its first output line); PullSeconds is the pull's share
	// of it; ExitSeconds runs to the exit of ctr run.
	ReadySeconds float64 `json:"ready_s"`
	PullSeconds  float64 `json:"pull_s"`
	ExitSeconds  float64 `json:"exit_s"`
	ReadyLine    string  `json:"ready_line"`
	// Before is what the registry had sent through the proxy when the
	// ready line appeared, Exit what it had sent when the container
	// exited (the background fill goes on after the ready line).
	Before proxyStats `json:"before_ready"`
	Exit   proxyStats `json:"at_exit"`
	// MetricsAtReady and Metrics are the daemon's spanpull_* series when
	// the ready line appeared and at the end of the run (the container's
	// exit, or the layer's verification when the run waits for it); lazy
	// modes only. The daemon starts empty for every run.
	MetricsAtReady map[string]float64 `json:"snapshotter_metrics_at_ready,omitempty"`
	Metrics        map[string]float64 `json:"snapshotter_metrics,omitempty"`
	// Settled is set when the run waited for the background fill to
	// fetch the whole layer and the daemon to verify it (-settle):
	// SettledSeconds runs from the start of the pull, Settled.Down is
	// every byte fetched by then.
	Settled        *proxyStats `json:"settled,omitempty"`
	SettledSeconds float64     `json:"settled_s,omitempty"`
	SettleError    string      `json:"settle_error,omitempty"`
	// DaemonPeakRSS (VmHWM) and DaemonCPUSeconds (user + system) of the
	// snapshotter since its start for this run, HolderPeakRSS of its fd
	// holder, all read at the end of the run.
	DaemonPeakRSS    int64   `json:"daemon_peak_rss_bytes"`
	DaemonCPUSeconds float64 `json:"daemon_cpu_s"`
	HolderPeakRSS    int64   `json:"holder_peak_rss_bytes"`
	// PullOutput is what the pull printed (lazy: each layer's mode).
	PullOutput string `json:"pull_output,omitempty"`
	// Leftovers is what containerd still held before the run started
	// (empty for a cold run); ColdSeconds is the time it took to get
	// there (not part of any measured time).
	Leftovers   string  `json:"leftovers,omitempty"`
	ColdSeconds float64 `json:"cold_s"`
	Error       string  `json:"error,omitempty"`
}

// failed says whether the run's figures are missing or incomplete.
func (r runResult) failed() bool { return r.Error != "" || r.SettleError != "" }

// cold brings the machine back to a cold start: no container, image,
// content or snapshot in containerd, a snapshotter restarted with settings
// s on an empty root, fresh proxy counters and connections, an empty page
// cache.
func (e *env) cold(ctx context.Context, s daemonSettings) (string, error) {
	if err := e.removeAll(ctx); err != nil {
		return "", fmt.Errorf("remove images: %w", err)
	}
	left, err := e.leftovers(ctx)
	if err != nil {
		return "", err
	}
	e.snapConfig = daemonConfig(e.proxyAddr, s)
	if err := e.restartSnapshotter(ctx); err != nil {
		return left, err
	}
	if err := e.proxy.Reset(ctx); err != nil {
		return left, err
	}
	return left, dropCaches()
}

// measure runs one cold pull-and-run of w in mode and times it.
func (e *env) measure(ctx context.Context, o options, w workload, img image, link, mode string, n int) runResult {
	r := runResult{Workload: w.Name, Link: link, Mode: mode, Run: n}
	if err := e.measureInto(ctx, o, w, img, &r); err != nil {
		r.Error = err.Error()
	}
	return r
}

func (e *env) measureInto(ctx context.Context, o options, w workload, img image, r *runResult) error {
	mi := modes[r.Mode]
	t := time.Now()
	left, err := e.cold(ctx, mi.Daemon)
	r.Leftovers, r.ColdSeconds = left, time.Since(t).Seconds()
	if err != nil {
		return fmt.Errorf("cold start: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	pull, run := e.commands(ctx, w, img, r, mi)
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
	if mi.Lazy {
		r.PullOutput = strings.TrimSpace(string(out))
	}
	if err := run.Start(); err != nil {
		return fmt.Errorf("ctr run: %w", err)
	}
	line, rerr := bufio.NewReader(stdout).ReadString('\n')
	ready := time.Since(start)
	before, serr := e.proxy.Stats(ctx)
	if mi.Lazy && serr == nil {
		r.MetricsAtReady, serr = e.snapshotterMetrics(ctx)
	}
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
	r.ReadyLine = strings.TrimRight(line, "\r\n")
	r.ReadySeconds, r.ExitSeconds, r.Before = ready.Seconds(), exit.Seconds(), before
	if r.Exit, err = e.proxy.Stats(ctx); err != nil {
		return err
	}
	if r.ReadyLine != w.Expect {
		return fmt.Errorf("ready line %q, want %q", r.ReadyLine, w.Expect)
	}
	return e.finish(ctx, o, mi, start, r)
}

// commands are the pull and the run of a mode.
func (e *env) commands(ctx context.Context, w workload, img image, r *runResult, mi modeInfo) (pull, run *exec.Cmd) {
	id := containerID("bench", w.Name, r.Link, r.Mode, strconv.Itoa(r.Run))
	if !mi.Lazy {
		pull = e.containerd.Command(ctx, "images", "pull", "--plain-http", img.Full)
		return pull, e.containerd.Command(ctx, append([]string{"run", "--rm", img.Full, id}, w.Cmd...)...)
	}
	ref := img.Lazy
	if mi.Prefetch {
		ref = img.LazyPrefetch
	}
	pull = exec.CommandContext(ctx, e.snapshotterBin, "pull", "-a", e.containerd.Socket, "-n", ctrNamespace, "--plain-http", ref)
	return pull, e.containerd.Command(ctx, append([]string{"run", "--rm", "--snapshotter", snapshotterName, ref, id}, w.Cmd...)...)
}

// finish ends a lazy run: with -settle, waits for the daemon-default
// modes' fill and verification, then reads the daemon's metrics and
// usage. A layer that does not verify is a settle error: the run's
// figures up to the ready line stand.
func (e *env) finish(ctx context.Context, o options, mi modeInfo, start time.Time, r *runResult) error {
	if !mi.Lazy {
		return nil
	}
	if o.Settle && !mi.Diagnostic {
		if err := e.waitVerified(ctx, o.SettleTimeout); err != nil {
			r.SettleError = err.Error()
		} else {
			r.SettledSeconds = time.Since(start).Seconds()
			s, err := e.proxy.Stats(ctx)
			if err != nil {
				return err
			}
			r.Settled = &s
		}
	}
	var err error
	if r.Metrics, err = e.snapshotterMetrics(ctx); err != nil {
		return err
	}
	if r.DaemonPeakRSS, r.DaemonCPUSeconds, err = procUsage(e.snap.Pid()); err != nil {
		return fmt.Errorf("snapshotter usage: %w", err)
	}
	if pid := e.holderPID(); pid > 0 {
		if r.HolderPeakRSS, _, err = procUsage(pid); err != nil {
			return fmt.Errorf("fd holder usage: %w", err)
		}
	}
	return nil
}

// Series of the daemon's layer states (spanpull_resolver_layers).
const (
	metricVerified    = `spanpull_resolver_layers{state="verified"}`
	metricUnverified  = `spanpull_resolver_layers{state="unverified"}`
	metricTreeBytes   = `spanpull_resolver_local_tree_bytes`
	metricQuarantined = `spanpull_resolver_layers{state="quarantined"}`
)

// waitVerified waits until every lazy layer the daemon serves is
// verified: the background fill has fetched it whole, the daemon has
// checked it against the layer digest and diff_id and unpacked it as a
// local tree. A quarantined layer fails at once.
func (e *env) waitVerified(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var last map[string]float64
	for {
		m, err := e.snapshotterMetrics(ctx)
		if err == nil {
			last = m
			switch {
			case m[metricQuarantined] > 0:
				return fmt.Errorf("a lazy layer was quarantined (see the daemon's log %s)", e.snap.Log)
			case m[metricVerified] > 0 && m[metricUnverified] == 0 && m[metricTreeBytes] > 0:
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lazy layers not verified after %v (verified %v, unverified %v, fill bytes %v): %w",
				timeout, last[metricVerified], last[metricUnverified], last[`spanpull_resolver_class_fetched_bytes_total{class="fill"}`], ctx.Err())
		case <-tick.C:
		}
	}
}

// holderPID is the PID of the daemon's fd holder, 0 when none has
// started.
func (e *env) holderPID() int {
	b, err := os.ReadFile(fdstore.PIDFile(filepath.Join(filepath.Dir(e.snap.Socket), "fd-holder.sock")))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// snapshotterMetrics scrapes the daemon's spanpull_* counters and gauges
// (histograms left out) from its Prometheus endpoint, by series.
func (e *env) snapshotterMetrics(ctx context.Context) (map[string]float64, error) {
	return testenv.ScrapeMetrics(ctx, e.snap.MetricsURL, "spanpull_")
}
