package span

import (
	"bytes"
	"context"
	"maps"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// TestPrefetchFetchesWindows: Prefetch brings each span's window beside
// its bytes when the zTOC lacks it, so that a read of a prefetched span
// asks neither the blob nor the window source again.
func TestPrefetchFetchesWindows(t *testing.T) {
	tarball, blob, z := seededGzipLayer(t, 11)
	spans := mustSpans(t, z)
	if len(spans) < 4 {
		t.Fatalf("%d spans, want at least 4", len(spans))
	}
	ws := newWindowSource(spans)
	cache := mustCache(t, t.TempDir(), CacheOptions{})
	rb := newRecBlob(blob)
	m := newRecMetrics()
	l := newLayer(t, digest.FromBytes(blob), z, rb, Options{Cache: cache, Windows: ws, FetchTimeout: 5 * time.Second, Metrics: m})
	dropWindows(l)
	ids := []ztoc.SpanID{3, 0, 2}
	if err := l.Prefetch(context.Background(), ids); err != nil {
		t.Fatal(err)
	}
	// Span 0 starts the stream: it has no window.
	if want := map[ztoc.SpanID]int{3: 1, 2: 1}; !maps.Equal(ws.calls, want) {
		t.Fatalf("windows asked for by Prefetch: %v, want %v", ws.calls, want)
	}
	fetched := len(rb.requests())
	for _, id := range ids {
		s := spans[id]
		p := make([]byte, s.UncompressedEnd-s.UncompressedStart)
		if n, err := l.ReadAt(context.Background(), p, s.UncompressedStart); n != len(p) || err != nil {
			t.Fatalf("read span %d: %d, %v", id, n, err)
		}
		if !bytes.Equal(p, tarball[s.UncompressedStart:s.UncompressedEnd]) {
			t.Fatalf("span %d read wrong bytes", id)
		}
	}
	if n := len(rb.requests()); n != fetched || len(ws.calls) != 2 || ws.calls[3] != 1 || ws.calls[2] != 1 {
		t.Fatalf("reads of prefetched spans: %d more blob reads, windows asked for %v; want none", n-fetched, ws.calls)
	}
	if hits := m.get(&m.prefetchHit); hits != len(ids) {
		t.Fatalf("%d prefetch hits, want %d", hits, len(ids))
	}
}
