package span

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/ztoc"
)

var (
	// ErrNotCached is returned (wrapped) for a span that is not in the cache.
	ErrNotCached = errors.New("span not cached")
	// ErrCacheFull is returned (wrapped) by a write that does not fit in
	// the cache's byte budget, even after evicting what may be evicted.
	ErrCacheFull = errors.New("span cache full")
)

// CacheOptions tune a Cache.
type CacheOptions struct {
	// MaxBytes bounds the bytes the cache holds (the sum of its entries'
	// sizes); the least recently used entries are evicted to stay under
	// it. Zero means no bound. The daemon's default is DefaultMaxBytes.
	MaxBytes int64
}

// DefaultMaxBytes returns the daemon's default cache budget: 10% of the
// size of the filesystem holding root.
func DefaultMaxBytes(root string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(root, &st); err != nil {
		return 0, fmt.Errorf("size of the filesystem of %s: %w", root, err)
	}
	return int64(st.Blocks) * st.Bsize / 10, nil
}

// headerID names the entry of a layer's blob bytes before its first span
// (the gzip header), which no span covers. It is not a valid SpanID for
// the exported methods.
const headerID ztoc.SpanID = -1

// touchEvery is how often at most a cache hit updates an entry's file
// times, by which a restarted daemon orders the entries.
const touchEvery = time.Minute

// Cache is the on-disk cache of verified compressed span bytes, shared by
// every layer of a daemon: one file per span at
// <root>/spans/<layer digest hex>/<span id>, holding the span's compressed
// bytes from its start (all of them, or with chunk marks a verified
// prefix), plus one file "header" per layer for the blob bytes before the
// first span. A file is written atomically and only ever replaced by a
// longer prefix of the same span: entries are addressed by the layer's
// content digest, and the Layer verifies what it reads back.
//
// The cache holds at most MaxBytes: writing an entry evicts the least
// recently used entries (of any layer) that no one is reading. A write that
// does not fit, or that the filesystem refuses (ENOSPC, EDQUOT), fails with
// an error that the Layer does not pass on. The entries survive a restart:
// OpenCache finds them again and orders them by file time.
//
// Cache is safe for concurrent use. RemoveLayer waits for the Puts in
// progress.
type Cache struct {
	dir string
	max int64
	// rm is held shared by writes and exclusively by RemoveLayer, so that
	// a write cannot recreate a layer directory being removed.
	rm sync.RWMutex

	mu      sync.Mutex
	entries map[entryKey]*entry
	lru     list.List // of *entry, most recently used first
	total   int64     // bytes of every entry plus the writes in progress
	usage   map[digest.Digest]int64
	writing map[entryKey]int64 // writes in progress: bytes reserved
}

type entryKey struct {
	layer digest.Digest
	id    ztoc.SpanID
}

// entry is a file of the cache, guarded by Cache.mu.
type entry struct {
	key     entryKey
	size    int64
	pins    int // readers: the entry is not evicted while > 0
	touched time.Time
	elem    *list.Element
}

// OpenCache opens (creating it if needed) the span cache under root,
// finding the entries a previous run left and deleting the temporary files
// of writes a crash interrupted. When the entries exceed opts.MaxBytes,
// the oldest are evicted.
func OpenCache(root string, opts CacheOptions) (*Cache, error) {
	dir := filepath.Join(root, "spans")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create span cache: %w", err)
	}
	c := &Cache{dir: dir, max: opts.MaxBytes, entries: make(map[entryKey]*entry),
		usage: make(map[digest.Digest]int64), writing: make(map[entryKey]int64)}
	layers, err := c.Layers()
	if err != nil {
		return nil, err
	}
	var found []*entry
	for _, l := range layers {
		es, err := c.scanLayer(l)
		if err != nil {
			return nil, fmt.Errorf("open span cache of layer %s: %w", l, err)
		}
		found = append(found, es...)
	}
	sort.Slice(found, func(i, j int) bool { return found[i].touched.Before(found[j].touched) })
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range found {
		c.add(e)
	}
	c.makeRoom(0, entryKey{}, "")
	return c, nil
}

// scanLayer removes the temporary files in a layer's directory and returns
// its entries, touched at their modification time.
func (c *Cache) scanLayer(layer digest.Digest) ([]*entry, error) {
	if err := atomicfile.RemoveTemp(c.layerDir(layer)); err != nil {
		return nil, err
	}
	des, err := os.ReadDir(c.layerDir(layer))
	if err != nil {
		return nil, err
	}
	var es []*entry
	for _, de := range des {
		id, ok := parseEntryName(de.Name())
		if !ok || !de.Type().IsRegular() {
			continue
		}
		fi, err := de.Info()
		if err != nil {
			continue // removed meanwhile
		}
		es = append(es, &entry{key: entryKey{layer, id}, size: fi.Size(), touched: fi.ModTime()})
	}
	return es, nil
}

func parseEntryName(name string) (ztoc.SpanID, bool) {
	if name == "header" {
		return headerID, true
	}
	id, err := strconv.Atoi(name)
	if err != nil || id < 0 || strconv.Itoa(id) != name {
		return 0, false
	}
	return ztoc.SpanID(id), true
}

func (c *Cache) layerDir(layer digest.Digest) string {
	return filepath.Join(c.dir, layer.Encoded())
}

func entryName(id ztoc.SpanID) string {
	if id == headerID {
		return "header"
	}
	return strconv.Itoa(int(id))
}

func (c *Cache) path(k entryKey) string {
	return filepath.Join(c.layerDir(k.layer), entryName(k.id))
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

// add makes e the most recently used entry. c.mu must be held.
func (c *Cache) add(e *entry) {
	e.elem = c.lru.PushFront(e)
	c.entries[e.key] = e
	c.total += e.size
	c.usage[e.key.layer] += e.size
}

// drop forgets e (its file is the caller's). c.mu must be held.
func (c *Cache) drop(e *entry) {
	c.lru.Remove(e.elem)
	delete(c.entries, e.key)
	c.total -= e.size
	if c.usage[e.key.layer] -= e.size; c.usage[e.key.layer] == 0 {
		delete(c.usage, e.key.layer)
	}
}

// makeRoom evicts entries until need more bytes fit in the budget (see
// evictTo) and reports whether they fit. c.mu must be held.
func (c *Cache) makeRoom(need int64, keep entryKey, protect digest.Digest) bool {
	return c.max <= 0 || c.evictTo(c.max-need, keep, protect)
}

// evictTo evicts least recently used entries until the cache holds at
// most limit bytes, sparing keep, the entries being read or written and,
// when protect is set, the entries of layer protect. It reports whether
// the cache got there. c.mu must be held.
func (c *Cache) evictTo(limit int64, keep entryKey, protect digest.Digest) bool {
	for el := c.lru.Back(); c.total > limit && el != nil; {
		e := el.Value.(*entry)
		el = el.Prev()
		if e.key == keep || e.pins > 0 || e.key.layer == protect || c.writing[e.key] != 0 {
			continue
		}
		if err := os.Remove(c.path(e.key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		c.drop(e)
	}
	return c.total <= limit
}

// Put stores a prefix of span id's compressed bytes (all of them, or with
// chunk marks the bytes up to a chunk end), evicting older entries to stay
// within the budget. A stored prefix is only replaced by a longer one: a
// shorter or equal Put is a no-op.
func (c *Cache) Put(ctx context.Context, layer digest.Digest, id ztoc.SpanID, data []byte) error {
	if err := checkSpan(layer, id); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("cache span %d of %s: %w", id, layer, err)
	}
	return c.put(entryKey{layer, id}, data, "")
}

// put writes entry k, evicting entries other than those of layer protect
// (when set), and once more after ENOSPC or EDQUOT.
func (c *Cache) put(k entryKey, data []byte, protect digest.Digest) error {
	c.rm.RLock()
	defer c.rm.RUnlock()
	err := c.write(k, data, protect)
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		// The filesystem is fuller than the budget says: make room on it.
		c.mu.Lock()
		freed := c.evictTo(c.total-int64(len(data)), k, protect)
		c.mu.Unlock()
		if freed {
			err = c.write(k, data, protect)
		}
	}
	if err != nil {
		return fmt.Errorf("cache %s of %s: %w", describe(k.id), k.layer, err)
	}
	return nil
}

func describe(id ztoc.SpanID) string {
	if id == headerID {
		return "blob header"
	}
	return fmt.Sprintf("span %d", id)
}

// write reserves room for entry k, writes its file and accounts for it.
func (c *Cache) write(k entryKey, data []byte, protect digest.Digest) error {
	c.mu.Lock()
	old := c.entries[k]
	var oldSize int64
	if old != nil {
		oldSize = old.size
	}
	if c.writing[k] != 0 || int64(len(data)) <= oldSize && old != nil {
		c.mu.Unlock()
		return nil // being written, or as long already
	}
	// The old file stays on disk until the new one replaces it: the write
	// needs room for all of data, not only for what it adds.
	need := int64(len(data))
	if !c.makeRoom(need, k, protect) {
		over := c.total + need - c.max
		c.mu.Unlock()
		return fmt.Errorf("%d bytes over the budget of %d: %w", over, c.max, ErrCacheFull)
	}
	c.writing[k] = max(need, 1)
	c.total += need
	c.mu.Unlock()

	err := os.MkdirAll(c.layerDir(k.layer), 0o700)
	if err == nil {
		err = atomicfile.WriteFile(c.layerDir(k.layer), entryName(k.id), data)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.writing, k)
	c.total -= need
	if err != nil {
		return err
	}
	if old = c.entries[k]; old != nil {
		c.drop(old)
	}
	c.add(&entry{key: k, size: int64(len(data)), touched: time.Now()})
	return nil
}

// size returns the length of entry (layer, id), and whether there is one.
func (c *Cache) size(layer digest.Digest, id ztoc.SpanID) (int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[entryKey{layer, id}]; e != nil {
		return e.size, true
	}
	return 0, false
}

// pin marks entry k as being read (it is not evicted until unpin) and as
// recently used.
func (c *Cache) pin(k entryKey) (unpin func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[k]
	if e == nil {
		return nil, fmt.Errorf("%s of %s: %w", describe(k.id), k.layer, ErrNotCached)
	}
	e.pins++
	c.lru.MoveToFront(e.elem)
	if now := time.Now(); now.Sub(e.touched) > touchEvery {
		e.touched = now
		_ = os.Chtimes(c.path(k), now, now) // only orders entries after a restart
	}
	return func() {
		c.mu.Lock()
		e.pins--
		c.mu.Unlock()
	}, nil
}

// read returns the bytes of entry (layer, id).
func (c *Cache) read(layer digest.Digest, id ztoc.SpanID) ([]byte, error) {
	k := entryKey{layer, id}
	unpin, err := c.pin(k)
	if err != nil {
		return nil, err
	}
	defer unpin()
	b, err := os.ReadFile(c.path(k))
	if err != nil {
		return nil, fmt.Errorf("read cached %s of %s: %w", describe(id), layer, notFound(err))
	}
	return b, nil
}

// remove deletes entry (layer, id), such as one whose bytes do not
// verify.
func (c *Cache) remove(layer digest.Digest, id ztoc.SpanID) {
	c.rm.RLock()
	defer c.rm.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	k := entryKey{layer, id}
	if e := c.entries[k]; e != nil && c.writing[k] == 0 {
		_ = os.Remove(c.path(k))
		c.drop(e)
	}
}

// Get returns the bytes of a cached span, or an error wrapping ErrNotCached.
func (c *Cache) Get(ctx context.Context, layer digest.Digest, id ztoc.SpanID) ([]byte, error) {
	if err := checkSpan(layer, id); err != nil {
		return nil, fmt.Errorf("read cached span %d of %s: %w", id, layer, err)
	}
	return c.read(layer, id)
}

// CachedSpan reads one cached span. The entry is not evicted until it is
// closed, and stays readable after RemoveLayer.
type CachedSpan struct {
	f     *os.File
	size  int64
	unpin func()
}

// ReadAt implements io.ReaderAt.
func (r *CachedSpan) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }

// Size returns the length of the cached bytes.
func (r *CachedSpan) Size() int64 { return r.size }

// Close releases the file.
func (r *CachedSpan) Close() error {
	r.unpin()
	return r.f.Close()
}

// Open returns a reader of a cached span, or an error wrapping
// ErrNotCached. The caller must close it.
func (c *Cache) Open(ctx context.Context, layer digest.Digest, id ztoc.SpanID) (*CachedSpan, error) {
	if err := checkSpan(layer, id); err != nil {
		return nil, fmt.Errorf("open cached span %d of %s: %w", id, layer, err)
	}
	return c.open(entryKey{layer, id})
}

func (c *Cache) open(k entryKey) (*CachedSpan, error) {
	unpin, err := c.pin(k)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(c.path(k))
	if err != nil {
		unpin()
		return nil, fmt.Errorf("open cached %s of %s: %w", describe(k.id), k.layer, notFound(err))
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		unpin()
		return nil, fmt.Errorf("open cached %s of %s: %w", describe(k.id), k.layer, err)
	}
	return &CachedSpan{f: f, size: fi.Size(), unpin: unpin}, nil
}

// Has reports whether a span is cached.
func (c *Cache) Has(layer digest.Digest, id ztoc.SpanID) bool {
	if checkSpan(layer, id) != nil {
		return false
	}
	_, ok := c.size(layer, id)
	return ok
}

// Usage returns the bytes the cache holds for a layer.
func (c *Cache) Usage(layer digest.Digest) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.usage[layer]
}

// Size returns the bytes the cache holds (and reserves for the writes in
// progress).
func (c *Cache) Size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// RemoveLayer deletes every cached span of a layer. Removing a layer with
// nothing cached is not an error.
func (c *Cache) RemoveLayer(ctx context.Context, layer digest.Digest) error {
	if err := layer.Validate(); err != nil {
		return fmt.Errorf("remove cached spans of %q: %w", layer, err)
	}
	c.rm.Lock()
	defer c.rm.Unlock()
	c.mu.Lock()
	for k, e := range c.entries {
		if k.layer == layer {
			c.drop(e)
		}
	}
	c.mu.Unlock()
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
