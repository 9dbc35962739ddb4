//go:build linux

package integration

import (
	"archive/tar"
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/integration/testenv"
)

// Shape of TestMemoryMillionEntries' layer: manyDirs directories of
// manyFiles empty files each, manyDirs x (manyFiles + 1) entries.
const (
	manyDirs  = 1000
	manyFiles = 999
	// maxDaemonRSS bounds the daemon's resident memory, and its peak,
	// while the layer is mounted (DESIGN-P2.md section 1).
	maxDaemonRSS = 300 << 20
)

// TestMemoryMillionEntries mounts a generated layer of 1,000,000 entries
// (directories of empty files) lazily and measures the daemon's memory in
// /proc: its RSS and its peak RSS (VmHWM, which includes loading the
// layer's index) must stay under 300 MiB while the layer is mounted, and
// once the image is removed (the layer unmounted, its index dropped) RSS
// must come back down to where it was before the pull, within
// rssTolerance.
func TestMemoryMillionEntries(t *testing.T) {
	e := newLazyBase(t, "[remote]\nfill_rate_bytes = -1\n")
	e.startSnapshotter(t)
	e.cd = testenv.StartContainerd16(t, e.dir, testenv.ContainerdConfig{Snapshotters: map[string]string{"spanpull": e.sn.Socket}})
	pid := e.sn.Pid()

	start := time.Now()
	layer := manyEntriesLayer(t, manyDirs, manyFiles)
	t.Logf("generated a %d-entry layer (%d bytes gzip) in %v", manyDirs*(manyFiles+1), len(layer.Blob), time.Since(start).Round(time.Millisecond))
	start = time.Now()
	src, _ := testenv.PushImage(t, e.reg.Addr, "many/entries", "src", []string{"/bin/true"}, layer)
	t.Logf("pushed it in %v", time.Since(start).Round(time.Millisecond))
	ref := e.reg.Addr + "/many/entries:soci"
	start = time.Now()
	e.indexer(t, "convert", "--min-layer-size", "0", src, ref)
	t.Logf("indexed it in %v", time.Since(start).Round(time.Millisecond))

	before := procStatus(t, pid)
	start = time.Now()
	if out := e.pull(t, ref); !hasLine(out, "layer", "1", digest.FromBytes(layer.Blob).String(), "lazy") {
		t.Fatalf("layer not lazy:\n%s", out)
	}
	t.Logf("pulled (mounted) it in %v", time.Since(start).Round(time.Millisecond))
	checkManyEntries(t, e.lazyMount(t))
	mounted := procStatus(t, pid)
	t.Logf("daemon memory: before the pull RSS %s (peak %s), mounted RSS %s (peak %s)",
		mib(before["VmRSS"]), mib(before["VmHWM"]), mib(mounted["VmRSS"]), mib(mounted["VmHWM"]))
	if mounted["VmRSS"] >= maxDaemonRSS || mounted["VmHWM"] >= maxDaemonRSS {
		t.Fatalf("daemon RSS %s, peak %s with the layer mounted, want both under %s",
			mib(mounted["VmRSS"]), mib(mounted["VmHWM"]), mib(maxDaemonRSS))
	}

	start = time.Now()
	e.removeImage(t, ref)
	limit := before["VmRSS"] + rssTolerance
	var after map[string]int64
	for {
		after = procStatus(t, pid)
		if after["VmRSS"] <= limit || time.Since(start) > rssDropWait {
			break
		}
		time.Sleep(time.Second)
	}
	t.Logf("daemon RSS %s %v after image rm (limit %s)", mib(after["VmRSS"]), time.Since(start).Round(time.Second), mib(limit))
	if after["VmRSS"] > limit {
		t.Fatalf("daemon RSS %s %v after the layer was removed, want at most %s (%s before the pull + %s)",
			mib(after["VmRSS"]), rssDropWait, mib(limit), mib(before["VmRSS"]), mib(rssTolerance))
	}
}

// manyEntriesLayer builds a gzip tar layer of dirs (at most 1000)
// directories holding files (at most 1000) empty files each, named
// dNNN/fNNN: one 512-byte USTAR header per entry, made by archive/tar once
// per type and copied with the name's digits and the checksum patched (a
// million archive/tar headers take a minute under the race detector),
// compressed by gzip -1.
func manyEntriesLayer(t *testing.T, dirs, files int) testenv.LayerBlob {
	t.Helper()
	if dirs > 1000 || files > 1000 {
		t.Fatalf("manyEntriesLayer names at most 1000 x 1000 entries, asked for %d x %d", dirs, files)
	}
	dirHdr := ustarHeader(t, &tar.Header{Typeflag: tar.TypeDir, Name: "d000/", Mode: 0o755})
	fileHdr := ustarHeader(t, &tar.Header{Typeflag: tar.TypeReg, Name: "d000/f000", Mode: 0o644})
	var blob bytes.Buffer
	gz := exec.Command("gzip", "-1", "-n")
	gz.Stdout = &blob
	gzIn, err := gz.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := gz.Start(); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	w := bufio.NewWriterSize(io.MultiWriter(gzIn, h), 1<<20)
	dirSum, fileSum := ustarSum(dirHdr), ustarSum(fileHdr)
	for d := range dirs {
		w.Write(patchUSTAR(dirHdr, dirSum, d, -1))
		for f := range files {
			w.Write(patchUSTAR(fileHdr, fileSum, d, f))
		}
	}
	w.Write(make([]byte, 2*512)) // end of archive
	err = w.Flush()
	if cerr := gzIn.Close(); err == nil {
		err = cerr
	}
	if werr := gz.Wait(); err == nil {
		err = werr
	}
	if err != nil {
		t.Fatalf("gzip the layer: %v", err)
	}
	return testenv.LayerBlob{Blob: blob.Bytes(), DiffID: digest.NewDigest(digest.SHA256, h)}
}

// ustarHeader returns the 512-byte USTAR header archive/tar writes for h
// (fixed mtime).
func ustarHeader(t *testing.T, h *tar.Header) []byte {
	t.Helper()
	var b bytes.Buffer
	h.ModTime, h.Format = time.Unix(1700000000, 0), tar.FormatUSTAR
	if err := tar.NewWriter(&b).WriteHeader(h); err != nil {
		t.Fatal(err)
	}
	if b.Len() != 512 {
		t.Fatalf("archive/tar wrote a %d-byte header for %s", b.Len(), h.Name)
	}
	return b.Bytes()
}

// patchUSTAR sets the digits of the names ustarHeader made for
// "d000/" or "d000/f000" to dir and file (file < 0: a directory) in hdr,
// in place, and its checksum, and returns hdr. The checksum is the sum of
// the header's bytes with the checksum field as spaces: the template's
// (sum, with digits "000") plus what the digits add to it, written as
// archive/tar does (6 octal digits, NUL, space).
func patchUSTAR(hdr []byte, sum, dir, file int) []byte {
	const chksumAt = 148
	digits := func(at, n int) {
		hdr[at], hdr[at+1], hdr[at+2] = byte('0'+n/100), byte('0'+n/10%10), byte('0'+n%10)
		sum += n/100 + n/10%10 + n%10
	}
	digits(1, dir)
	if file >= 0 {
		digits(6, file)
	}
	for i := 5; i >= 0; i-- {
		hdr[chksumAt+i] = byte('0' + sum&7)
		sum >>= 3
	}
	hdr[chksumAt+6], hdr[chksumAt+7] = 0, ' '
	return hdr
}

// ustarSum is the checksum base of a header for patchUSTAR: the sum of
// its bytes with the checksum field as spaces.
func ustarSum(hdr []byte) int {
	sum := 0
	for i, c := range hdr {
		if i >= 148 && i < 156 {
			c = ' '
		}
		sum += int(c)
	}
	return sum
}

// checkManyEntries checks that the mount serves manyEntriesLayer's tree:
// every directory at the top, and every file of the first and last.
func checkManyEntries(t *testing.T, mnt string) {
	t.Helper()
	top, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if len(top) != manyDirs {
		t.Fatalf("%d entries at the top of the mount, want %d", len(top), manyDirs)
	}
	for _, d := range []string{"d000", fmt.Sprintf("d%03d", manyDirs-1)} {
		ents, err := os.ReadDir(filepath.Join(mnt, d))
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != manyFiles {
			t.Fatalf("%d entries in %s, want %d", len(ents), d, manyFiles)
		}
		st, err := os.Stat(filepath.Join(mnt, d, ents[len(ents)-1].Name()))
		if err != nil || !st.Mode().IsRegular() || st.Size() != 0 {
			t.Fatalf("stat %s/%s: %v, %v", d, ents[len(ents)-1].Name(), st, err)
		}
	}
}

// procStatus returns the memory fields (Vm*, in bytes) of a process's
// /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || !strings.HasPrefix(k, "Vm") && !strings.HasPrefix(k, "Rss") {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err == nil {
			out[k] = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// mib formats bytes in MiB.
func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// How TestMemoryMillionEntries' daemon must give memory back once the
// layer is removed: the daemon collects a big layer's tree (about 100 MiB
// here) and returns the pages when it removes the layer, so RSS drops
// within rssDropWait (measured: at once; left to the runtime, an idle
// daemon took over 3 minutes, two periodic GCs). rssTolerance is what may
// stay over the RSS before the pull (measured: 13 MiB): code and data of
// the pull, mount and removal paths first touched by the test, and the
// heap the runtime keeps for reuse; under a third of the tree, so that a
// tree (or a TOC) kept alive fails.
const (
	rssTolerance = 32 << 20
	rssDropWait  = 30 * time.Second
)
