//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/spanpull/spanpull/internal/proc"
)

// The file systems the read benchmark compares.
const (
	fsOverlay  = "overlayfs" // containerd's overlayfs snapshotter, after a full pull
	fsSpanpull = "spanpull"  // a container started once the lazy layer was verified: overlayfs on its local tree
	// fsSpanpullFUSE is a container started while the layer was lazy: its
	// rootfs stacks the FUSE mount for good, read by passthrough once the
	// layer is verified (a diagnostic).
	fsSpanpullFUSE = "spanpull-fuse"
)

// readFileSystems are the file systems of a read pass, in table order.
var readFileSystems = []string{fsOverlay, fsSpanpull, fsSpanpullFUSE}

// readResult is the read benchmark of one image: a container's rootfs
// (an active snapshot over the image, as ctr run would mount it) read on
// overlayfs after a full pull, and on spanpull after a lazy pull whose
// background fill fetched the whole layer and whose daemon verified it and
// unpacked it as a local tree (readFileSystems: a snapshot prepared after
// that, and one prepared while the layer was lazy). All are mounted at
// once; the page cache is dropped before every pass.
type readResult struct {
	Workload string `json:"workload"`
	// SettledSeconds runs from the start of the lazy pull to the layer's
	// verification (a full pull of the image ran meanwhile); FastFill says whether the fill ran unthrottled from
	// mount (-read-fast-fill) or with the daemon's defaults.
	SettledSeconds float64 `json:"settled_s"`
	FastFill       bool    `json:"fast_fill"`
	// VerifiedLabel is the containerd.io/snapshot/spanpull.verified label
	// of the layer's snapshot when the passes started.
	VerifiedLabel string `json:"verified_label"`
	// DaemonNotes are the daemon's log lines saying a layer is not served
	// by passthrough (none expected).
	DaemonNotes []string `json:"daemon_notes,omitempty"`
	// Files and Bytes are the regular files every pass reads whole.
	Files int   `json:"files"`
	Bytes int64 `json:"bytes"`
	// RandomFiles is the number of files the random reads spread over.
	RandomFiles int        `json:"random_files"`
	Passes      []readPass `json:"passes"`
	// The daemon's and fd holder's peak RSS after the passes.
	DaemonPeakRSS int64  `json:"daemon_peak_rss_bytes"`
	HolderPeakRSS int64  `json:"holder_peak_rss_bytes"`
	Error         string `json:"error,omitempty"`
}

// readPass is one pass over one file system.
type readPass struct {
	Pass int    `json:"pass"`
	FS   string `json:"fs"`
	// ReadAllSeconds reads every regular file once, sequentially, in
	// 1 MiB reads; MBps is Bytes over it.
	ReadAllSeconds float64 `json:"read_all_s"`
	MBps           float64 `json:"mb_per_s"`
	// Random 4 KiB preads at 4 KiB-aligned offsets, files already open,
	// page cache dropped: latency percentiles in microseconds.
	RandomReads  int     `json:"random_reads"`
	MedianMicros float64 `json:"median_us"`
	P90Micros    float64 `json:"p90_us"`
	P99Micros    float64 `json:"p99_us"`
	MeanMicros   float64 `json:"mean_us"`
}

// runReads runs the read benchmark for every workload, unshaped.
func (e *env) runReads(ctx context.Context, o options, ws []workload, imgs map[string]image, rep *report) error {
	if err := e.shape(ctx, "", 0); err != nil {
		return fmt.Errorf("unshape: %w", err)
	}
	for _, w := range ws {
		if err := ctx.Err(); err != nil {
			return err
		}
		r := readResult{Workload: w.Name, FastFill: o.ReadFastFill}
		if err := e.readBench(ctx, o, w, imgs[w.Name], &r); err != nil {
			r.Error = err.Error()
			e.logf("read %s FAILED: %v", w.Name, err)
		}
		rep.Reads = append(rep.Reads, r)
		if err := rep.writeJSON(o.out); err != nil {
			return err
		}
	}
	return nil
}

// readBench pulls w both ways, waits for the lazy layer's verification,
// mounts both rootfs views and runs the passes, alternating which file
// system goes first.
func (e *env) readBench(ctx context.Context, o options, w workload, img image, r *readResult) (err error) {
	if _, err := e.cold(ctx, daemonSettings{FastFill: o.ReadFastFill}); err != nil {
		return fmt.Errorf("cold start: %w", err)
	}
	start := time.Now()
	if _, err := proc.CombinedOutput(ctx, e.snapshotterBin, "pull", "-a", e.containerd.Socket, "-n", ctrNamespace, "--plain-http", img.Lazy); err != nil {
		return fmt.Errorf("lazy pull: %w", err)
	}
	// A container started while the layer is lazy.
	roots := map[string]string{fsSpanpullFUSE: filepath.Join(e.dir, "read-"+fsSpanpullFUSE)}
	unmountFUSE, err := e.mountView(ctx, fsSpanpull, "bench-read-fuse-"+w.Name, img.ChainID, roots[fsSpanpullFUSE])
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, unmountFUSE()) }()
	// The full pull goes while the lazy layer fills.
	if _, err := e.containerd.Run(ctx, "images", "pull", "--plain-http", img.Full); err != nil {
		return err
	}
	if err := e.waitVerified(ctx, o.SettleTimeout); err != nil {
		return err
	}
	r.SettledSeconds = time.Since(start).Seconds()
	r.VerifiedLabel = e.verifiedLabel(ctx, img.ChainID)

	for _, sn := range []string{fsOverlay, fsSpanpull} {
		target := filepath.Join(e.dir, "read-"+sn)
		unmount, err := e.mountView(ctx, sn, "bench-read-"+w.Name, img.ChainID, target)
		if err != nil {
			return err
		}
		defer func() { err = errors.Join(err, unmount()) }()
		roots[sn] = target
	}
	files, err := regularFiles(roots[fsOverlay])
	if err != nil {
		return err
	}
	for _, f := range files {
		r.Bytes += f.size
	}
	r.Files = len(files)
	sample := randomSample(files, o.RandomReads)
	r.RandomFiles = len(sample.files)
	for n := 1; n <= o.ReadRuns; n++ {
		for k := range readFileSystems { // each goes first in turn
			sn := readFileSystems[(k+n-1)%len(readFileSystems)]
			p, err := readPassOn(roots[sn], files, sample)
			if err != nil {
				return fmt.Errorf("%s pass %d: %w", sn, n, err)
			}
			p.Pass, p.FS = n, sn
			e.logf("read %s %s pass %d: all files %.2f s (%.0f MB/s), random 4 KiB median %.0f us p99 %.0f us",
				w.Name, sn, n, p.ReadAllSeconds, p.MBps, p.MedianMicros, p.P99Micros)
			r.Passes = append(r.Passes, p)
		}
	}
	r.DaemonNotes = e.passthroughNotes()
	if r.DaemonPeakRSS, _, err = procUsage(e.snap.Pid()); err != nil {
		return err
	}
	if pid := e.holderPID(); pid > 0 {
		r.HolderPeakRSS, _, _ = procUsage(pid)
	}
	return nil
}

// mountView prepares an active snapshot over parent on snapshotter sn
// (what ctr run gives a container) and mounts it at target. The returned
// function unmounts it and removes the snapshot.
func (e *env) mountView(ctx context.Context, sn, key, parent, target string) (func() error, error) {
	// Under a lease: containerd's garbage collector (a pull runs one)
	// removes snapshots that nothing references.
	ctx, done, err := e.client.WithLease(namespaces.WithNamespace(ctx, ctrNamespace), leases.WithExpiration(time.Hour))
	if err != nil {
		return nil, err
	}
	ss := e.client.SnapshotService(sn)
	ms, err := ss.Prepare(ctx, key, parent)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("prepare %s snapshot %s: %w", sn, key, err), done(context.WithoutCancel(ctx)))
	}
	remove := func() error {
		bg := context.WithoutCancel(ctx)
		return errors.Join(ss.Remove(bg, key), done(bg))
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, errors.Join(err, remove())
	}
	if err := mount.All(ms, target); err != nil {
		return nil, errors.Join(fmt.Errorf("mount %s snapshot %s: %w", sn, key, err), remove())
	}
	return func() error {
		return errors.Join(mount.UnmountAll(target, 0), remove())
	}, nil
}

// verifiedLabel is the verification label containerd reports for the
// lazy layer's snapshot ("" if it has none).
func (e *env) verifiedLabel(ctx context.Context, chain string) string {
	info, err := e.client.SnapshotService(snapshotterName).Stat(namespaces.WithNamespace(ctx, ctrNamespace), chain)
	if err != nil {
		return "error: " + err.Error()
	}
	return info.Labels[labelVerified]
}

// labelVerified is the snapshot label with a lazy layer's verification
// state: snapshotter.LabelVerified, restated because importing the
// daemon's snapshotter package would pull its storage into this module.
const labelVerified = "containerd.io/snapshot/spanpull.verified"

// passthroughNotes are the daemon's log lines saying reads do not go by
// passthrough.
func (e *env) passthroughNotes() []string {
	b, err := os.ReadFile(e.snap.Log)
	if err != nil {
		return []string{err.Error()}
	}
	var notes []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "passthrough") && (strings.Contains(line, "level=warn") || strings.Contains(line, "not unpacked")) {
			notes = append(notes, line)
		}
	}
	return notes
}

// fileInfo is a regular file of a rootfs, by path relative to it.
type fileInfo struct {
	path string
	size int64
}

// regularFiles lists the regular files below root in walk order.
func regularFiles(root string) ([]fileInfo, error) {
	var files []fileInfo
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		files = append(files, fileInfo{path: rel, size: info.Size()})
		return nil
	})
	return files, err
}

// sample is where the random reads go: files (at most sampleFiles, chosen
// with probability by size among those of at least 4 KiB) and reads, an
// index into files and a 4 KiB-aligned offset each. The same sample is
// read on both file systems.
type sample struct {
	files []string
	reads []sampleRead
}

type sampleRead struct {
	file int
	off  int64
}

// sampleFiles bounds the files the random reads keep open at once.
const sampleFiles = 256

// readSize is the random reads' size.
const readSize = 4096

// randomSample draws n reads with a fixed seed: every 4 KiB block of the
// sampled files is as likely as any other.
func randomSample(files []fileInfo, n int) sample {
	rng := rand.New(rand.NewPCG(1, 2))
	var big []fileInfo
	for _, f := range files {
		if f.size >= readSize {
			big = append(big, f)
		}
	}
	pick := func(from []fileInfo) int { // by size
		cum := make([]int64, len(from))
		var total int64
		for i, f := range from {
			total += f.size
			cum[i] = total
		}
		x := rng.Int64N(total)
		return sort.Search(len(cum), func(i int) bool { return cum[i] > x })
	}
	var s sample
	if len(big) == 0 {
		return s
	}
	chosen := map[int]bool{}
	var picked []fileInfo
	for len(picked) < sampleFiles && len(chosen) < len(big) {
		i := pick(big)
		if !chosen[i] {
			chosen[i] = true
			picked = append(picked, big[i])
			s.files = append(s.files, big[i].path)
		}
	}
	for range n {
		i := pick(picked)
		blocks := picked[i].size / readSize
		s.reads = append(s.reads, sampleRead{file: i, off: rng.Int64N(blocks) * readSize})
	}
	return s
}

// readPassOn reads every file below root once, then does the sample's
// random reads, dropping the page cache before each.
func readPassOn(root string, files []fileInfo, s sample) (readPass, error) {
	var p readPass
	if err := dropCaches(); err != nil {
		return p, err
	}
	buf := make([]byte, 1<<20)
	var total int64
	start := time.Now()
	for _, f := range files {
		n, err := readWhole(filepath.Join(root, f.path), buf)
		if err != nil {
			return p, err
		}
		total += n
	}
	p.ReadAllSeconds = time.Since(start).Seconds()
	if p.ReadAllSeconds > 0 {
		p.MBps = float64(total) / 1e6 / p.ReadAllSeconds
	}
	lat, err := randomReads(root, s)
	if err != nil {
		return p, err
	}
	p.RandomReads = len(lat)
	p.MedianMicros, p.P90Micros, p.P99Micros = percentile(lat, 0.5), percentile(lat, 0.9), percentile(lat, 0.99)
	var sum float64
	for _, l := range lat {
		sum += l
	}
	if len(lat) > 0 {
		p.MeanMicros = sum / float64(len(lat))
	}
	return p, nil
}

// readWhole reads a file to its end with buf (not io.Copy: io.Discard
// would read in its own small buffer).
func readWhole(path string, buf []byte) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var total int64
	for {
		n, err := f.Read(buf)
		total += int64(n)
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("read %s: %w", path, err)
		}
	}
}

// randomReads opens the sample's files, drops the page cache (open files
// keep their inodes, not their pages) and times each 4 KiB pread, in
// microseconds.
func randomReads(root string, s sample) ([]float64, error) {
	fds := make([]*os.File, len(s.files))
	defer func() {
		for _, f := range fds {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i, p := range s.files {
		f, err := os.Open(filepath.Join(root, p))
		if err != nil {
			return nil, err
		}
		fds[i] = f
	}
	if err := dropCaches(); err != nil {
		return nil, err
	}
	buf := make([]byte, readSize)
	lat := make([]float64, 0, len(s.reads))
	for _, rd := range s.reads {
		start := time.Now()
		n, err := fds[rd.file].ReadAt(buf, rd.off)
		d := time.Since(start)
		if err != nil || n != readSize {
			return nil, fmt.Errorf("pread %s at %d: %d bytes, %v", s.files[rd.file], rd.off, n, err)
		}
		lat = append(lat, float64(d)/float64(time.Microsecond))
	}
	return lat, nil
}

// percentile is the q-quantile of v (nearest rank), 0 for none.
func percentile(v []float64, q float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(q*float64(len(s)) + 0.5)
	return s[min(max(i-1, 0), len(s)-1)]
}
