//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// Restarts of the daemon under a container that keeps reading its lazy
// layer: the daemon's FUSE connections live in the fd holder, and the
// next daemon takes them over, so the container sees slow reads across
// the restart, never failed ones.

// Shape of the read loop of the restart tests: a different file every
// readEvery, for about readLoopFor; the restart starts restartAfter
// reads into the loop and the daemon stays away restartGap.
const (
	readEvery    = 100 * time.Millisecond
	readLoopFor  = 20 * time.Second
	restartAfter = 40
	restartGap   = time.Second
	// maxRestartRead bounds the longest read: the gap, a daemon start and
	// the fetch of the read's span, with room for a loaded machine.
	maxRestartRead = 15 * time.Second
)

// readLoopScript is the container's read loop (python3 of the Debian
// layer): it reads each file named on its command line, 100 ms apart, and
// prints per file "OK|ERR <start unix time> <milliseconds> <sha256 or
// errno> <path>". It times the open and the read together.
const readLoopScript = `import hashlib, sys, time
for p in sys.argv[1:]:
    start, t0 = time.time(), time.monotonic()
    try:
        with open(p, 'rb') as f:
            res = 'OK', hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        res = 'ERR', str(e.errno)
    print(res[0], '%.3f' % start, '%.1f' % ((time.monotonic() - t0) * 1000), res[1], p, flush=True)
    time.sleep(0.1)
`

// TestRestartKill kills the daemon with SIGKILL while a container reads
// a different file of its lazy layer (background fill off, so that reads
// go to the registry) every 100 ms, and starts it again a second later:
// every read must succeed with the right bytes, the new daemon must say it
// took over the live FUSE connection, and the longest read is reported.
func TestRestartKill(t *testing.T) {
	testRestartReads(t, "py/restart-kill", nil, func(t *testing.T, e *lazyEnv) {
		if err := e.sn.Cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the killed daemon to exit", e.sn.Exited)
		time.Sleep(restartGap)
		e.startSnapshotter(t)
	})
}

// TestUpgradeDaemon is TestRestartKill for an upgrade: the daemon is
// stopped with SIGTERM and a freshly built binary (another file, built
// with other link flags, so another executable) is started on the same root
// and socket a second later.
func TestUpgradeDaemon(t *testing.T) {
	var newBin string
	build := func(t *testing.T, e *lazyEnv) {
		newBin = testenv.BuildGo(t, mkdir(t, filepath.Join(e.dir, "new")), "github.com/spanpull/spanpull/cmd/snapshotter",
			"snapshotter", "GOFLAGS=-ldflags=-X=main.upgradeBuild=1")
		if fileSum(t, newBin) == fileSum(t, e.snapBin) {
			t.Fatal("the new build is the same executable as the running one")
		}
	}
	testRestartReads(t, "py/upgrade", build, func(t *testing.T, e *lazyEnv) {
		if err := e.sn.Stop(15 * time.Second); err != nil {
			t.Fatalf("the daemon did not stop cleanly on SIGTERM: %v", err)
		}
		time.Sleep(restartGap)
		e.snapBin = newBin
		e.startSnapshotter(t)
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", e.sn.Pid())); err != nil || exe != newBin {
			t.Fatalf("the daemon runs %s (%v), want the new build %s", exe, err, newBin)
		}
	})
}

// testRestartReads runs the read loop in a container of the Debian layer
// pulled lazily from repo, calls restart restartAfter reads into it, and
// checks every read. prepare, if set, runs before the loop.
func testRestartReads(t *testing.T, repo string, prepare, restart func(*testing.T, *lazyEnv)) {
	e := newLazyEnv(t, lazyPythonConfig)
	ref := e.pullLazy(t, repo)
	z, spans := e.storedZtoc(t)
	files := loopFiles(spans, spanFiles(z, spans), int(readLoopFor/readEvery))
	want := layerFileSums(t, z, e.layer.Blob, files)
	if prepare != nil {
		prepare(t, e)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := append([]string{"run", "--rm", "--snapshotter", "spanpull", ref, "reader", "python3", "-c", readLoopScript}, files...)
	cmd := e.cd.Command(ctx, args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var lines []string
	var restartedAt, backAt time.Time
	before := e.metrics(t)
	var beforeRestart map[string]float64
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) == restartAfter {
			beforeRestart = e.metrics(t)
			restartedAt = time.Now()
			restart(t, e)
			backAt = time.Now()
			t.Logf("daemon back %v after the restart began", backAt.Sub(restartedAt).Round(time.Millisecond))
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("read loop container: %v\n%s", err, stderr.String())
	}
	if restartedAt.IsZero() {
		t.Fatalf("the container printed %d lines, fewer than the %d before the restart:\n%s", len(lines), restartAfter, strings.Join(lines, "\n"))
	}
	after := e.metrics(t)
	longest, longestStart := checkReadLoop(t, lines, want)
	fetched := beforeRestart[mSpansFetched] - before[mSpansFetched] + after[mSpansFetched]
	t.Logf("%d reads of %d files in %d spans, %v span fetches (%v by the new daemon); longest read %v, started %v after the restart began",
		len(lines), len(files), len(spans), fetched, after[mSpansFetched], longest.Round(time.Millisecond),
		longestStart.Sub(restartedAt).Round(time.Millisecond))
	if after[mReadErrors] != 0 || beforeRestart[mReadErrors] != 0 {
		t.Fatalf("the daemons counted read errors: %v before the restart, %v after", beforeRestart[mReadErrors], after[mReadErrors])
	}
	if !strings.Contains(logOf(t, e.sn.Log), "took over the live FUSE connection") {
		t.Fatalf("the new daemon did not log that it took over the live FUSE connection:\n%s", e.sn.LogTail(8<<10))
	}
	// Reads take milliseconds, but one of them had to wait for the new
	// daemon (a read every 100 ms, the daemon away for a second).
	if longest < restartGap/2 || longestStart.Before(restartedAt.Add(-time.Second)) || longestStart.After(backAt) {
		t.Fatalf("no read waited across the restart: the longest (%v) started %v after it began, the daemon was back after %v",
			longest, longestStart.Sub(restartedAt), backAt.Sub(restartedAt))
	}
	if longest > maxRestartRead {
		t.Fatalf("longest read %v, want < %v", longest, maxRestartRead)
	}
	e.removeImage(t, ref)
}

// loopFiles picks n files for the read loop from byspan (files lying
// wholly in one span): up to len(loopPicks) files per span, at the
// fractions loopPicks of the span, read round-robin over the spans (the
// k-th pick of every span in round k). A read of a span fetches its
// compressed bytes only through the read's chunk, and the next fetch of
// the span at least prefixGrowth (4) times as far: the picks lie beyond
// what the reads before them fetched, so that most reads fetch. Paths are
// absolute in the container.
func loopFiles(spans []ztoc.Span, byspan map[ztoc.SpanID][]ztoc.FileMetadata, n int) []string {
	picks := make([][]string, len(spans))
	for i, s := range spans {
		fs := byspan[s.ID]
		used := map[int]bool{}
		for _, frac := range loopPicks {
			at := s.UncompressedStart + int64(frac*float64(s.UncompressedEnd-s.UncompressedStart))
			best := -1
			for k, f := range fs {
				if !used[k] && (best < 0 || absDiff(f.UncompressedOffset, at) < absDiff(fs[best].UncompressedOffset, at)) {
					best = k
				}
			}
			if best >= 0 {
				used[best] = true
				picks[i] = append(picks[i], "/"+ztoc.CleanPath(fs[best].Name))
			}
		}
	}
	var out []string
	for round := range loopPicks {
		for _, p := range picks {
			if round < len(p) && len(out) < n {
				out = append(out, p[round])
			}
		}
	}
	return out
}

// loopPicks are where in its span each file of the read loop lies, in the
// order they are read.
var loopPicks = []float64{0, 0.1, 0.4, 0.95, 0.7, 0.2}

func absDiff(a, b int64) int64 { return max(a-b, b-a) }

// layerFileSums returns the sha256 (hex) of each file (absolute path)
// read from the pristine layer blob described by z.
func layerFileSums(t *testing.T, z *ztoc.Ztoc, blob []byte, paths []string) map[string]string {
	t.Helper()
	r, err := span.NewLayer(digest.FromBytes(blob), z, span.LocalBlob(bytes.NewReader(blob)), span.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	byPath := map[string]ztoc.FileMetadata{}
	for _, f := range z.Files {
		byPath["/"+ztoc.CleanPath(f.Name)] = f
	}
	sums := map[string]string{}
	for _, p := range paths {
		f, ok := byPath[p]
		if !ok {
			t.Fatalf("%s is not in the zTOC", p)
		}
		b := make([]byte, f.UncompressedSize)
		if _, err := r.ReadAt(context.Background(), b, f.UncompressedOffset); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		sums[p] = hex.EncodeToString(sum[:])
	}
	return sums
}

// checkReadLoop checks the lines readLoopScript printed: one per file, in
// order, each "OK" with the file's sha256. It returns the longest read and
// when it started.
func checkReadLoop(t *testing.T, lines []string, want map[string]string) (longest time.Duration, started time.Time) {
	t.Helper()
	var failed []string
	seen := map[string]bool{}
	for _, line := range lines {
		f := strings.Fields(line)
		if len(f) != 5 {
			t.Fatalf("read loop printed %q", line)
		}
		status, path := f[0], f[4]
		start, err1 := strconv.ParseFloat(f[1], 64)
		ms, err2 := strconv.ParseFloat(f[2], 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("read loop printed %q", line)
		}
		if _, ok := want[path]; !ok || seen[path] {
			t.Fatalf("read loop read %s, which it was not given or read before", path)
		}
		seen[path] = true
		if status != "OK" || f[3] != want[path] {
			failed = append(failed, line)
		}
		if d := time.Duration(ms * float64(time.Millisecond)); d > longest {
			longest, started = d, time.UnixMicro(int64(start*1e6))
		}
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d reads failed or read wrong bytes:\n%s", len(failed), len(seen), strings.Join(failed, "\n"))
	}
	if len(seen) != len(want) {
		t.Fatalf("read loop read %d files, want %d", len(seen), len(want))
	}
	return longest, started
}

// fileSum returns the sha256 of a file.
func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// logOf returns a daemon's log.
func logOf(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
