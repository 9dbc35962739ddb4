//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// TestLazyPython is the lazy path end to end on real parts: a real Debian
// + python3 image in docker-registry, indexed by the indexer CLI, pulled
// by "snapshotter pull" through containerd 1.6 into the snapshotter
// daemon, and run with ctr. The layer must be mounted lazily (never in
// containerd's content store) and python must start having fetched well
// under the layer's size. The same runs for a SOCI v2 index (convert), a
// v1 index (create, found through referrers) and no index at all (a
// normal pull by containerd). Between images the image is removed, which
// must unmount the layer and delete its zTOC and cached spans.
// TestLazyPythonContainerd2 runs the same on containerd 2.2.
func TestLazyPython(t *testing.T) {
	testLazyPython(t, newLazyEnv(t, lazyPythonConfig), snapshotterPull)
}

// lazyPythonConfig turns background fill off, so that the bytes fetched
// are those python's start needed.
const lazyPythonConfig = "[remote]\nfill_rate_bytes = -1\n"

// lazyPuller is one way of pulling an image into the spanpull
// snapshotter.
type lazyPuller struct {
	name string
	// pull pulls ref and returns its report ("" if it prints none).
	pull func(e *lazyEnv, t *testing.T, ref string) string
	// fetchesIndexManifests is set for pullers that fetch every manifest
	// of an image index matching the platform, so also the SOCI v2 index
	// manifest that "indexer convert" lists there, and its zTOCs (its
	// layers) into containerd's content store. The snapshotter still
	// fetches the zTOC from the registry: containerd does not hand it over.
	fetchesIndexManifests bool
}

// snapshotterPull is "snapshotter pull": a client-side pull passing the
// remote-snapshot labels, which reports how each layer is served.
// containerd's client library pulls one manifest per platform, the
// image's, so no zTOC reaches containerd's content store.
var snapshotterPull = lazyPuller{name: "snapshotter-pull", pull: (*lazyEnv).pull}

// testLazyPython is TestLazyPython on env e: each image (v2 index, v1
// index, no index) is pulled by each puller in turn, run, and removed.
func testLazyPython(t *testing.T, e *lazyEnv, pullers ...lazyPuller) {
	layerSize := float64(e.layerDesc.Size)

	// lazy checks a pull of ref, whose image index lists its SOCI index
	// when v2.
	lazy := func(t *testing.T, p lazyPuller, ref string, v2 bool) {
		before := e.metrics(t)
		out := p.pull(e, t, ref)
		if out != "" && !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
			t.Fatalf("pull report does not say the layer is lazy:\n%s", out)
		}
		if mode := e.snapshotMode(t); mode != "lazy" {
			t.Fatalf("the layer's snapshot has mode label %q, want lazy", mode)
		}
		content := e.cd.MustRun(t, "content", "ls", "-q")
		if strings.Contains(content, e.layerDesc.Digest.String()) {
			t.Fatalf("layer blob %s is in containerd's content store:\n%s", e.layerDesc.Digest, content)
		}
		e.lazyMount(t)
		ztocs, err := os.ReadDir(e.ztocsDir())
		if err != nil || len(ztocs) != 1 {
			t.Fatalf("zTOCs stored by the daemon: %v (%v), want 1", ztocs, err)
		}
		inContent := strings.Contains(content, ztocs[0].Name())
		if want := p.fetchesIndexManifests && v2; inContent != want {
			t.Fatalf("zTOC sha256:%s in containerd's content store: %v, want %v:\n%s", ztocs[0].Name(), inContent, want, content)
		}
		if inContent {
			t.Logf("%s also fetched the SOCI index and its zTOC into containerd's content store", p.name)
		}
		e.runPython(t, ref)
		after := e.metrics(t)
		spanBytes := after[mSpanBytes] - before[mSpanBytes]
		ztocBytes := after[mZtocBytes] - before[mZtocBytes]
		frac := (spanBytes + ztocBytes) / layerSize
		t.Logf("%s: python printed its first output after fetching %.0f span + %.0f zTOC bytes = %.1f%% of the %.0f-byte layer (%.0f spans)",
			ref, spanBytes, ztocBytes, 100*frac, layerSize, after[mSpansFetched]-before[mSpansFetched])
		if spanBytes <= 0 {
			t.Fatalf("no span bytes fetched: the container did not read through the lazy layer")
		}
		if frac >= 0.6 {
			t.Fatalf("fetched %.1f%% of the layer to start python, want < 60%%", 100*frac)
		}
		if got := after[mMountedLazy] - before[mMountedLazy]; got != 1 {
			t.Fatalf("layers mounted lazily: %v, want 1", got)
		}
		e.removeImage(t, ref)
	}
	each := func(t *testing.T, check func(*testing.T, lazyPuller)) {
		for _, p := range pullers {
			t.Run(p.name, func(t *testing.T) { check(t, p) })
		}
	}

	t.Run("v2", func(t *testing.T) {
		src, _ := e.pushPython(t, "py/v2", "src")
		dst := e.reg.Addr + "/py/v2:soci"
		e.indexer(t, "convert", src, dst)
		each(t, func(t *testing.T, p lazyPuller) { lazy(t, p, dst, true) })
	})
	t.Run("v1", func(t *testing.T) {
		ref, _ := e.pushPython(t, "py/v1", "1")
		e.indexer(t, "create", ref)
		each(t, func(t *testing.T, p lazyPuller) { lazy(t, p, ref, false) })
	})
	t.Run("no-index", func(t *testing.T) {
		ref, _ := e.pushPython(t, "py/plain", "1")
		each(t, func(t *testing.T, p lazyPuller) {
			before := e.metrics(t)
			out := p.pull(e, t, ref)
			if out != "" && !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "pulled", "by", "containerd") {
				t.Fatalf("pull report does not say containerd pulled the layer:\n%s", out)
			}
			if mode := e.snapshotMode(t); mode != "" {
				t.Fatalf("the layer's snapshot has mode label %q, want none (pulled by containerd)", mode)
			}
			if content := e.cd.MustRun(t, "content", "ls", "-q"); !strings.Contains(content, e.layerDesc.Digest.String()) {
				t.Fatalf("layer blob %s is not in containerd's content store:\n%s", e.layerDesc.Digest, content)
			}
			if ms := e.fuseMounts(t); len(ms) != 0 {
				t.Fatalf("FUSE mounts for an image without index: %v", ms)
			}
			e.runPython(t, ref)
			after := e.metrics(t)
			if after[mFallbackNoIdx]-before[mFallbackNoIdx] != 1 || after[mSpanBytes] != before[mSpanBytes] {
				t.Fatalf("metrics: no_index fallbacks %v -> %v, span bytes %v -> %v", before[mFallbackNoIdx], after[mFallbackNoIdx], before[mSpanBytes], after[mSpanBytes])
			}
			if !strings.Contains(e.daemonLog(t), "not lazy") {
				t.Fatal("the daemon did not log why the image is not lazy")
			}
			e.removeImage(t, ref)
		})
	})
}

// TestLazyFileByFile compares the lazily mounted Debian layer, file by
// file, with GNU tar's extraction of the same layer: every path, type,
// mode, owner, mtime, size, link count of regular files, symlink target
// and device number, and the bytes of every regular file read through
// FUSE.
func TestLazyFileByFile(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_rate_bytes = -1\n")
	want := filepath.Join(e.dir, "tar")
	if err := os.Mkdir(want, 0o755); err != nil {
		t.Fatal(err)
	}
	tarDone := make(chan error, 1)
	go func() {
		out, err := exec.Command("tar", "-xpzf", layertest.DebianLayerPath, "-C", want, "--numeric-owner").CombinedOutput()
		if err != nil {
			err = fmt.Errorf("GNU tar: %v\n%s", err, out)
		}
		tarDone <- err
	}()
	e.pullLazy(t, "py/files")
	mnt := e.lazyMount(t)
	if err := <-tarDone; err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	var files, dirs, links, devs, hardlinked int
	var bytesRead int64
	seen := map[string]bool{}
	err := filepath.WalkDir(want, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		seen[rel] = true
		got := filepath.Join(mnt, rel)
		var ws, gs syscall.Stat_t
		if err := syscall.Lstat(p, &ws); err != nil {
			return err
		}
		if err := syscall.Lstat(got, &gs); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		var diffs []string
		check := func(field string, w, g any) {
			if w != g {
				diffs = append(diffs, fmt.Sprintf("%s %v, GNU tar %v", field, g, w))
			}
		}
		check("mode", fs.FileMode(ws.Mode), fs.FileMode(gs.Mode))
		check("mode bits", ws.Mode, gs.Mode)
		check("uid", ws.Uid, gs.Uid)
		check("gid", ws.Gid, gs.Gid)
		check("mtime", ws.Mtim, gs.Mtim)
		switch ws.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			files++
			check("size", ws.Size, gs.Size)
			check("nlink", ws.Nlink, gs.Nlink)
			if ws.Nlink > 1 {
				hardlinked++
			}
			wb, gb, err := readPair(os.ReadFile, p, got, "read "+rel)
			if err != nil {
				return err
			}
			bytesRead += int64(len(gb))
			if !bytes.Equal(wb, gb) {
				diffs = append(diffs, fmt.Sprintf("content differs (%d bytes read, %d in tar)", len(gb), len(wb)))
			}
		case syscall.S_IFDIR:
			dirs++
			names, err := os.ReadDir(got)
			if err != nil {
				return fmt.Errorf("readdir %s through FUSE: %w", rel, err)
			}
			for _, n := range names {
				if _, err := os.Lstat(filepath.Join(p, n.Name())); err != nil {
					diffs = append(diffs, fmt.Sprintf("FUSE lists %s, which GNU tar did not extract", n.Name()))
				}
			}
		case syscall.S_IFLNK:
			links++
			wl, gl, err := readPair(os.Readlink, p, got, "readlink "+rel)
			if err != nil {
				return err
			}
			check("symlink target", wl, gl)
		case syscall.S_IFCHR, syscall.S_IFBLK:
			devs++
			check("rdev", ws.Rdev, gs.Rdev)
		}
		if len(diffs) > 0 {
			t.Errorf("%s: %s", rel, strings.Join(diffs, "; "))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("compared %d regular files (%d hardlinked, %d bytes read through FUSE in %v), %d dirs, %d symlinks, %d devices",
		files, hardlinked, bytesRead, time.Since(start).Round(time.Millisecond), dirs, links, devs)
	if files < 1000 || hardlinked == 0 || links == 0 {
		t.Fatalf("the Debian layer should have thousands of files, hardlinks and symlinks")
	}
}

// readPair reads a file of GNU tar's extraction (want) and the same file
// through FUSE (got).
func readPair[T any](read func(string) (T, error), want, got, what string) (w, g T, err error) {
	if w, err = read(want); err != nil {
		return w, g, err
	}
	if g, err = read(got); err != nil {
		return w, g, fmt.Errorf("%s through FUSE: %w", what, err)
	}
	return w, g, nil
}

// readFailsEIO reads the uncached file f with read while the registry is
// unusable (state says how: "down", "hung"), requires EIO, and returns how
// long the read took.
func readFailsEIO(t *testing.T, read func(ztoc.FileMetadata) ([]byte, error), f ztoc.FileMetadata, state string) time.Duration {
	t.Helper()
	start := time.Now()
	_, err := read(f)
	elapsed := time.Since(start)
	t.Logf("read of uncached %s with the registry %s: %v after %v", f.Name, state, err, elapsed.Round(time.Millisecond))
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of uncached %s with the registry %s: %v, want EIO", f.Name, state, err)
	}
	return elapsed
}

// spanFiles maps each span to the regular files lying wholly inside it
// (non-empty, not hardlinks), by cleaned path.
func spanFiles(z *ztoc.Ztoc, spans []ztoc.Span) map[ztoc.SpanID][]ztoc.FileMetadata {
	last := map[string]int{}
	for i, f := range z.Files {
		last[ztoc.CleanPath(f.Name)] = i
	}
	out := map[ztoc.SpanID][]ztoc.FileMetadata{}
	for i, f := range z.Files {
		if f.Type != ztoc.TypeReg || f.UncompressedSize < 512 || last[ztoc.CleanPath(f.Name)] != i {
			continue
		}
		id, ok := ztoc.SpanForOffset(spans, f.UncompressedOffset)
		if !ok || f.UncompressedOffset+f.UncompressedSize > spans[id].UncompressedEnd {
			continue
		}
		out[id] = append(out[id], f)
	}
	return out
}

// fileBytes returns a file's bytes from the pristine layer.
func fileBytes(t *testing.T, z *ztoc.Ztoc, blob []byte, f ztoc.FileMetadata) []byte {
	t.Helper()
	r, err := span.NewLayer(digest.FromBytes(blob), z, span.LocalBlob(bytes.NewReader(blob)), span.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b := make([]byte, f.UncompressedSize)
	if _, err := r.ReadAt(context.Background(), b, f.UncompressedOffset); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLazyFaults injects faults under a lazily mounted layer (background
// fill off, 2 s fetch timeout): a corrupted span in the registry's
// storage and a registry that goes away. Reads needing missing or bad
// spans must fail with EIO, within 1.5 x the fetch timeout, never with
// wrong bytes, while cached spans keep serving.
func TestLazyFaults(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_rate_bytes = -1\nfetch_timeout_seconds = 2\n")
	ref := e.pullLazy(t, "py/faults")
	mnt := e.lazyMount(t)
	z, spans := e.storedZtoc(t)
	byspan := spanFiles(z, spans)
	if cached := e.cachedSpans(t); len(cached) != 0 {
		t.Fatalf("spans cached before any read: %v", cached)
	}
	// Files in spans far from each other (a span's first compressed byte
	// may be shared with the previous one).
	pick := func(from int, n int) (ztoc.Span, []ztoc.FileMetadata) {
		for i := from; i < len(spans)-1; i++ {
			if fs := byspan[spans[i].ID]; len(fs) >= n {
				return spans[i], fs
			}
		}
		t.Fatalf("no span from %d on holds %d whole files", from, n)
		return ztoc.Span{}, nil
	}
	badSpan, badFiles := pick(len(spans)/2, 1)
	goodSpan, goodFiles := pick(len(spans)/8+1, 2)
	if goodSpan.ID+1 >= badSpan.ID {
		t.Fatalf("spans %d and %d too close", goodSpan.ID, badSpan.ID)
	}
	read := func(f ztoc.FileMetadata) ([]byte, error) {
		return os.ReadFile(filepath.Join(mnt, ztoc.CleanPath(f.Name)))
	}

	t.Run("corrupt-span", func(t *testing.T) {
		blobPath := e.reg.BlobPath(e.layerDesc.Digest)
		f, err := os.OpenFile(blobPath, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// Early in the span: every read of the span needs these bytes
		// (with chunk marks a read fetches only a prefix of the span).
		off := badSpan.CompressedStart + 1024
		orig := make([]byte, 16)
		if _, err := f.ReadAt(orig, off); err != nil {
			t.Fatal(err)
		}
		flipped := make([]byte, len(orig))
		for i := range orig {
			flipped[i] = ^orig[i]
		}
		if _, err := f.WriteAt(flipped, off); err != nil {
			t.Fatal(err)
		}
		before := e.metrics(t)
		bad := badFiles[0]
		b, err := read(bad)
		if err == nil {
			same := bytes.Equal(b, fileBytes(t, z, e.layer.Blob, bad))
			t.Fatalf("read %s from corrupted span %d succeeded (bytes correct: %v), want EIO", bad.Name, badSpan.ID, same)
		}
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read %s from corrupted span: %v, want EIO", bad.Name, err)
		}
		after := e.metrics(t)
		failures := after[mVerifyFailed] - before[mVerifyFailed]
		t.Logf("read of %s (span %d, compressed bytes %d-%d, flipped at %d): %v; span verify failures +%v, read errors +%v",
			bad.Name, badSpan.ID, badSpan.CompressedStart, badSpan.CompressedEnd, off, err, failures, after[mReadErrors]-before[mReadErrors])
		if failures < 2 {
			t.Fatalf("span verify failures grew by %v, want >= 2 (the fetch and one re-fetch)", failures)
		}
		if e.cachedSpans(t)[badSpan.ID] {
			t.Fatalf("corrupted span %d was cached", badSpan.ID)
		}
		// Other files read fine.
		g := goodFiles[0]
		gb, err := read(g)
		if err != nil {
			t.Fatalf("read %s (span %d): %v", g.Name, goodSpan.ID, err)
		}
		if !bytes.Equal(gb, fileBytes(t, z, e.layer.Blob, g)) {
			t.Fatalf("%s read wrong bytes", g.Name)
		}
		// Once the registry serves the right bytes again, so do reads.
		if _, err := f.WriteAt(orig, off); err != nil {
			t.Fatal(err)
		}
		b, err = read(bad)
		if err != nil || !bytes.Equal(b, fileBytes(t, z, e.layer.Blob, bad)) {
			t.Fatalf("read %s after the registry was repaired: %v (bytes correct: %v)", bad.Name, err, err == nil && bytes.Equal(b, fileBytes(t, z, e.layer.Blob, bad)))
		}
	})

	t.Run("registry-down", func(t *testing.T) {
		// python's start is cached; then the registry goes away.
		e.runPython(t, ref)
		cached := e.cachedSpans(t)
		var uncached ztoc.FileMetadata
		for i := len(spans) - 2; i > 0 && uncached.Name == ""; i-- {
			if fs := byspan[spans[i].ID]; len(fs) > 0 && !cached[spans[i].ID] && !cached[spans[i].ID-1] && !cached[spans[i].ID+1] {
				uncached = fs[0]
			}
		}
		if uncached.Name == "" {
			t.Fatalf("every span is cached (%d of %d) with fill disabled", len(cached), len(spans))
		}
		e.reg.Stop(t)

		elapsed := readFailsEIO(t, read, uncached, "down")
		// One fetch timeout (2 s), not one per attempt: the kernel's retry
		// of the failed read fails at once.
		if limit := 3 * time.Second; elapsed >= limit {
			t.Fatalf("read failed only after %v, want < %v (1.5 x the fetch timeout)", elapsed, limit)
		}
		// A file never read before, in a cached span, still reads.
		g := goodFiles[1]
		gb, err := read(g)
		if err != nil || !bytes.Equal(gb, fileBytes(t, z, e.layer.Blob, g)) {
			t.Fatalf("read cached %s with the registry down: %v", g.Name, err)
		}
		// A container reading the uncached file fails, it does not hang.
		start := time.Now()
		out, err := e.run(ref, 2*time.Minute, "python3", "-c", fmt.Sprintf("open(%q, 'rb').read()", "/"+ztoc.CleanPath(uncached.Name)))
		elapsed = time.Since(start)
		t.Logf("container reading %s with the registry down: %v after %v", uncached.Name, err, elapsed.Round(time.Millisecond))
		if err == nil || !strings.Contains(out+err.Error(), "Input/output error") {
			t.Fatalf("container read of an uncached file with the registry down: err %v, output:\n%s", err, out)
		}
		if elapsed > 30*time.Second {
			t.Fatalf("container took %v to fail, want < 30 s", elapsed)
		}
		// And the registry coming back heals the read.
		e.reg.Restart(t)
		b, err := read(uncached)
		if err != nil || !bytes.Equal(b, fileBytes(t, z, e.layer.Blob, uncached)) {
			t.Fatalf("read %s after the registry came back: %v", uncached.Name, err)
		}
	})
}

// TestLazyRestart restarts the daemon while a container runs on the lazy
// layer, after background fill cached every span, with the registry
// stopped: the layer must be mounted again from the stored zTOC and a new
// container must run without the registry. Removing the containers and
// the image then unmounts the layer and deletes its zTOC and span cache.
func TestLazyRestart(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_delay_seconds = 0\nfill_rate_bytes = 1073741824\n")
	ref := e.pullLazy(t, "py/restart")
	e.cd.MustRun(t, "run", "-d", "--snapshotter", "spanpull", ref, "sleeper", "python3", "-c", "import time; time.sleep(600)")
	_, spans := e.storedZtoc(t)
	deadline := time.Now().Add(2 * time.Minute)
	// The fill keeps every span, then every checkpoint window of the pack
	// (span 0 has none).
	for len(e.cachedSpans(t)) < len(spans) || e.keptWindows(t) < len(spans)-1 {
		if time.Now().After(deadline) {
			t.Fatalf("background fill cached %d of %d spans and %d of %d windows in 2 minutes",
				len(e.cachedSpans(t)), len(spans), e.keptWindows(t), len(spans)-1)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if m := e.metrics(t); m[mSpansFetched] < float64(len(spans)) {
		t.Fatalf("%v spans fetched, %d cached", m[mSpansFetched], len(spans))
	}

	if err := e.sn.Stop(15 * time.Second); err != nil {
		t.Fatalf("snapshotter did not stop cleanly with a container running: %v", err)
	}
	e.reg.Stop(t)
	e.startSnapshotter(t)
	runRetry(t, e.cd, "snapshots", "--snapshotter", "spanpull", "ls")
	e.lazyMount(t)
	e.runPython(t, ref)
	m := e.metrics(t)
	if m[mSpansFetched] != 0 || m[mZtocBytes] != 0 || m[mSpanBytes] != 0 {
		t.Fatalf("the restarted daemon fetched from the (stopped) registry: %v spans, %v zTOC bytes", m[mSpansFetched], m[mZtocBytes])
	}
	if m[mCacheHits] == 0 || m[mReadErrors] != 0 {
		t.Fatalf("the restarted daemon served %v reads from the span cache with %v read errors", m[mCacheHits], m[mReadErrors])
	}
	if b, err := os.ReadFile(e.sn.Log); err != nil || bytes.Contains(b, []byte("cannot be mounted again")) {
		t.Fatalf("restarted daemon log (%v):\n%s", err, b)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e.cd.Run(ctx, "tasks", "kill", "-s", "SIGKILL", "sleeper")
	for i := 0; ; i++ {
		if _, err := e.cd.Run(ctx, "tasks", "rm", "-f", "sleeper"); err == nil || i == 50 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	e.cd.MustRun(t, "containers", "rm", "sleeper")
	e.removeImage(t, ref)
}

// TestLazyFallback checks that images whose SOCI index is missing or
// unusable are pulled normally by containerd, with a log line saying why,
// and run.
func TestLazyFallback(t *testing.T) {
	e := newLazyEnv(t, "")
	e.pushPython(t, "py/fb", "src")

	normal := func(t *testing.T, ref, reason, logWord string) {
		t.Helper()
		before := e.metrics(t)
		loggedBefore := strings.Count(e.daemonLog(t), "\n")
		out := e.pull(t, ref)
		if !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "pulled", "by", "containerd") {
			t.Fatalf("pull report does not say containerd pulled the layer:\n%s", out)
		}
		if ms := e.fuseMounts(t); len(ms) != 0 {
			t.Fatalf("FUSE mounts after a fallback: %v", ms)
		}
		logged := strings.Split(e.daemonLog(t), "\n")[loggedBefore:]
		var why string
		for _, l := range logged {
			if strings.Contains(l, logWord) {
				why = l
			}
		}
		if why == "" {
			t.Fatalf("the daemon logged no %q line for this pull:\n%s", logWord, strings.Join(logged, "\n"))
		}
		t.Logf("daemon: %s", why)
		series := `spanpull_resolver_fallbacks_total{reason="` + reason + `"}`
		if after := e.metrics(t); after[series]-before[series] != 1 {
			t.Fatalf("%s went from %v to %v, want +1", series, before[series], after[series])
		}
		e.runPython(t, ref)
		e.removeImage(t, ref)
	}

	t.Run("missing-index", func(t *testing.T) {
		// The manifest names a SOCI index that the registry does not have.
		m := e.fetchManifest(t, "py/fb", "src")
		m.Annotations = map[string]string{index.AnnotationIndexDigest: digest.FromString("no such index").String()}
		ref := e.pushManifest(t, "py/fb", "missing-index", m)
		normal(t, ref, "no_index", "not lazy")
	})
	t.Run("invalid-index", func(t *testing.T) {
		// The manifest names as its SOCI index a manifest that is not one
		// (the image's own manifest).
		m := e.fetchManifest(t, "py/fb", "src")
		m.Annotations = map[string]string{index.AnnotationIndexDigest: digest.FromBytes(e.fetchRaw(t, "py/fb", "src")).String()}
		ref := e.pushManifest(t, "py/fb", "invalid-index", m)
		normal(t, ref, "no_index", "not lazy")
	})
	t.Run("invalid-ztoc", func(t *testing.T) {
		// A converted image whose zTOC blob is garbage in the registry
		// (and no pack, which the daemon would mount from instead).
		ref := e.reg.Addr + "/py/fb:soci"
		e.indexer(t, "convert", "--pack=false", e.reg.Addr+"/py/fb:src", ref)
		// The converted image index lists the image manifests and their
		// SOCI indexes; the zTOC is a layer of the SOCI index.
		var root ocispec.Index
		if err := json.Unmarshal(e.fetchRaw(t, "py/fb", "soci"), &root); err != nil {
			t.Fatal(err)
		}
		var zd ocispec.Descriptor
		for _, d := range root.Manifests {
			for _, l := range e.fetchManifest(t, "py/fb", d.Digest.String()).Layers {
				if l.MediaType == index.MediaTypeZtoc {
					zd = l
				}
			}
		}
		if zd.Digest == "" {
			t.Fatalf("converted image %s has no zTOC: %+v", ref, root)
		}
		garbage := bytes.Repeat([]byte("not a ztoc "), int(zd.Size)/11+1)[:zd.Size]
		if err := os.WriteFile(e.reg.BlobPath(zd.Digest), garbage, 0o644); err != nil {
			t.Fatal(err)
		}
		normal(t, ref, "ztoc_unavailable", "pulled normally")
	})
}
