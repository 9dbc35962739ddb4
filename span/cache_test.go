package span

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/internal/testutil/dirtest"
	"github.com/spanpull/spanpull/ztoc"
)

var (
	layerA = digest.FromString("layer a")
	layerB = digest.FromString("layer b")
)

func spanData(layer digest.Digest, id ztoc.SpanID) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("%s/%d;", layer.Encoded()[:8], id)), 1000+int(id))
}

func openFDs(t *testing.T) int {
	t.Helper()
	des, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(des)
}

func TestCache(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := mustCache(t, root, CacheOptions{})
	if _, err := c.Get(ctx, layerA, 0); !errors.Is(err, ErrNotCached) {
		t.Errorf("Get of an empty cache = %v, want ErrNotCached", err)
	}
	if _, err := c.Open(ctx, layerA, 0); !errors.Is(err, ErrNotCached) {
		t.Errorf("Open of an empty cache = %v, want ErrNotCached", err)
	}
	for _, l := range []digest.Digest{layerA, layerB} {
		for id := range ztoc.SpanID(5) {
			if err := c.Put(ctx, l, id, spanData(l, id)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := c.Put(ctx, layerA, 3, spanData(layerA, 3)); err != nil {
		t.Fatalf("Put again: %v", err)
	}
	if got := dirtest.Files(t, filepath.Join(root, "spans", layerA.Encoded())); strings.Join(got, ",") != "0,1,2,3,4" {
		t.Errorf("layer dir holds %v", got)
	}
	b, err := c.Get(ctx, layerB, 4)
	if err != nil || !bytes.Equal(b, spanData(layerB, 4)) {
		t.Errorf("Get = %d bytes, %v", len(b), err)
	}
	r, err := c.Open(ctx, layerA, 2)
	if err != nil {
		t.Fatal(err)
	}
	want := spanData(layerA, 2)
	buf := make([]byte, 100)
	if n, err := r.ReadAt(buf, 50); err != nil || !bytes.Equal(buf[:n], want[50:150]) || r.Size() != int64(len(want)) {
		t.Errorf("ReadAt = %d, %v; size %d", n, err, r.Size())
	}
	if !c.Has(layerA, 4) || c.Has(layerA, 5) || c.Has("sha256:bad", 0) {
		t.Error("Has is wrong")
	}
	layers, err := c.Layers()
	if err != nil || len(layers) != 2 {
		t.Errorf("Layers = %v, %v", layers, err)
	}

	// RemoveLayer leaves nothing of the layer, and the other intact.
	fds := openFDs(t)
	if err := c.RemoveLayer(ctx, layerA); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "spans", layerA.Encoded())); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("layer dir still there: %v", err)
	}
	if got := dirtest.Files(t, root); len(got) != 5 || !strings.HasPrefix(got[0], filepath.Join("spans", layerB.Encoded())) {
		t.Errorf("after RemoveLayer the cache holds %v", got)
	}
	if c.Has(layerA, 0) {
		t.Error("removed span still cached")
	}
	// an open reader still works, and closing it frees its fd
	if n, err := r.ReadAt(buf, 0); err != nil || !bytes.Equal(buf[:n], want[:100]) {
		t.Errorf("ReadAt after RemoveLayer = %d, %v", n, err)
	}
	r.Close()
	if got := openFDs(t); got != fds-1 {
		t.Errorf("%d fds open, want %d", got, fds-1)
	}
	if err := c.RemoveLayer(ctx, layerA); err != nil {
		t.Errorf("RemoveLayer again: %v", err)
	}
	if err := c.RemoveLayer(ctx, layerB); err != nil {
		t.Fatal(err)
	}
	if got := dirtest.Files(t, root); len(got) != 0 {
		t.Errorf("cache holds %v after removing every layer", got)
	}
}

func TestCacheBadInput(t *testing.T) {
	ctx := context.Background()
	c := mustCache(t, t.TempDir(), CacheOptions{})
	for _, d := range []digest.Digest{"", "sha256:../../etc", "sha256:abc", "md5:d41d8cd98f00b204e9800998ecf8427e"} {
		if err := c.Put(ctx, d, 0, []byte("x")); err == nil {
			t.Errorf("Put accepted layer %q", d)
		}
		if _, err := c.Get(ctx, d, 0); err == nil || errors.Is(err, ErrNotCached) {
			t.Errorf("Get of layer %q = %v", d, err)
		}
		if err := c.RemoveLayer(ctx, d); err == nil {
			t.Errorf("RemoveLayer accepted layer %q", d)
		}
	}
	if err := c.Put(ctx, layerA, -1, []byte("x")); err == nil {
		t.Error("Put accepted span -1")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.Put(cctx, layerA, 0, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("Put with a canceled context = %v", err)
	}
}

func TestCacheRemovesLeftovers(t *testing.T) {
	root := t.TempDir()
	c := mustCache(t, root, CacheOptions{})
	if err := c.Put(context.Background(), layerA, 0, []byte("span")); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "spans", layerA.Encoded())
	if err := os.WriteFile(filepath.Join(dir, atomicfile.TempPrefix+"1-123"), []byte("torn"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustCache(t, root, CacheOptions{})
	if got := dirtest.Files(t, dir); strings.Join(got, ",") != "0" {
		t.Errorf("after reopening: %v", got)
	}
}

// TestCacheConcurrent races Puts, Gets and RemoveLayers (run with
// -race): a reader sees a whole span or none.
func TestCacheConcurrent(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := mustCache(t, root, CacheOptions{})
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 60 {
				l := []digest.Digest{layerA, layerB}[i%2]
				id := ztoc.SpanID(i % 7)
				switch (g + i) % 3 {
				case 0:
					if err := c.Put(ctx, l, id, spanData(l, id)); err != nil {
						t.Error(err)
					}
				case 1:
					b, err := c.Get(ctx, l, id)
					if err == nil && !bytes.Equal(b, spanData(l, id)) {
						t.Errorf("span %d of %s: torn read of %d bytes", id, l, len(b))
					} else if err != nil && !errors.Is(err, ErrNotCached) {
						t.Error(err)
					}
				case 2:
					if i%10 == 2 {
						if err := c.RemoveLayer(ctx, l); err != nil {
							t.Error(err)
						}
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, f := range dirtest.Files(t, root) {
		if strings.Contains(f, atomicfile.TempPrefix) {
			t.Errorf("temporary file left: %s", f)
		}
	}
}

// TestCacheLRU: the cache stays within its budget by evicting the least
// recently used entries of any layer, never one being read, and fails a
// write that cannot fit; usage is reported per layer.
func TestCacheLRU(t *testing.T) {
	ctx := context.Background()
	c := mustCache(t, t.TempDir(), CacheOptions{MaxBytes: 10000})
	put := func(l digest.Digest, id ztoc.SpanID, n int) error {
		return c.Put(ctx, l, id, bytes.Repeat([]byte{byte(id)}, n))
	}
	for id := range ztoc.SpanID(3) {
		if err := put(layerA, id, 3000); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Get(ctx, layerA, 0); err != nil { // 0 is now the most recent
		t.Fatal(err)
	}
	if err := put(layerB, 0, 3000); err != nil {
		t.Fatal(err)
	}
	if c.Has(layerA, 1) || !c.Has(layerA, 0) || !c.Has(layerA, 2) || !c.Has(layerB, 0) {
		t.Fatal("eviction did not take the least recently used entry (span 1 of layer a)")
	}
	if c.Usage(layerA) != 6000 || c.Usage(layerB) != 3000 || c.Size() != 9000 {
		t.Fatalf("usage a %d, b %d, size %d; want 6000, 3000, 9000", c.Usage(layerA), c.Usage(layerB), c.Size())
	}
	// Entries being read stay; a write that only they could make room for fails.
	var open []*CachedSpan
	for _, k := range []struct {
		l  digest.Digest
		id ztoc.SpanID
	}{{layerA, 0}, {layerA, 2}, {layerB, 0}} {
		r, err := c.Open(ctx, k.l, k.id)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, r)
	}
	if err := put(layerB, 1, 3000); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("Put with every entry being read: %v, want ErrCacheFull", err)
	}
	open[1].Close()
	if err := put(layerB, 1, 3000); err != nil || c.Has(layerA, 2) {
		t.Fatalf("Put once span 2 of a is no longer read: %v (span 2 still cached: %v)", err, c.Has(layerA, 2))
	}
	open[0].Close()
	open[2].Close()
	// A longer prefix replaces an entry; a shorter one does not. While it
	// is written both files are on disk, so it needs room for all of it:
	// the least recently used other entry (3000 bytes) goes.
	if err := put(layerB, 1, 3500); err != nil || c.Size() != 6500 {
		t.Fatalf("longer Put: %v, size %d", err, c.Size())
	}
	if b, err := c.Get(ctx, layerB, 1); err != nil || len(b) != 3500 {
		t.Fatalf("after a longer Put: %d bytes, %v", len(b), err)
	}
	if err := put(layerB, 1, 100); err != nil || c.Size() != 6500 {
		t.Fatalf("shorter Put: %v, size %d", err, c.Size())
	}
	if err := put(layerB, 2, 20000); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("Put larger than the budget: %v", err)
	}
}

// TestCacheReopen: a reopened cache finds its entries, orders them by file
// time and evicts the oldest down to a smaller budget.
func TestCacheReopen(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c := mustCache(t, root, CacheOptions{})
	old := time.Now().Add(-time.Hour)
	for id := range ztoc.SpanID(4) {
		if err := c.Put(ctx, layerA, id, make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		// span 2 oldest, then 0, 3, 1
		age := map[ztoc.SpanID]time.Duration{2: 0, 0: 1, 3: 2, 1: 3}[id] * time.Minute
		p := filepath.Join(root, "spans", layerA.Encoded(), fmt.Sprint(id))
		if err := os.Chtimes(p, old.Add(age), old.Add(age)); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Put(ctx, layerB, 0, make([]byte, 500)); err != nil {
		t.Fatal(err)
	}
	c = mustCache(t, root, CacheOptions{MaxBytes: 2600})
	if c.Has(layerA, 2) || c.Has(layerA, 0) || !c.Has(layerA, 3) || !c.Has(layerA, 1) || !c.Has(layerB, 0) {
		t.Fatal("reopening with a smaller budget did not evict the two oldest entries (spans 2 and 0 of a)")
	}
	if c.Usage(layerA) != 2000 || c.Size() != 2500 {
		t.Fatalf("usage %d, size %d after reopening", c.Usage(layerA), c.Size())
	}
	if got := dirtest.Files(t, filepath.Join(root, "spans", layerA.Encoded())); strings.Join(got, ",") != "1,3" {
		t.Fatalf("layer a's files after reopening: %v", got)
	}
}
