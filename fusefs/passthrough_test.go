package fusefs

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
	"github.com/spanpull/spanpull/ztoc"
)

// rangeSource serves a tar from memory and records which stream ranges
// were read.
type rangeSource struct {
	b      []byte
	mu     sync.Mutex
	ranges [][2]int64
}

func (s *rangeSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.mu.Lock()
	s.ranges = append(s.ranges, [2]int64{off, off + int64(len(p))})
	s.mu.Unlock()
	return bytes.NewReader(s.b).ReadAt(p, off)
}

// readsOf returns how many reads touched the data of f.
func (s *rangeSource) readsOf(f ztoc.FileMetadata) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.ranges {
		if r[0] < f.UncompressedOffset+f.UncompressedSize && r[1] > f.UncompressedOffset {
			n++
		}
	}
	return n
}

func fileNamed(t *testing.T, files []ztoc.FileMetadata, name string) ztoc.FileMetadata {
	t.Helper()
	for _, f := range files {
		if f.Name == name {
			return f
		}
	}
	t.Fatalf("no %s in the TOC", name)
	return ztoc.FileMetadata{}
}

// TestPassthrough reads files that have a backing file: the kernel reads
// the backing file, through the mount and through overlayfs on top of it,
// and the stream reader is never asked. A file without one is read from
// the stream. A file that is open for normal reads when its backing file
// appears keeps being read normally until it is closed (the kernel
// refuses to mix the two on an inode).
func TestPassthrough(t *testing.T) {
	big, later := layertest.Random(1, 3<<20+17), layertest.Random(2, 200<<10)
	layer := layertest.Tar(t, layertest.Reg("big", 0o644, big), layertest.Reg("small", 0o644, []byte("small")),
		layertest.Reg("later", 0o644, later))
	files, _ := toctest.FromTar(t, layer)
	backing := t.TempDir()
	for name, data := range map[string][]byte{"big": big, "later": later} {
		if err := os.WriteFile(filepath.Join(backing, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var laterReady atomic.Bool
	var logs syncio.Buffer
	src := &rangeSource{b: layer}
	mnt := mountTOC(t, files, src, Options{Logger: testLogger(&logs), Backing: func(ctx context.Context, e Entry) (*os.File, error) {
		if e.Path() == "small" || e.Path() == "later" && !laterReady.Load() {
			return nil, nil
		}
		return os.Open(filepath.Join(backing, e.Path()))
	}})
	merged, _ := mountOverlay(t, mnt)
	for _, p := range []string{filepath.Join(mnt, "big"), filepath.Join(merged, "big")} {
		if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, big) {
			t.Errorf("read %s: %d bytes, %v", p, len(got), err)
		}
	}
	if n := src.readsOf(fileNamed(t, files, "big")); n != 0 {
		t.Errorf("%d reads of big went to the stream, want 0", n)
	}
	if got, err := os.ReadFile(filepath.Join(merged, "small")); err != nil || string(got) != "small" {
		t.Errorf("read small: %q, %v", got, err)
	}
	if src.readsOf(fileNamed(t, files, "small")) == 0 {
		t.Error("small has no backing file but was not read from the stream")
	}

	// later: open without a backing file, then it appears.
	first, err := os.Open(filepath.Join(mnt, "later"))
	if err != nil {
		t.Fatal(err)
	}
	laterReady.Store(true)
	second, err := os.Open(filepath.Join(mnt, "later"))
	if err != nil {
		t.Fatalf("second open of later, after its backing file appeared: %v", err)
	}
	for _, f := range []*os.File{first, second} {
		got := make([]byte, len(later))
		if n, err := f.ReadAt(got, 0); n != len(later) || !bytes.Equal(got, later) {
			t.Errorf("read later: %d bytes, %v", n, err)
		}
	}
	streamReads := src.readsOf(fileNamed(t, files, "later"))
	if streamReads == 0 {
		t.Error("later, open for normal reads, was not read from the stream")
	}
	first.Close()
	second.Close()
	// Once both are closed, a new open uses the backing file: change it
	// and see the change.
	changed := bytes.Repeat([]byte("L"), len(later))
	if err := os.WriteFile(filepath.Join(backing, "later"), changed, 0o600); err != nil {
		t.Fatal(err)
	}
	// The kernel tells the file system of a close asynchronously: the
	// next open may come before the release of the last one.
	deadline := time.Now().Add(5 * time.Second)
	got, err := os.ReadFile(filepath.Join(mnt, "later"))
	for (err != nil || !bytes.Equal(got, changed)) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		got, err = os.ReadFile(filepath.Join(mnt, "later"))
	}
	if err != nil || !bytes.Equal(got, changed) {
		t.Errorf("later after its files closed: not read from the backing file (%v)", err)
	}
	if strings.Contains(logs.String(), "unavailable") {
		t.Errorf("passthrough reported unavailable: %s", logs.String())
	}
}

// TestPassthroughUnavailable gives a backing file the kernel cannot use
// (a directory): reads fall back to the stream, and this is logged once.
func TestPassthroughUnavailable(t *testing.T) {
	data := layertest.Random(3, 100<<10)
	layer := layertest.Tar(t, layertest.Reg("a", 0o644, data), layertest.Reg("b", 0o644, data))
	files, _ := toctest.FromTar(t, layer)
	var logs syncio.Buffer
	src := &rangeSource{b: layer}
	dir := t.TempDir()
	mnt := mountTOC(t, files, src, Options{Logger: testLogger(&logs), Backing: func(ctx context.Context, e Entry) (*os.File, error) {
		return os.Open(dir)
	}})
	for _, name := range []string{"a", "b"} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(got, data) {
			t.Errorf("read %s: %d bytes, %v", name, len(got), err)
		}
		if src.readsOf(fileNamed(t, files, name)) == 0 {
			t.Errorf("%s was not read from the stream", name)
		}
	}
	if n := strings.Count(logs.String(), "passthrough is unavailable"); n != 1 {
		t.Errorf("passthrough failure logged %d times, want once: %s", n, logs.String())
	}
}
