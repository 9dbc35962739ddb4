//go:build linux

// Command bench measures lazy pulling against full pulling on a shaped
// link: time from the start of the pull to a container's ready line (its
// first output line), bytes fetched from the registry before that line and
// in all, range GETs, and the daemon's memory, for spanpull's snapshotter
// with its defaults (lazy), with a recorded start attached (lazy+prefetch)
// and two diagnostic settings, against containerd's own pull into
// overlayfs (full), on the same registry in the same run. A second
// benchmark (-mode read) reads every file of a fully fetched, verified
// lazy layer, and random 4 KiB blocks of it, against the same files on
// overlayfs. It needs root: it creates a network namespace, starts
// containerd 1.6 and mounts file systems.
//
// Set-up, all below one temporary directory and undone on exit by PID
// (also on failure or SIGINT): docker-registry inside a network namespace
// behind a veth pair (198.18.0.0/30) with tbf on both ends for the link
// rate; a delay proxy in the namespace in front of it for the round-trip
// time (the kernel has no netem), which also counts the bytes and HTTP
// requests every pull sends; spanpull's snapshotter; containerd 1.6 with
// it as a proxy plugin. Every run is cold: images, content and snapshots
// removed, the snapshotter restarted on an empty root with its mode's
// settings, the page cache dropped.
//
// It is a module of its own (its charts need gonum), run from its
// directory or through scripts/bench-lazy.sh:
//
//	cd integration/bench && go run . -out ../../docs/bench
//	go run . -workloads python -links unshaped,100mbit -runs 3 -mode pull
//	go run . -mode read -workloads large
//	go run . -estimate
//	go run . -smoke -out /tmp/smoke
//
// Outputs in -out: results.json (every run, medians, machine), bench-lazy.md
// (tables for BENCHMARKS.md, also printed) and PNG charts.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/mod/modfile"
	"golang.org/x/sync/errgroup"
)

// options are the harness's flags.
type options struct {
	// Bench lists the benchmarks: pull (the matrix of modes) and read.
	Bench     []string      `json:"benchmarks"`
	Workloads []string      `json:"workloads"`
	Links     []string      `json:"links"`
	Modes     []string      `json:"modes"`
	RTT       time.Duration `json:"-"`
	RTTms     float64       `json:"rtt_ms"`
	Runs      int           `json:"runs"`
	// SlowRuns is the number of runs of the large image on links slower
	// than 100mbit (0: none).
	SlowRuns int `json:"slow_runs"`
	// Settle waits, after each run of a daemon-default lazy mode, for
	// the fill and the layer's verification.
	Settle        bool          `json:"settle"`
	SettleTimeout time.Duration `json:"-"`
	SpanSize      int64         `json:"span_size,omitempty"`
	// The read benchmark: passes, random reads per pass, and whether the
	// fill runs unthrottled from mount to reach a verified layer sooner.
	ReadRuns     int  `json:"read_runs"`
	RandomReads  int  `json:"random_reads"`
	ReadFastFill bool `json:"read_fast_fill"`
	Smoke        bool `json:"smoke"`

	out, cache, tmp     string
	snapshotter, indexr string
	keep, estimate      bool
}

// has says whether benchmark b was asked for.
func (o options) has(b string) bool {
	for _, x := range o.Bench {
		if x == b {
			return true
		}
	}
	return false
}

// Benchmarks of -mode.
const (
	benchPull = "pull"
	benchRead = "read"
)

func main() {
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")
	if len(os.Args) > 1 && os.Args[1] == "proxy" {
		if err := proxyMain(os.Args[2:]); err != nil {
			log.Fatal(err)
		}
		return
	}
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		log.Fatal(err)
	}
	if o.estimate {
		fmt.Println(describeEstimate(o))
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := benchmark(ctx, o); err != nil {
		log.Print(err)
		stop()
		os.Exit(1)
	}
}

func parseFlags(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	benchFlag := fs.String("mode", "pull,read", "benchmarks to run: pull (time to ready and bytes per mode), read (reading a fully fetched lazy layer against overlayfs)")
	workloadsFlag := fs.String("workloads", "python,large", "comma-separated workloads: python, large")
	linksFlag := fs.String("links", "unshaped,100mbit,20mbit", "comma-separated link rates (tc units, e.g. 100mbit) or unshaped")
	modesFlag := fs.String("modes", strings.Join(allModes, ","), "pull modes (full is always run): "+strings.Join(allModes, ", "))
	fs.DurationVar(&o.RTT, "rtt", 20*time.Millisecond, "round-trip time added on shaped links (unshaped: none)")
	fs.IntVar(&o.Runs, "runs", 3, "cold runs per workload, link and mode (the median is reported)")
	fs.IntVar(&o.SlowRuns, "slow-runs", 0, "runs of the large workload on links slower than 100mbit (0: skip them; a full pull takes minutes there)")
	fs.BoolVar(&o.Settle, "settle", true, "after each lazy and lazy+prefetch run, wait for the background fill and the layer's verification (peak RSS over the whole fill)")
	fs.DurationVar(&o.SettleTimeout, "settle-timeout", 15*time.Minute, "give up waiting for a lazy layer's verification after this long")
	fs.Int64Var(&o.SpanSize, "span-size", 0, "span size the images are indexed with, with their packs (0: the indexer's default, soci.DefaultSpanSize; e.g. 4194304, SOCI's)")
	fs.IntVar(&o.ReadRuns, "read-runs", 3, "passes of the read benchmark per file system (the median is reported)")
	fs.IntVar(&o.RandomReads, "random-reads", 2000, "random 4 KiB reads per pass of the read benchmark")
	fs.BoolVar(&o.ReadFastFill, "read-fast-fill", false, "read benchmark: start the fill at mount, unthrottled (fill_delay_seconds = 0), to reach a verified layer sooner; reads of a verified layer do not depend on it")
	fs.BoolVar(&o.Smoke, "smoke", false, "tiny configuration for tests: python workload, unshaped, every mode once, one fast-filled read pass")
	fs.BoolVar(&o.estimate, "estimate", false, "print how long the benchmark is expected to take, and exit")
	fs.StringVar(&o.out, "out", "bench-out", "directory for results.json, bench-lazy.md and the PNG charts")
	cache := os.Getenv("SPANPULL_CACHE")
	if cache == "" {
		cache = "/var/cache/spanpull"
	}
	fs.StringVar(&o.cache, "cache", cache, "directory of the cached Debian layers (scripts/debian-layer.sh)")
	fs.StringVar(&o.tmp, "tmp", "", "parent of the temporary directory (default: $TMPDIR or /tmp)")
	fs.StringVar(&o.snapshotter, "snapshotter", "", "snapshotter binary (default: go build ./cmd/snapshotter)")
	fs.StringVar(&o.indexr, "indexer", "", "indexer binary (default: go build ./cmd/indexer)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (logs, registry data)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	o.Bench, o.Workloads, o.Links = splitList(*benchFlag), splitList(*workloadsFlag), splitList(*linksFlag)
	var err error
	if o.Modes, err = parseModes(*modesFlag); err != nil {
		return o, err
	}
	if o.Smoke {
		o.Bench, o.Workloads, o.Links, o.Modes = []string{benchPull, benchRead}, []string{"python"}, []string{"unshaped"}, allModes
		o.Runs, o.SlowRuns, o.Settle = 1, 0, false
		o.ReadRuns, o.RandomReads, o.ReadFastFill = 1, 500, true
	}
	return o, o.check()
}

// check rejects flag values the benchmark cannot run with.
func (o *options) check() error {
	if o.Runs < 1 || o.SlowRuns < 0 || o.ReadRuns < 1 || o.RandomReads < 1 {
		return errors.New("-runs, -read-runs and -random-reads must be at least 1 and -slow-runs not negative")
	}
	if o.RTT < 0 || o.SettleTimeout <= 0 {
		return errors.New("-rtt must not be negative and -settle-timeout must be positive")
	}
	o.RTTms = float64(o.RTT) / float64(time.Millisecond)
	for _, b := range o.Bench {
		if b != benchPull && b != benchRead {
			return fmt.Errorf("unknown -mode %q (want pull or read)", b)
		}
	}
	known := workloads(o.cache)
	for _, w := range o.Workloads {
		if _, ok := known[w]; !ok {
			return fmt.Errorf("unknown workload %q (want python or large)", w)
		}
	}
	for _, l := range o.Links {
		if l == "unshaped" {
			continue
		}
		if _, err := parseRate(l); err != nil {
			return err
		}
	}
	if len(o.Bench) == 0 || len(o.Workloads) == 0 || len(o.Links) == 0 {
		return errors.New("-mode, -workloads and -links must not be empty")
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// runsFor is the number of runs of a cell: -slow-runs for the large image
// on links slower than 100 Mbit/s, where one full pull takes minutes (0
// skips them).
func (o options) runsFor(w, link string) int {
	if w == "large" && link != "unshaped" {
		if bits, err := parseRate(link); err == nil && bits < 100e6 {
			return o.SlowRuns
		}
	}
	return o.Runs
}

// repoModule is the module path of the spanpull repository.
const repoModule = "github.com/spanpull/spanpull"

// repoRoot finds the spanpull repository from the working directory: the
// nearest directory at or above it whose go.mod declares repoModule (the
// harness is a module of its own below it).
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && modfile.ModulePath(b) == repoModule {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("run the benchmark inside the spanpull repository")
		}
		dir = parent
	}
}

func benchmark(ctx context.Context, o options) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("the benchmark creates a network namespace, runs containerd and mounts file systems: run it as root")
	}
	begin := time.Now()
	log.Print(describeEstimate(o))
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	repo, err := repoRoot()
	if err != nil {
		return err
	}
	all := workloads(o.cache)
	var ws []workload
	for _, n := range o.Workloads {
		w := all[n]
		if err := ensureLayer(ctx, repo, w); err != nil {
			return err
		}
		ws = append(ws, w)
	}

	e, err := newEnv(ctx, o.tmp, o.keep, log.Printf)
	defer func() {
		if e == nil {
			return
		}
		if cerr := e.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", cerr))
		}
	}()
	if err != nil {
		return err
	}
	if err := e.start(ctx, o, repo); err != nil {
		return err
	}
	rep := &report{Started: begin, Command: strings.Join(append([]string{"cd integration/bench && go run ."}, os.Args[1:]...), " "), Options: o, Images: map[string]imageInfo{}}
	rep.Machine = machineInfo(ctx, repo)
	rep.Registry = e.proxyAddr
	imgs, err := e.setupImages(ctx, o, ws, rep)
	if err != nil {
		return err
	}
	if o.has(benchPull) {
		if err := e.runMatrix(ctx, o, ws, imgs, rep); err != nil {
			return err
		}
	}
	if o.has(benchRead) {
		if err := e.runReads(ctx, o, ws, imgs, rep); err != nil {
			return err
		}
	}
	rep.summarize(o)
	rep.Seconds = time.Since(begin).Seconds()
	if err := rep.write(o.out); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted: %w", err)
	}
	if n := rep.failedRuns(); n > 0 {
		return fmt.Errorf("%d runs failed (see results.json)", n)
	}
	return nil
}

// setupImages pushes and indexes every workload's image and, when
// lazy+prefetch is measured, records its start and attaches it.
func (e *env) setupImages(ctx context.Context, o options, ws []workload, rep *report) (map[string]image, error) {
	imgs := map[string]image{}
	prefetch := o.has(benchPull) && contains(o.Modes, modeLazyPrefetch)
	for _, w := range ws {
		t := time.Now()
		log.Printf("pushing and indexing %s (%s)", w.Name, w.Layer)
		img, err := e.pushImage(ctx, w)
		if err != nil {
			return nil, err
		}
		if prefetch {
			log.Printf("recording the start of %s and attaching it", w.Name)
			if err := e.recordPrefetch(ctx, w, &img); err != nil {
				return nil, err
			}
		}
		imgs[w.Name] = img
		rep.Images[w.Name] = imageInfo{Full: img.Full, Lazy: img.Lazy, LazyPrefetch: img.LazyPrefetch, ChainID: img.ChainID,
			Bytes: img.Bytes, LayerBytes: img.LayerBytes, Command: w.Cmd, SetupSeconds: time.Since(t).Seconds()}
	}
	return imgs, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// start builds the binaries the flags do not name (in parallel) and
// starts the registry, the snapshotter and containerd.
func (e *env) start(ctx context.Context, o options, repo string) error {
	var g errgroup.Group
	for _, b := range []struct {
		dst  *string
		flag string
		pkg  string
	}{{&e.snapshotterBin, o.snapshotter, "snapshotter"}, {&e.indexerBin, o.indexr, "indexer"}} {
		if b.flag != "" {
			*b.dst = b.flag
			continue
		}
		*b.dst = filepath.Join(e.dir, "bin", b.pkg)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", *b.dst, "./cmd/"+b.pkg)
		cmd.Dir = repo
		g.Go(func() error {
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go build ./cmd/%s: %w\n%s", b.pkg, err, out)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	e.spanSize = o.SpanSize
	if err := e.startRegistry(ctx); err != nil {
		return err
	}
	if err := e.startSnapshotter(ctx); err != nil {
		return err
	}
	return e.startContainerd(ctx)
}

// runMatrix measures every workload on every link in every mode, rotating
// which mode goes first from run to run, and writes results.json after
// every run.
func (e *env) runMatrix(ctx context.Context, o options, ws []workload, imgs map[string]image, rep *report) error {
	for _, link := range o.Links {
		rate, rtt := link, o.RTT
		if link == "unshaped" {
			rate, rtt = "", 0
		}
		if err := e.shape(ctx, rate, rtt); err != nil {
			return fmt.Errorf("shape %s: %w", link, err)
		}
		for _, w := range ws {
			for n := 1; n <= o.runsFor(w.Name, link); n++ {
				k := (n - 1) % len(o.Modes)
				order := append(append([]string{}, o.Modes[k:]...), o.Modes[:k]...)
				for _, m := range order {
					if err := ctx.Err(); err != nil {
						return err
					}
					r := e.measure(ctx, o, w, imgs[w.Name], link, m, n)
					logRun(r)
					rep.Runs = append(rep.Runs, r)
					if err := rep.writeJSON(o.out); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// write writes results.json, bench-lazy.md (also printed) and the charts
// to dir.
func (rep *report) write(dir string) error {
	if err := rep.writeJSON(dir); err != nil {
		return err
	}
	md := rep.markdown()
	if err := os.WriteFile(filepath.Join(dir, "bench-lazy.md"), []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Print(md)
	return rep.charts(dir)
}

func logRun(r runResult) {
	if r.Error != "" {
		log.Printf("%s %s %s run %d FAILED: %s", r.Workload, r.Link, r.Mode, r.Run, r.Error)
		return
	}
	log.Printf("%s %s %s run %d: ready %.2f s (pull %.2f s), %.1f MB before ready (%d range GETs), %.1f MB at exit, daemon RSS %.0f MiB CPU %.2f s",
		r.Workload, r.Link, r.Mode, r.Run, r.ReadySeconds, r.PullSeconds, float64(r.Before.Down)/1e6, r.Before.RangeGets,
		float64(r.Exit.Down)/1e6, float64(r.DaemonPeakRSS)/(1<<20), r.DaemonCPUSeconds)
	if r.Settled != nil {
		log.Printf("  settled (layer verified) after %.1f s, %.1f MB in all", r.SettledSeconds, float64(r.Settled.Down)/1e6)
	}
	if r.SettleError != "" {
		log.Printf("  SETTLE FAILED: %s", r.SettleError)
	}
}

func (rep *report) writeJSON(dir string) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, "results.json.tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "results.json"))
}
