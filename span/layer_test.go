package span

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// memBlob is a BlobReader over a layer held in memory. It counts calls and
// can corrupt or stall responses, standing in for a registry's range reads
// (the registry package and the integration tests cover the real thing).
type memBlob struct {
	data    []byte
	calls   atomic.Int64
	corrupt atomic.Int64 // corrupt this many more responses
	stall   atomic.Bool  // block until ctx ends
}

func (b *memBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.calls.Add(1)
	if b.stall.Load() {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	p := bytes.Clone(b.data[off : off+n])
	if b.corrupt.Add(-1) >= 0 && n > 0 {
		p[n/2] ^= 0xff
	}
	return io.NopCloser(bytes.NewReader(p)), nil
}

// testLayer builds the zTOC of the golden SOCI test layer at a small span
// size and returns it with the layer bytes and the uncompressed stream.
func testLayer(t *testing.T) (*ztoc.Ztoc, []byte, []byte) {
	t.Helper()
	data, err := os.ReadFile("../ztoc/testdata/soci-golden/small.tar.gz")
	if err != nil {
		t.Fatal(err)
	}
	z, _, err := ztoc.Build(context.Background(), bytes.NewReader(data), ztoc.BuildOptions{SpanSize: 65536, ChunkSize: -1}) // whole spans: chunked reads are tested in partial_test.go
	if err != nil {
		t.Fatal(err)
	}
	plain := layertest.Gunzip(t, data)
	if z.NumSpans() < 10 {
		t.Fatalf("test layer has %d spans, want many", z.NumSpans())
	}
	return z, data, plain
}

func newTestLayer(t *testing.T, blob BlobReader, z *ztoc.Ztoc, opts Options) *Layer {
	t.Helper()
	opts.Cache = mustCache(t, t.TempDir(), CacheOptions{})
	return newLayer(t, digest.FromString("layer"), z, blob, opts)
}

func TestLayerReadsEqualStream(t *testing.T) {
	z, data, plain := testLayer(t)
	blob := &memBlob{data: data}
	l := newTestLayer(t, blob, z, Options{})
	rng := rand.New(rand.NewPCG(1, 2))
	ctx := context.Background()
	for range 300 {
		off := rng.Int64N(int64(len(plain)))
		n := 1 + rng.IntN(200<<10)
		p := make([]byte, n)
		got, err := l.ReadAt(ctx, p, off)
		want := plain[off:min(off+int64(n), z.UncompressedArchiveSize)]
		if got != len(want) || !bytes.Equal(p[:got], want) {
			t.Fatalf("ReadAt(%d, %d) = %d bytes (err %v), want %d equal bytes", off, n, got, err, len(want))
		}
		if got < n && err != io.EOF {
			t.Fatalf("short read at end: err %v, want io.EOF", err)
		}
	}
	// Every span was fetched at most once: later reads hit the cache.
	if calls := blob.calls.Load(); calls > int64(z.NumSpans()) {
		t.Fatalf("%d range reads for %d spans", calls, z.NumSpans())
	}
}

func TestLayerConcurrentReadsShareOneFetch(t *testing.T) {
	z, data, plain := testLayer(t)
	blob := &memBlob{data: data}
	l := newTestLayer(t, blob, z, Options{})
	s := l.Spans()[3]
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := s.UncompressedStart + int64(i)*1000
			p := make([]byte, 4096)
			if _, err := l.ReadAt(context.Background(), p, off); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(p, plain[off:off+4096]) {
				errs <- errors.New("wrong bytes")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if c := blob.calls.Load(); c != 1 {
		t.Fatalf("32 concurrent reads of one span made %d range reads, want 1", c)
	}
}

func TestLayerRefetchesCorruptSpanOnce(t *testing.T) {
	z, data, plain := testLayer(t)
	blob := &memBlob{data: data}
	blob.corrupt.Store(1)
	l := newTestLayer(t, blob, z, Options{})
	p := make([]byte, 1000)
	if _, err := l.ReadAt(context.Background(), p, 5000); err != nil {
		t.Fatalf("read after one corrupt response: %v", err)
	}
	if !bytes.Equal(p, plain[5000:6000]) {
		t.Fatal("wrong bytes after re-fetch")
	}
	if c := blob.calls.Load(); c != 2 {
		t.Fatalf("%d range reads, want 2 (corrupt, then good)", c)
	}
}

func TestLayerCorruptSpanFailsWithoutBytes(t *testing.T) {
	z, data, _ := testLayer(t)
	blob := &memBlob{data: data}
	blob.corrupt.Store(1 << 30)
	l := newTestLayer(t, blob, z, Options{})
	p := make([]byte, 1000)
	n, err := l.ReadAt(context.Background(), p, 5000)
	if !errors.Is(err, ztoc.ErrSpanDigest) {
		t.Fatalf("err = %v, want ErrSpanDigest", err)
	}
	if n != 0 || !bytes.Equal(p, make([]byte, 1000)) {
		t.Fatalf("a failed read returned %d bytes / touched the buffer", n)
	}
	if l.Cached(0) {
		t.Fatal("a corrupt span was cached")
	}
}

func TestLayerStalledRegistryFailsAfterTimeout(t *testing.T) {
	z, data, _ := testLayer(t)
	blob := &memBlob{data: data}
	blob.stall.Store(true)
	l := newTestLayer(t, blob, z, Options{FetchTimeout: 300 * time.Millisecond})
	start := time.Now()
	_, err := l.ReadAt(context.Background(), make([]byte, 10), 0)
	if err == nil {
		t.Fatal("read from a stalled registry succeeded")
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("read took %s, want about the 300ms fetch timeout", d)
	}
	// The reader's own context also bounds the wait.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := l.ReadAt(ctx, make([]byte, 10), z.UncompressedArchiveSize-10); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the reader's deadline", err)
	}
}

func TestLayerFillCachesEverySpan(t *testing.T) {
	z, data, plain := testLayer(t)
	blob := &memBlob{data: data}
	l := newTestLayer(t, blob, z, Options{})
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, s := range l.Spans() {
		if !l.Cached(s.ID) {
			t.Fatalf("span %d not cached after Fill", s.ID)
		}
	}
	calls := blob.calls.Load()
	p := make([]byte, len(plain))
	if _, err := l.ReadAt(context.Background(), p, 0); err != io.EOF && err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p[:z.UncompressedArchiveSize], plain[:z.UncompressedArchiveSize]) {
		t.Fatal("stream read after Fill differs")
	}
	if blob.calls.Load() != calls {
		t.Fatal("reads after Fill went to the registry")
	}
}

func TestLayerFillRespectsRate(t *testing.T) {
	z, data, _ := testLayer(t)
	sched := NewScheduler(SchedulerOptions{FillQuiet: -1, FillRate: int64(len(data)) / 2})
	l := newTestLayer(t, &memBlob{data: data}, z, Options{Scheduler: sched})
	// At len(data)/2 bytes per second, fetching all spans must take at
	// least about a second; without a limit it takes milliseconds.
	start := time.Now()
	if err := l.Fill(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("Fill at half the layer size per second took %s", d)
	}
}
