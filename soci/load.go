package soci

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/ztoc"
)

// ErrNotIndexed says that an index lists no zTOC for a layer: the runtime
// pulls the layer whole.
var ErrNotIndexed = errors.New("layer is not in the SOCI index")

// LayerIndex is what a runtime needs to mount one layer lazily: its zTOC,
// from the pack head when the index has a pack (a fraction of the zTOC's
// bytes), else from the zTOC itself.
type LayerIndex struct {
	// Ztoc is the layer's zTOC. When Windows is not nil its spans have no
	// Window: Windows.Window provides each before the span is inflated.
	// From a pack built with the layer it has a chunk table.
	Ztoc *ztoc.Ztoc
	// Windows fetches the spans' windows from the pack's windows blob; nil
	// when Ztoc has them (it came from the zTOC) or needs none (a tar
	// layer).
	Windows *Windows
	// ZtocDigest is the zTOC the index lists for the layer, which the pack
	// head (if used) describes.
	ZtocDigest digest.Digest
	// Head is the pack head Ztoc came from (zero Digest when it came from
	// the zTOC).
	Head ocispec.Descriptor
	// Fetched is how many bytes loading took (the head, or the zTOC).
	Fetched int64
	// PackErr says why the index's pack could not be used (the zTOC was
	// used instead); nil when the pack was used or there is none.
	PackErr error
	// Blob is the blob Ztoc was decoded from (the pack head, or the zTOC),
	// as fetched and verified: what a runtime stores to mount the layer
	// again without the registry.
	Blob []byte
	// Pack is the decoded pack head (nil when Ztoc came from the zTOC).
	Pack *ztoc.PackHead
	// TOC is a zTOC flatbuffer holding the layer's TOC. Ztoc.Files is nil:
	// the entries are read from TOC (Files, or ztoc.NewTOCReader) so that
	// a layer of a million files is never decoded into memory at once.
	TOC []byte
}

// Files calls fn with each TOC entry of the layer, in archive order,
// decoding and checking them one at a time (ztoc.DecodeFiles).
func (li *LayerIndex) Files(fn func(*ztoc.FileMetadata) error) error {
	return ztoc.DecodeFiles(li.TOC, fn)
}

// FullZtoc returns the layer's zTOC with every TOC entry decoded in Files:
// for tools that work on whole TOCs (resolving prefetch file lists), not
// for a runtime holding many layers.
func (li *LayerIndex) FullZtoc() (*ztoc.Ztoc, error) {
	z := *li.Ztoc
	z.Files = nil
	err := li.Files(func(f *ztoc.FileMetadata) error {
		z.Files = append(z.Files, *f)
		return nil
	})
	return &z, err
}

// DecodeLayerIndex decodes blob, a pack head (head is true) or a zTOC
// that LoadLayer fetched before, into a LayerIndex (without Windows: a
// head's windows come from the registry, see NewWindows). It is how a
// runtime mounts a layer again from what it stored.
func DecodeLayerIndex(blob []byte, head bool) (*LayerIndex, error) {
	li := &LayerIndex{Blob: blob}
	if head {
		h, err := ztoc.UnmarshalPackHeadInfo(blob)
		if err != nil {
			return nil, err
		}
		li.Ztoc, li.TOC, li.ZtocDigest, li.Pack = h.Ztoc, h.TOC, h.ZtocDigest, h
		li.Head = ocispec.Descriptor{MediaType: index.MediaTypePackHead, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
		return li, nil
	}
	z, err := ztoc.UnmarshalInfo(blob)
	if err != nil {
		return nil, err
	}
	li.Ztoc, li.TOC, li.ZtocDigest = z, blob, digest.FromBytes(blob)
	return li, nil
}

// LoadLayer loads the zTOC of image layer from the SOCI index ix of repo:
// from the layer's pack head when the index has a pack, verified by its
// descriptor digest and checked to describe the zTOC the index lists, or
// else (or when the pack cannot be used) from the zTOC. Neither may be
// larger than maxZtocSize bytes. Both are checked against the layer's
// compressed size.
func LoadLayer(ctx context.Context, repo *registry.Repository, ix *index.Index, layer ocispec.Descriptor, maxZtocSize int64) (*LayerIndex, error) {
	zd, ok := ix.Ztoc(layer.Digest)
	if !ok {
		return nil, fmt.Errorf("layer %s: %w", layer.Digest, ErrNotIndexed)
	}
	li := &LayerIndex{ZtocDigest: zd.Digest}
	if head, windows, ok := ix.Pack(layer.Digest); ok {
		err := li.loadPack(ctx, repo, layer, zd, head, windows, maxZtocSize)
		if err == nil {
			return li, nil
		}
		li.PackErr = err
	}
	b, err := repo.FetchBlobBytes(ctx, zd, maxZtocSize)
	li.Fetched += int64(len(b))
	if err != nil {
		return nil, fmt.Errorf("layer %s: fetch zTOC %s: %w", layer.Digest, zd.Digest, err)
	}
	z, err := ztoc.UnmarshalInfo(b)
	if err != nil {
		return nil, fmt.Errorf("layer %s: zTOC %s: %w", layer.Digest, zd.Digest, err)
	}
	if z.CompressedArchiveSize != layer.Size {
		return nil, fmt.Errorf("layer %s: zTOC %s describes %d compressed bytes, the layer has %d", layer.Digest, zd.Digest, z.CompressedArchiveSize, layer.Size)
	}
	li.Ztoc, li.Blob, li.TOC = z, b, b
	return li, nil
}

// loadPack fills li from the pack (head, windows) of zTOC zd of layer.
func (li *LayerIndex) loadPack(ctx context.Context, repo *registry.Repository, layer, zd, head, windows ocispec.Descriptor, maxSize int64) error {
	b, err := repo.FetchBlobBytes(ctx, head, maxSize)
	li.Fetched += int64(len(b))
	if err != nil {
		return fmt.Errorf("fetch pack head %s: %w", head.Digest, err)
	}
	if d := digest.FromBytes(b); d != head.Digest {
		return fmt.Errorf("pack head %s: content digest is %s", head.Digest, d)
	}
	h, err := ztoc.UnmarshalPackHeadInfo(b)
	if err != nil {
		return fmt.Errorf("pack head %s: %w", head.Digest, err)
	}
	switch {
	case h.ZtocDigest != zd.Digest || h.ZtocSize != zd.Size:
		return fmt.Errorf("pack head %s describes zTOC %s (%d bytes), the index lists %s (%d bytes)", head.Digest, h.ZtocDigest, h.ZtocSize, zd.Digest, zd.Size)
	case h.Ztoc.CompressedArchiveSize != layer.Size:
		return fmt.Errorf("pack head %s describes %d compressed bytes, the layer has %d", head.Digest, h.Ztoc.CompressedArchiveSize, layer.Size)
	case h.WindowsSize == 0 && windows.Digest != "":
		return fmt.Errorf("pack head %s has no windows, the index lists windows blob %s", head.Digest, windows.Digest)
	case h.WindowsSize > 0 && (windows.Digest != h.WindowsDigest || windows.Size != h.WindowsSize):
		return fmt.Errorf("pack head %s names windows blob %s (%d bytes), the index lists %q (%d bytes)", head.Digest, h.WindowsDigest, h.WindowsSize, windows.Digest, windows.Size)
	}
	li.Ztoc, li.Head, li.Blob, li.TOC, li.Pack = h.Ztoc, head, b, h.TOC, h
	li.Windows = NewWindows(repo, windows, h)
	return nil
}

// windowCacheSize is how many decoded windows a Windows keeps: a span's
// window is needed once per inflation of the span, and the span engine
// keeps inflated spans itself, so a few cover the spans being read now.
const windowCacheSize = 8

// Windows fetches the checkpoint windows of a layer loaded from a pack
// head: each with one range read of the windows blob, verified against the
// head and decoded. It keeps the last few windows and shares concurrent
// fetches of one window. It is safe for concurrent use.
type Windows struct {
	repo *registry.Repository
	desc ocispec.Descriptor
	head *ztoc.PackHead

	fetched atomic.Int64
	onFetch atomic.Pointer[func(int64)]
	dir     atomic.Pointer[string] // keeps fetched windows on disk
	flight  singleflight.Group
	mu      sync.Mutex
	cache   []cachedWindow // most recently used last
}

type cachedWindow struct {
	id  ztoc.SpanID
	win []byte
}

// NewWindows returns the Windows of a layer whose pack head is h and whose
// windows blob is windows in repo, or nil when the layer needs none (a tar
// layer).
func NewWindows(repo *registry.Repository, windows ocispec.Descriptor, h *ztoc.PackHead) *Windows {
	if h.Ztoc.Algorithm != ztoc.Gzip {
		return nil
	}
	// A Windows lives as long as its layer is mounted: it keeps only the
	// head's window table, not its TOC, which shares the head's decoded
	// bytes (over 100 MB for a million entries).
	return &Windows{repo: repo, desc: windows, head: h.WindowTable()}
}

// Window returns the 32 KiB window of span id. The caller must not modify
// it. An error (a failed read, bytes that do not match the head) concerns
// this span only. Concurrent calls for one span share one fetch, which
// runs under the context of the call that started it.
func (w *Windows) Window(ctx context.Context, id ztoc.SpanID) ([]byte, error) {
	if win, ok := w.cached(id); ok {
		return win, nil
	}
	v, err, _ := w.flight.Do(fmt.Sprint(id), func() (any, error) {
		return w.fetch(ctx, id)
	})
	if err != nil {
		return nil, err
	}
	return v.([]byte), nil
}

// KeepIn makes w keep every window it fetches in directory dir (created
// when needed), as the compressed bytes of the windows blob, and look
// there before fetching: a layer whose spans are cached then reads without
// the registry, also after a restart. Kept windows are checked against the
// head like fetched ones.
func (w *Windows) KeepIn(dir string) { w.dir.Store(&dir) }

// keptName is the name of the file that keeps span id's compressed window.
func keptName(id ztoc.SpanID) string { return strconv.Itoa(int(id)) }

// kept returns the compressed window of span id kept on disk, if any.
func (w *Windows) kept(id ztoc.SpanID) ([]byte, bool) {
	dir := w.dir.Load()
	if dir == nil {
		return nil, false
	}
	b, err := os.ReadFile(filepath.Join(*dir, keptName(id)))
	return b, err == nil
}

// keep stores compressed window bytes of span id on disk (best effort: a
// window that cannot be kept is fetched again when needed).
func (w *Windows) keep(id ztoc.SpanID, compressed []byte) {
	dir := w.dir.Load()
	if dir == nil || os.MkdirAll(*dir, 0o700) != nil {
		return
	}
	_ = atomicfile.WriteFile(*dir, keptName(id), compressed)
}

// fetch reads, verifies and decodes the window of span id, and caches it.
func (w *Windows) fetch(ctx context.Context, id ztoc.SpanID) ([]byte, error) {
	if b, ok := w.kept(id); ok {
		if win, err := w.head.DecodeWindow(id, b); err == nil {
			return w.remember(id, win), nil
		}
	}
	off, n := w.head.WindowRange(id)
	var compressed []byte
	if n > 0 {
		compressed = make([]byte, n)
		got, err := w.repo.ReadAt(ctx, w.desc, compressed, off)
		w.count(int64(got))
		if err != nil {
			return nil, fmt.Errorf("window of span %d: read [%d, %d) of %s: %w", id, off, off+n, w.desc.Digest, err)
		}
	}
	win, err := w.head.DecodeWindow(id, compressed)
	if err != nil {
		return nil, fmt.Errorf("windows blob %s: %w", w.desc.Digest, err)
	}
	if n > 0 {
		w.keep(id, compressed)
	}
	return w.remember(id, win), nil
}

// count adds n fetched bytes to Fetched and reports them to OnFetch's
// function.
func (w *Windows) count(n int64) {
	w.fetched.Add(n)
	if fn := w.onFetch.Load(); fn != nil {
		(*fn)(n)
	}
}

// remember puts window win of span id in the memory cache and returns it.
func (w *Windows) remember(id ztoc.SpanID, win []byte) []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.cache) == windowCacheSize {
		w.cache = append(w.cache[:0], w.cache[1:]...)
	}
	w.cache = append(w.cache, cachedWindow{id, win})
	return win
}

// cached returns the cached window of span id, marking it recently used.
func (w *Windows) cached(id ztoc.SpanID) ([]byte, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, c := range w.cache {
		if c.id == id {
			copy(w.cache[i:], w.cache[i+1:])
			w.cache[len(w.cache)-1] = c
			return c.win, true
		}
	}
	return nil, false
}

// OnFetch makes fn learn the size of every read of the windows blob (for a
// runtime's byte counters).
func (w *Windows) OnFetch(fn func(n int64)) { w.onFetch.Store(&fn) }

// Fetched returns how many bytes of the windows blob were read so far.
func (w *Windows) Fetched() int64 { return w.fetched.Load() }
