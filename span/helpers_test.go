package span

// Helpers of the scheduler, cache and partial-span tests: a blob that
// records (and can hold) range reads, metrics that count, a compressible
// layer, chunk marks computed with ztoc.ComputeChunks, and a cache and
// layer opened for one test.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// blobReq is one range read of a recBlob.
type blobReq struct {
	off, end int64
	at       time.Time
}

// recBlob is a BlobReader over a layer in memory that records every range
// read. hold, when set, may return a channel that holds the read until it
// is closed (or the read's context ends).
type recBlob struct {
	data []byte
	hold func(off, end int64) <-chan struct{}

	mu   sync.Mutex
	reqs []blobReq
	seen chan struct{} // closed and replaced on every request
}

func newRecBlob(data []byte) *recBlob { return &recBlob{data: data, seen: make(chan struct{})} }

func (b *recBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	b.mu.Lock()
	b.reqs = append(b.reqs, blobReq{off, off + n, time.Now()})
	close(b.seen)
	b.seen = make(chan struct{})
	hold := b.hold
	b.mu.Unlock()
	if hold != nil {
		if ch := hold(off, off+n); ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	return io.NopCloser(bytes.NewReader(b.data[off : off+n])), nil
}

// requests returns the range reads so far.
func (b *recBlob) requests() []blobReq {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]blobReq(nil), b.reqs...)
}

// waitRequests waits until the blob has seen n range reads.
func (b *recBlob) waitRequests(t *testing.T, n int) []blobReq {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		b.mu.Lock()
		reqs, seen := append([]blobReq(nil), b.reqs...), b.seen
		b.mu.Unlock()
		if len(reqs) >= n {
			return reqs
		}
		select {
		case <-seen:
		case <-deadline:
			t.Fatalf("%d range reads after 10s, want %d", len(reqs), n)
		}
	}
}

// spanOf returns the span whose compressed bytes start at off.
func spanOf(spans []ztoc.Span, off int64) ztoc.SpanID {
	i := sort.Search(len(spans), func(i int) bool { return spans[i].CompressedStart >= off })
	if i < len(spans) && spans[i].CompressedStart == off {
		return spans[i].ID
	}
	return -1
}

// recMetrics counts what a Layer reports.
type recMetrics struct {
	mu                 sync.Mutex
	spans              map[Class]int
	bytes              map[Class]int64
	failed             map[Class]int
	at                 map[Class][]time.Time
	verify, hits       int
	writeFails         int
	prefetchHit, waste int
}

func newRecMetrics() *recMetrics {
	return &recMetrics{spans: map[Class]int{}, bytes: map[Class]int64{}, failed: map[Class]int{}, at: map[Class][]time.Time{}}
}

func (m *recMetrics) SpanFetched(c Class, n int64, _ time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.spans[c]++
	m.bytes[c] += n
	m.at[c] = append(m.at[c], time.Now())
}

func (m *recMetrics) FetchFailed(c Class) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failed[c]++
}

func (m *recMetrics) SpanVerifyFailed() { m.mu.Lock(); m.verify++; m.mu.Unlock() }
func (m *recMetrics) SpanCacheHit()     { m.mu.Lock(); m.hits++; m.mu.Unlock() }
func (m *recMetrics) CacheWriteFailed() { m.mu.Lock(); m.writeFails++; m.mu.Unlock() }
func (m *recMetrics) PrefetchUsed(hit bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if hit {
		m.prefetchHit++
	} else {
		m.waste++
	}
}
func (m *recMetrics) Read(int, time.Duration, error) {}

// get returns one of the counters, read under the lock.
func (m *recMetrics) get(counter *int) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return *counter
}

// count returns the fetches, bytes and failures of class c.
func (m *recMetrics) count(c Class) (int, int64, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.spans[c], m.bytes[c], m.failed[c]
}

// textTar is a tar of compressible text files (a few times smaller
// gzipped), so that chunk marks fall inside spans.
func textTar(t testing.TB) []byte {
	t.Helper()
	var es []layertest.Entry
	es = append(es, layertest.Dir("t/", 0o755))
	for i, size := range []int{40000, 300000, 10, 0, 123457, 700000, 5000, 250000, 64000, 1} {
		es = append(es, layertest.Reg(fmt.Sprintf("t/f%02d", i), 0o644, layertest.Text(i, size)))
	}
	return layertest.Tar(t, es...)
}

// addChunks computes chunk marks of size compressed bytes for every span
// of z (built from blob), as a builder of chunk marks would.
func addChunks(t testing.TB, z *ztoc.Ztoc, blob []byte, size int64) {
	t.Helper()
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	z.Chunks = make([][]ztoc.Chunk, len(spans))
	for i, s := range spans {
		if z.Chunks[i], err = ztoc.ComputeChunks(z.Algorithm, s, blob[s.CompressedStart:s.CompressedEnd], size); err != nil {
			t.Fatal(err)
		}
	}
}

// mustCache opens a span cache under root with opts.
func mustCache(t testing.TB, root string, opts CacheOptions) *Cache {
	t.Helper()
	c, err := OpenCache(root, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// newLayer returns a Layer described by z over blob, closed when the test
// ends.
func newLayer(t testing.TB, d digest.Digest, z *ztoc.Ztoc, blob BlobReader, opts Options) *Layer {
	t.Helper()
	l, err := NewLayer(d, z, blob, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// dropWindows takes the windows out of l's span table, as for a layer
// loaded without its windows.
func dropWindows(l *Layer) {
	for i := range l.spans {
		l.spans[i].Window = nil
	}
}

// readEveryFile reads every regular file of z through l, in archive
// order, and checks its contents; after each file it calls check (if not
// nil).
func readEveryFile(t *testing.T, l *Layer, z *ztoc.Ztoc, want map[string][]byte, check func()) {
	t.Helper()
	for _, f := range regularFiles(z) {
		var got bytes.Buffer
		if _, err := l.WriteFile(context.Background(), &got, f); err != nil {
			t.Fatalf("WriteFile(%s): %v", f.Name, err)
		}
		if !bytes.Equal(got.Bytes(), want[f.Name]) {
			t.Fatalf("WriteFile(%s): wrong bytes (differ at %d)", f.Name, firstDiff(got.Bytes(), want[f.Name]))
		}
		if check != nil {
			check()
		}
	}
}
