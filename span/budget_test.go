package span

// The disk cache under pressure: a byte budget far below the layer, and a
// filesystem that is full. Reads never fail for it, spans are fetched at
// most twice while every file is read once, and the cache stays within
// its budget. And a filled layer streams its blob back.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// diskBytes returns the bytes of the regular files under dir. The cache
// writes and evicts while it walks: a file (a cache write's temporary
// file, an evicted span) gone between the listing and its stat holds no
// bytes.
func diskBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// readUnderPressure reads every file of a layer of many spans once through
// a cache under root with maxBytes and a small memory cache, and checks
// that the reads are right, that no span is fetched more than twice and
// that the cache never holds more than maxBytes. It returns the metrics
// and the size of the layer.
func readUnderPressure(t *testing.T, root string, maxBytes int64) (*recMetrics, int64) {
	tarball, blob, z := seededGzipLayer(t, 11)
	cache := mustCache(t, root, CacheOptions{MaxBytes: maxBytes})
	rb := newRecBlob(blob)
	m := newRecMetrics()
	l, err := NewLayer(digest.FromBytes(blob), z, rb, Options{Cache: cache, Memory: NewMemoryCache(48 << 10), Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	check := func() {
		if size := cache.Size(); size > maxBytes {
			t.Fatalf("cache accounts for %d bytes, budget %d", size, maxBytes)
		}
		if n := diskBytes(t, filepath.Join(root, "spans")); n > maxBytes {
			t.Fatalf("cache holds %d bytes on disk, budget %d", n, maxBytes)
		}
	}
	readEveryFile(t, l, z, fileContents(t, tarball), check)
	perSpan := map[ztoc.SpanID]int{}
	for _, r := range rb.requests() {
		perSpan[spanContaining(l.Spans(), r.off)]++
	}
	for id, n := range perSpan {
		if n > 2 {
			t.Errorf("span %d fetched %d times", id, n)
		}
	}
	t.Logf("%d spans, %d range reads, %d cache write failures, %d bytes cached",
		len(l.Spans()), len(rb.requests()), m.get(&m.writeFails), cache.Size())
	if len(rb.requests()) >= 2*len(l.Spans()) {
		t.Fatalf("%d range reads for %d spans", len(rb.requests()), len(l.Spans()))
	}
	return m, int64(len(blob))
}

// TestCacheBudgetFarBelowLayer: a budget of a span and a half for a layer
// of twenty.
func TestCacheBudgetFarBelowLayer(t *testing.T) {
	const budget = 48 << 10
	if _, size := readUnderPressure(t, t.TempDir(), budget); size < 10*budget {
		t.Fatalf("a %d-byte layer for a budget of %d", size, budget)
	}
}

// TestCacheFullDisk: the cache on a 64 MiB tmpfs that other files fill
// but for a little room, with a budget far above that: writes fail with
// ENOSPC (the cache then evicts its own entries to make room), reads do
// not.
func TestCacheFullDisk(t *testing.T) {
	for _, tc := range []struct {
		name string
		free int64
	}{{"room-for-a-few-spans", 96 << 10}, {"no-room", 8 << 10}} {
		t.Run(tc.name, func(t *testing.T) {
			root := fullTmpfs(t, tc.free)
			m, _ := readUnderPressure(t, root, 64<<20)
			if tc.free < 16<<10 && m.get(&m.writeFails) == 0 {
				t.Fatal("no cache write failed on a full disk")
			}
		})
	}
}

// fullTmpfs mounts a 64 MiB tmpfs and fills it but for free bytes.
func fullTmpfs(t *testing.T, free int64) string {
	t.Helper()
	root := t.TempDir()
	if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatalf("mount a 64 MiB tmpfs (the test needs root): %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(root, syscall.MNT_DETACH) })
	if err := os.MkdirAll(filepath.Join(root, "spans"), 0o700); err != nil {
		t.Fatal(err)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(root, &st); err != nil {
		t.Fatal(err)
	}
	filler, err := os.Create(filepath.Join(root, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer filler.Close()
	if _, err := io.CopyN(filler, zeroReader{}, int64(st.Bavail)*st.Bsize-free); err != nil {
		t.Fatal(err)
	}
	return root
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestLayerFillMakesComplete: after Fill the cache holds every byte of the
// blob (header, spans, trailer) and OpenBlob streams exactly the blob.
func TestLayerFillMakesComplete(t *testing.T) {
	tarball := layertest.SeededTar(t, 12)
	eachReaderLayer(t, tarball, func(t *testing.T, blob []byte) {
		z := build(t, blob, 16<<10)
		cache := mustCache(t, t.TempDir(), CacheOptions{})
		l := mustOpen(t, z, bytes.NewReader(blob), Options{Cache: cache})
		readCheck(t, l, tarball, 70000, 1000)
		if l.Complete() {
			t.Fatal("layer complete before Fill")
		}
		if _, err := l.OpenBlob(context.Background()); err == nil {
			t.Fatal("OpenBlob of an incomplete layer succeeded")
		}
		if err := l.Fill(context.Background()); err != nil {
			t.Fatal(err)
		}
		if !l.Complete() {
			t.Fatal("layer not complete after Fill")
		}
		if got := cache.Usage(l.digest); got < int64(len(blob)) {
			t.Fatalf("cache holds %d bytes of a %d-byte layer", got, len(blob))
		}
		rc, err := l.OpenBlob(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, blob) {
			t.Fatalf("OpenBlob streamed %d bytes (%v), want the %d-byte blob (differ at %d)", len(got), err, len(blob), firstDiff(got, blob))
		}
	})
}

// TestLayerFillStopsWhenCacheFull: Fill of a layer larger than the budget
// ends with ErrCacheFull instead of fetching forever.
func TestLayerFillStopsWhenCacheFull(t *testing.T) {
	_, blob, z := seededGzipLayer(t, 13)
	cache := mustCache(t, t.TempDir(), CacheOptions{MaxBytes: int64(len(blob)) / 2})
	rb := newRecBlob(blob)
	l := newLayer(t, digest.FromBytes(blob), z, rb, Options{Cache: cache})
	if err := l.Fill(context.Background()); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("Fill into half the layer's size: %v, want ErrCacheFull", err)
	}
	if n := len(rb.requests()); n > len(l.Spans())+1 {
		t.Fatalf("Fill made %d range reads for %d spans", n, len(l.Spans()))
	}
}
