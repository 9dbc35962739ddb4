//go:build linux

package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/span"
)

// smallRootBytes is the size of the filesystem TestCacheSmallRoot gives
// the daemon's root: smaller than the compressed layer it reads.
const smallRootBytes = 64 << 20

// TestCacheSmallRoot runs the daemon with its whole --root on a 64 MiB
// tmpfs and the default cache budget (10% of that filesystem), and reads
// every regular file of the Debian python layer (64 MB compressed) through
// the lazy mount, in tar order (background fill off, so that every span
// comes from a read). Every file's bytes must equal the tar's and no read
// may fail. Although the cache holds a tenth of the layer, the layer must
// be fetched less than twice: the span bytes fetched must stay under twice
// its spans' compressed bytes, and the fetches under twice its chunks (a
// read fetches only the chunks of a span it lacks, so a span read file by
// file takes a few fetches: the span count bounds nothing). The span cache
// plus local files, sampled every 20 ms, must never exceed the budget.
func TestCacheSmallRoot(t *testing.T) {
	e := newLazyBase(t, "[remote]\nfill_rate_bytes = -1\n")
	root := mountTmpfs(t, filepath.Join(e.dir, "small-root"), smallRootBytes)
	budget, err := span.DefaultMaxBytes(root)
	if err != nil {
		t.Fatal(err)
	}
	e.sn = testenv.StartSnapshotter(t, e.dir, testenv.SnapshotterConfig{Binary: e.snapBin, Config: e.config, Metrics: true, Root: root})
	e.cd = testenv.StartContainerd16(t, e.dir, testenv.ContainerdConfig{Snapshotters: map[string]string{"spanpull": e.sn.Socket}})
	e.pullLazy(t, "py/small-root")
	mnt := e.lazyMount(t)
	z, spans := e.storedZtoc(t)
	chunks, spanBytes := 0, int64(0)
	for i, s := range spans {
		chunks += max(1, len(z.Chunks[i]))
		spanBytes += s.CompressedEnd - s.CompressedStart
	}

	usage := sampleUsage(t, 20*time.Millisecond, e.spansDir(), filepath.Join(e.sn.Root, "remote", "trees"))
	start := time.Now()
	files, n, err := compareRegularFiles(e.layer.Blob, mnt)
	if err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	peak, samples := usage()
	m := e.metrics(t)
	fetches := 0.0
	for _, class := range []string{"demand", "prefetch", "fill"} {
		fetches += m[`spanpull_resolver_class_span_fetches_total{class="`+class+`"}`]
	}
	t.Logf("read %d regular files (%d bytes) through FUSE in %v; %d spans of %d compressed bytes in %d chunks; %v span fetches of %v bytes (%v cache hits, %v cache write failures); cache budget %d, peak cache use %d over %d samples",
		files, n, elapsed.Round(time.Millisecond), len(spans), spanBytes, chunks, fetches, m[mSpanBytes], m[mCacheHits],
		m[`spanpull_resolver_span_cache_write_failures_total`], budget, peak, samples)
	if files < 1000 {
		t.Fatalf("compared %d regular files, the Debian layer has thousands", files)
	}
	if m[mReadErrors] != 0 {
		t.Errorf("%v reads failed", m[mReadErrors])
	}
	if m[mSpanBytes] == 0 || m[mSpanBytes] >= float64(2*spanBytes) {
		t.Errorf("%v span bytes fetched to read the layer once, want fewer than 2 x its %d span bytes", m[mSpanBytes], spanBytes)
	}
	if fetches == 0 || fetches >= float64(2*chunks) {
		t.Errorf("%v span fetches to read the layer once, want fewer than 2 x its %d chunks", fetches, chunks)
	}
	if samples < 10 {
		t.Errorf("cache use sampled %d times, want at least 10", samples)
	}
	if peak > budget {
		t.Errorf("cache held %d bytes, over its budget of %d", peak, budget)
	}
	if peak == 0 {
		t.Errorf("cache never held a span")
	}
}

// mountTmpfs mounts a tmpfs of size bytes on dir (created), unmounted with
// the test directory.
func mountTmpfs(t *testing.T, dir string, size int64) string {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("mount a %d-byte tmpfs on %s: %v", size, dir, err)
	}
	return dir
}

// sampleUsage adds up the sizes of the files below dirs every interval
// until the returned function is called, which returns the largest sum
// seen and the number of samples.
func sampleUsage(t *testing.T, interval time.Duration, dirs ...string) func() (int64, int) {
	t.Helper()
	stop, done := make(chan struct{}), make(chan struct{})
	var peak int64
	var samples int
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			var sum int64
			for _, d := range dirs {
				sum += dirBytes(d)
			}
			peak = max(peak, sum)
			samples++
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	end := func() (int64, int) {
		once.Do(func() { close(stop); <-done })
		return peak, samples
	}
	t.Cleanup(func() { end() })
	return end
}

// dirBytes is the sum of the sizes of the regular files below dir; files
// that go away during the walk are skipped.
func dirBytes(dir string) int64 {
	var sum int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			sum += info.Size()
		}
		return nil
	})
	return sum
}

// compareRegularFiles reads every regular file of the gzip layer blob
// through its mount mnt, in tar order, and compares its bytes with the
// tar's. A name the tar has again later is compared at its last entry
// only. It returns the number of files and bytes compared.
func compareRegularFiles(blob []byte, mnt string) (files int, n int64, err error) {
	last := map[string]int{}
	if err := eachTarEntry(blob, func(i int, h *tar.Header, _ io.Reader) error {
		last[path.Clean("/"+h.Name)] = i
		return nil
	}); err != nil {
		return 0, 0, err
	}
	err = eachTarEntry(blob, func(i int, h *tar.Header, r io.Reader) error {
		name := path.Clean("/" + h.Name)
		if h.Typeflag != tar.TypeReg || last[name] != i {
			return nil
		}
		want, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			return fmt.Errorf("read %s through FUSE: %w", name, err)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s: %d bytes read through FUSE differ from the tar's %d", name, len(got), len(want))
		}
		files++
		n += int64(len(got))
		return nil
	})
	return files, n, err
}

// eachTarEntry calls fn with the index, header and content of every
// member of the gzip tar blob.
func eachTarEntry(blob []byte, fn func(i int, h *tar.Header, r io.Reader) error) error {
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		return err
	}
	tr := tar.NewReader(zr)
	for i := 0; ; i++ {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("tar entry %d: %w", i, err)
		}
		if err := fn(i, h, tr); err != nil {
			return err
		}
	}
}
