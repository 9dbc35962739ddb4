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
	"github.com/spanpull/spanpull/internal/testutil/dirtest"
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
	testRestartReads(t, "py/restart-kill", nil, killAndRestart)
}

// killAndRestart kills the daemon with SIGKILL and starts it again
// restartGap later.
func killAndRestart(t *testing.T, e *lazyEnv) {
	t.Helper()
	if err := e.sn.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the killed daemon to exit", e.sn.Exited)
	time.Sleep(restartGap)
	e.startSnapshotter(t)
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

// TestRestartCRI is TestRestartKill through CRI, as the kubelet runs
// pods, on containerd 2.2: crictl pulls the indexed image (lazily: the
// snapshot's mode label) and runs a pod whose container does the read
// loop; the daemon is killed and restarted under it. The loop's output is
// the container's CRI log.
func TestRestartCRI(t *testing.T) {
	testenv.RequireRoot(t)
	crictl := testenv.Crictl(t)
	bins := testenv.Containerd2Binaries(t)
	e := newLazyCRIEnv(t, bins, "198.18.23.0/24")
	ref := e.reg.Addr + "/py/cri:soci"
	e.indexer(t, "convert", e.reg.Addr+"/py/cri:src", ref)
	must := func(args ...string) string {
		t.Helper()
		return e.cd.MustCrictl(t, crictl, e.cd.Socket, args...)
	}
	must("pull", ref)
	if mode := e.snapshotMode(t); mode != "lazy" {
		t.Fatalf("CRI pull not lazy: the layer's snapshot has mode label %q", mode)
	}
	loop := newReadLoop(t, e)

	logDir := mkdir(t, filepath.Join(e.dir, "pod-logs"))
	podCfg := writeJSON(t, e.dir, "pod.json", map[string]any{
		"metadata":      map[string]any{"name": "reader", "namespace": "default", "uid": "reader-uid", "attempt": 0},
		"log_directory": logDir,
		"linux":         map[string]any{},
	})
	ctrCfg := writeJSON(t, e.dir, "container.json", map[string]any{
		"metadata": map[string]any{"name": "reader"},
		"image":    map[string]any{"image": ref},
		"command":  loop.command(),
		"log_path": "reader.log",
		"linux":    map[string]any{},
	})
	pod := must("runp", podCfg)
	ctr := must("create", pod, ctrCfg, podCfg)
	must("start", ctr)
	logPath := filepath.Join(logDir, "reader.log")
	waitFor(t, 2*time.Minute, "the read loop's first reads", func() bool { return len(criLogLines(t, logPath)) >= restartAfter })
	loop.restart(t, killAndRestart)
	waitFor(t, 2*time.Minute, "the container to exit", func() bool {
		return strings.Contains(must("inspect", "-o", "go-template", "--template", "{{.status.state}}", ctr), "EXITED")
	})
	if code := must("inspect", "-o", "go-template", "--template", "{{.status.exitCode}}", ctr); code != "0" {
		t.Fatalf("the read loop exited with %s", code)
	}
	loop.check(t, criLogLines(t, logPath))
	must("rmp", "-f", pod)
	must("rmi", ref)
}

// newLazyCRIEnv is newLazyEnv with containerd 2 (from bins) serving CRI
// on subnet, the Debian + python3 image pushed as py/cri:src and a pause
// image for the sandboxes.
func newLazyCRIEnv(t *testing.T, bins, subnet string) *lazyEnv {
	t.Helper()
	e := newLazyBase(t, lazyPythonConfig)
	e.pushPython(t, "py/cri", "src")
	pause, _ := testenv.PushImage(t, e.reg.Addr, "cri/pause", "1", []string{"/pause"}, testenv.PauseImageLayer(t))
	// containerd reaches the registry over plain HTTP through hosts.toml.
	certs := filepath.Join(e.dir, "certs.d")
	host, port, _ := strings.Cut(e.reg.Addr, ":")
	toml := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", e.reg.Addr, e.reg.Addr)
	if err := os.WriteFile(filepath.Join(mkdir(t, filepath.Join(certs, host+"_"+port+"_")), "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	e.startSnapshotter(t)
	e.cd = testenv.StartContainerdCRI(t, e.dir, testenv.CRIConfig{BinDir: bins, Snapshotter: e.sn.Socket,
		SandboxImage: pause, RegistryConfigPath: certs, Subnet: subnet})
	e.cd.MustCrictl(t, testenv.Crictl(t), e.cd.Socket, "pull", pause)
	return e
}

// criLogLines returns the content of the lines of a CRI container log
// ("<time> <stream> <tag> <content>"), nil while there is none.
func criLogLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if f := strings.SplitN(l, " ", 4); len(f) == 4 && f[1] == "stdout" {
			out = append(out, f[3])
		}
	}
	return out
}

// testRestartReads runs the read loop in a container of the Debian layer
// pulled lazily from repo, calls restart restartAfter reads into it, and
// checks every read. prepare, if set, runs before the loop.
func testRestartReads(t *testing.T, repo string, prepare, restart func(*testing.T, *lazyEnv)) {
	e := newLazyEnv(t, lazyPythonConfig)
	ref := e.pullLazy(t, repo)
	loop := newReadLoop(t, e)
	if prepare != nil {
		prepare(t, e)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	args := append([]string{"run", "--rm", "--snapshotter", "spanpull", ref, "reader"}, loop.command()...)
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
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if lines = append(lines, sc.Text()); len(lines) == restartAfter {
			loop.restart(t, restart)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("read loop container: %v\n%s", err, stderr.String())
	}
	loop.check(t, lines)
	e.removeImage(t, ref)
}

// readLoop is one run of readLoopScript on the Debian layer of a lazyEnv
// across a restart of the daemon: the files it reads, their sums, and what
// the test measured.
type readLoop struct {
	e     *lazyEnv
	spans []ztoc.Span
	files []string
	want  map[string]string // sha256 by path

	before, beforeRestart map[string]float64 // the old daemon's metrics
	restartedAt, backAt   time.Time
}

// newReadLoop picks the files of a read loop from the layer the daemon
// stored and computes their sums from the pristine layer.
func newReadLoop(t *testing.T, e *lazyEnv) *readLoop {
	t.Helper()
	z, spans := e.storedZtoc(t)
	files := loopFiles(spans, spanFiles(z, spans), int(readLoopFor/readEvery))
	return &readLoop{e: e, spans: spans, files: files, want: layerFileSums(t, z, e.layer.Blob, files), before: e.metrics(t)}
}

// command is the container's command line.
func (l *readLoop) command() []string {
	return append([]string{"python3", "-c", readLoopScript}, l.files...)
}

// restart restarts the daemon with restart, noting when.
func (l *readLoop) restart(t *testing.T, restart func(*testing.T, *lazyEnv)) {
	t.Helper()
	l.beforeRestart = l.e.metrics(t)
	l.restartedAt = time.Now()
	restart(t, l.e)
	l.backAt = time.Now()
	t.Logf("daemon back %v after the restart began", l.backAt.Sub(l.restartedAt).Round(time.Millisecond))
}

// check checks what the loop printed (lines) and the new daemon: every
// file read right, no read error counted, the live FUSE connection taken
// over, one read waiting across the restart and none too long.
func (l *readLoop) check(t *testing.T, lines []string) {
	t.Helper()
	if l.restartedAt.IsZero() {
		t.Fatalf("the container printed %d lines, fewer than the %d before the restart:\n%s", len(lines), restartAfter, strings.Join(lines, "\n"))
	}
	after := l.e.metrics(t)
	longest, longestStart := checkReadLoop(t, lines, l.want)
	fetched := l.beforeRestart[mSpansFetched] - l.before[mSpansFetched] + after[mSpansFetched]
	t.Logf("%d reads of %d files in %d spans, %v span fetches (%v by the new daemon); longest read %v, started %v after the restart began",
		len(lines), len(l.files), len(l.spans), fetched, after[mSpansFetched], longest.Round(time.Millisecond),
		longestStart.Sub(l.restartedAt).Round(time.Millisecond))
	if after[mReadErrors] != 0 || l.beforeRestart[mReadErrors] != 0 {
		t.Fatalf("the daemons counted read errors: %v before the restart, %v after", l.beforeRestart[mReadErrors], after[mReadErrors])
	}
	if !strings.Contains(dirtest.ReadString(t, l.e.sn.Log), "took over the live FUSE connection") {
		t.Fatalf("the new daemon did not log that it took over the live FUSE connection:\n%s", l.e.sn.LogTail(8<<10))
	}
	// Reads take milliseconds, but one of them had to wait for the new
	// daemon (a read every 100 ms, the daemon away for a second).
	if longest < restartGap/2 || longestStart.Before(l.restartedAt.Add(-time.Second)) || longestStart.After(l.backAt) {
		t.Fatalf("no read waited across the restart: the longest (%v) started %v after it began, the daemon was back after %v",
			longest, longestStart.Sub(l.restartedAt), l.backAt.Sub(l.restartedAt))
	}
	if longest > maxRestartRead {
		t.Fatalf("longest read %v, want < %v", longest, maxRestartRead)
	}
}

// loopFiles picks n files for the read loop from byspan (files lying
// wholly in one span): up to len(loopPicks) files per span, at the
// fractions loopPicks of the span, read round-robin over the spans (the
// k-th pick of every span in round k). The first read of a span fetches
// the span, so with more spans than reads in the loop (the Debian layer
// has a few hundred) every read fetches. Paths are absolute in the
// container.
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
