package fusefs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
)

// recorder is an Observer.
type recorder struct {
	mu     sync.Mutex
	opened []string
	reads  map[string][][2]int64
}

func (r *recorder) Opened(e Entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opened = append(r.opened, e.Path())
}

func (r *recorder) Read(e Entry, off int64, n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reads[e.Path()] = append(r.reads[e.Path()], [2]int64{off, off + int64(n)})
}

// TestVerifyEntryAndObserver checks the daemon's hooks: VerifyEntry runs
// once per file, before its first byte, and its failure fails every read
// of the file with one log line; the Observer sees the first open of each
// file and every read the kernel sends.
func TestVerifyEntryAndObserver(t *testing.T) {
	good := layertest.Random(4, 300<<10)
	layer := layertest.Tar(t, layertest.Reg("good", 0o644, good), layertest.Reg("bad", 0o644, []byte("forged")),
		layertest.Reg("empty", 0o644, nil))
	files, _ := toctest.FromTar(t, layer)
	var mu sync.Mutex
	verified := map[string]int{}
	rec := &recorder{reads: map[string][][2]int64{}}
	var logs syncio.Buffer
	mnt := mountTOC(t, files, plainSource(layer), Options{
		Logger:   testLogger(&logs),
		Observer: rec,
		VerifyEntry: func(ctx context.Context, e Entry) error {
			mu.Lock()
			defer mu.Unlock()
			verified[e.Path()]++
			if e.Path() == "bad" {
				if e.Index() != 1 || e.Offset() != files[1].UncompressedOffset || e.Size() != 6 || e.Sparse() {
					t.Errorf("bad: index %d offset %d size %d", e.Index(), e.Offset(), e.Size())
				}
				return fmt.Errorf("tar header does not match the TOC: %w", ErrRejected)
			}
			return nil
		},
	})
	for range 2 {
		if got, err := os.ReadFile(filepath.Join(mnt, "good")); err != nil || len(got) != len(good) {
			t.Errorf("read good: %d bytes, %v", len(got), err)
		}
		if _, err := os.ReadFile(filepath.Join(mnt, "bad")); !errors.Is(err, syscall.EIO) {
			t.Errorf("read bad: %v, want EIO", err)
		}
		if got, err := os.ReadFile(filepath.Join(mnt, "empty")); err != nil || len(got) != 0 {
			t.Errorf("read empty: %q, %v", got, err)
		}
	}
	f, err := os.Open(filepath.Join(mnt, "bad"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 1), 3); !errors.Is(err, syscall.EIO) {
		t.Errorf("read bad at 3: %v, want EIO", err)
	}
	f.Close()
	mu.Lock()
	if verified["good"] != 1 || verified["bad"] != 1 || verified["empty"] != 0 {
		t.Errorf("VerifyEntry calls: %v, want good and bad once, empty never", verified)
	}
	mu.Unlock()
	if n := strings.Count(logs.String(), "tar header does not match the TOC"); n != 1 {
		t.Errorf("the verification failure is logged %d times, want once: %s", n, logs.String())
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if got := strings.Join(rec.opened, ","); got != "good,bad,empty" {
		t.Errorf("Opened saw %s, want each file once in order", got)
	}
	// The kernel's readahead sends reads concurrently: they arrive in any
	// order, and may overlap; together they must cover the file from 0.
	reads := slices.Clone(rec.reads["good"])
	slices.SortFunc(reads, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	var covered int64
	for _, r := range reads {
		if r[0] > covered {
			t.Fatalf("reads of good: %v, leave a gap at %d", rec.reads["good"], covered)
		}
		covered = max(covered, r[1])
	}
	if covered != int64(len(good)) {
		t.Errorf("reads of good cover [0, %d), want the file's %d bytes", covered, len(good))
	}
}

// TestVerifyCanceled checks that a verification is not canceled with the
// request that started it (the kernel interrupts a request when its caller
// gets a signal, and still waits for the answer), that a verification that
// fails without a verdict (the bytes could not be read) is tried again, and
// that a success is remembered.
func TestVerifyCanceled(t *testing.T) {
	layer := layertest.Tar(t, layertest.Reg("f", 0o644, []byte("data")))
	files, _ := toctest.FromTar(t, layer)
	calls := 0
	r := newRoot(t, files, plainSource(layer), Options{VerifyEntry: func(ctx context.Context, e Entry) error {
		calls++
		return ctx.Err()
	}})
	i, _ := r.tree.child(0, "f")
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	if err, _ := r.verify(canceled, i); err != nil || calls != 1 {
		t.Fatalf("verify with a canceled request: %v after %d calls, want success after 1", err, calls)
	}
	if err, _ := r.verify(context.Background(), i); err != nil || calls != 1 {
		t.Errorf("a successful verification is not remembered (%d calls)", calls)
	}

	// An I/O error fails the read at hand only.
	calls = 0
	flaky := newRoot(t, files, plainSource(layer), Options{VerifyEntry: func(ctx context.Context, e Entry) error {
		calls++
		if calls == 1 {
			return errors.New("registry down")
		}
		return nil
	}})
	j, _ := flaky.tree.child(0, "f")
	if err, _ := flaky.verify(context.Background(), j); err == nil {
		t.Fatal("verify: the hook's I/O error is lost")
	}
	if err, _ := flaky.verify(context.Background(), j); err != nil || calls != 2 {
		t.Errorf("verify after an I/O error: %v after %d calls, want success after 2", err, calls)
	}
}
