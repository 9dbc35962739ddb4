package span

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/ztoc"
)

// ErrNotCached is returned (wrapped) for a span that is not in the cache.
var ErrNotCached = errors.New("span not cached")

// Cache is the on-disk cache of inflated spans, one file per span at
// <root>/spans/<layer digest hex>/<span id>. A span file, once there, is
// complete (written atomically) and never changes: spans are addressed by
// the layer's content digest. The cache is unbounded: spans leave it when
// their layer is removed.
//
// Cache is safe for concurrent use. RemoveLayer waits for the Puts in
// progress.
type Cache struct {
	dir string
	// mu is held shared by Put and exclusively by RemoveLayer, so that a
	// Put cannot recreate a layer directory being removed.
	mu sync.RWMutex
}

// OpenCache opens (creating it if needed) the span cache under root,
// deleting the temporary files an earlier crash left behind.
func OpenCache(root string) (*Cache, error) {
	dir := filepath.Join(root, "spans")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create span cache: %w", err)
	}
	c := &Cache{dir: dir}
	layers, err := c.Layers()
	if err != nil {
		return nil, err
	}
	for _, l := range layers {
		if err := atomicfile.RemoveTemp(c.layerDir(l)); err != nil {
			return nil, fmt.Errorf("open span cache of layer %s: %w", l, err)
		}
	}
	return c, nil
}

func (c *Cache) layerDir(layer digest.Digest) string {
	return filepath.Join(c.dir, layer.Encoded())
}

func (c *Cache) spanPath(layer digest.Digest, id ztoc.SpanID) string {
	return filepath.Join(c.layerDir(layer), strconv.Itoa(int(id)))
}

func checkSpan(layer digest.Digest, id ztoc.SpanID) error {
	if err := layer.Validate(); err != nil {
		return fmt.Errorf("layer digest %q: %w", layer, err)
	}
	if id < 0 {
		return fmt.Errorf("span id %d is negative", id)
	}
	return nil
}

// Put stores the uncompressed bytes of a span. Storing a span again
// replaces it atomically.
func (c *Cache) Put(ctx context.Context, layer digest.Digest, id ztoc.SpanID, data []byte) error {
	if err := checkSpan(layer, id); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	dir := c.layerDir(layer)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	if err := atomicfile.WriteFile(dir, strconv.Itoa(int(id)), data); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	return nil
}

// Get returns the bytes of a cached span, or an error wrapping ErrNotCached.
func (c *Cache) Get(ctx context.Context, layer digest.Digest, id ztoc.SpanID) ([]byte, error) {
	if err := checkSpan(layer, id); err != nil {
		return nil, fmt.Errorf("read cached span %d of %s: %w", id, layer, err)
	}
	b, err := os.ReadFile(c.spanPath(layer, id))
	if err != nil {
		return nil, fmt.Errorf("read cached span %d of %s: %w", id, layer, notFound(err))
	}
	return b, nil
}

// CachedSpan reads one cached span. It stays readable after its span
// leaves the cache (RemoveLayer, or eviction in a bounded cache).
type CachedSpan struct {
	f    *os.File
	size int64
}

// ReadAt implements io.ReaderAt.
func (r *CachedSpan) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }

// Size returns the length of the span.
func (r *CachedSpan) Size() int64 { return r.size }

// Close releases the file.
func (r *CachedSpan) Close() error { return r.f.Close() }

// Open returns a reader of a cached span, or an error wrapping
// ErrNotCached. The caller must close it.
func (c *Cache) Open(ctx context.Context, layer digest.Digest, id ztoc.SpanID) (*CachedSpan, error) {
	if err := checkSpan(layer, id); err != nil {
		return nil, fmt.Errorf("open cached span %d of %s: %w", id, layer, err)
	}
	f, err := os.Open(c.spanPath(layer, id))
	if err != nil {
		return nil, fmt.Errorf("open cached span %d of %s: %w", id, layer, notFound(err))
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open cached span %d of %s: %w", id, layer, err)
	}
	return &CachedSpan{f: f, size: fi.Size()}, nil
}

// Has reports whether a span is cached.
func (c *Cache) Has(layer digest.Digest, id ztoc.SpanID) bool {
	if checkSpan(layer, id) != nil {
		return false
	}
	_, err := os.Stat(c.spanPath(layer, id))
	return err == nil
}

// RemoveLayer deletes every cached span of a layer. Removing a layer with
// nothing cached is not an error.
func (c *Cache) RemoveLayer(ctx context.Context, layer digest.Digest) error {
	if err := layer.Validate(); err != nil {
		return fmt.Errorf("remove cached spans of %q: %w", layer, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := os.RemoveAll(c.layerDir(layer)); err != nil {
		return fmt.Errorf("remove cached spans of %s: %w", layer, err)
	}
	return nil
}

// Layers lists the layers with a cache directory, for cleaning up the
// layers no snapshot uses any more. Digests are returned as sha256.
func (c *Cache) Layers() ([]digest.Digest, error) {
	des, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, fmt.Errorf("list span cache: %w", err)
	}
	var layers []digest.Digest
	for _, de := range des {
		d := digest.NewDigestFromEncoded(digest.SHA256, de.Name())
		if de.IsDir() && d.Validate() == nil {
			layers = append(layers, d)
		}
	}
	return layers, nil
}

func notFound(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %w", ErrNotCached, err)
	}
	return err
}
