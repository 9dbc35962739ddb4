package resolver

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/ztoc"
)

// localTrees keeps verified layers unpacked, each as the directory tree
// containerd's overlayfs snapshotter would have unpacked it
// (<dir>/<layer hex>, written by containerd's own archive.Apply with
// overlayfs whiteouts). Two things read a tree: the FUSE filesystem hands
// its regular files to the kernel for passthrough reads (containers
// started while the layer was lazy), and the snapshotter stacks it in
// overlayfs in place of the FUSE mount (containers started after the
// layer was verified), so that reading a verified layer costs what reading
// a pulled one does. Trees count toward the cache budget: a layer is only
// unpacked when its tree fits.
type localTrees struct {
	dir string

	mu    sync.Mutex
	sizes map[digest.Digest]int64 // bytes of each unpacked layer's files
	roots map[digest.Digest]*os.File
}

// legacyFilesDir is where daemons before the trees kept verified layers'
// files, one per data offset: deleted at start.
const legacyFilesDir = "files"

// openLocalTrees opens the trees kept under dir, deleting what a crash
// left half written.
func openLocalTrees(dir string) (*localTrees, error) {
	if err := os.RemoveAll(filepath.Join(filepath.Dir(dir), legacyFilesDir)); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	t := &localTrees{dir: dir, sizes: make(map[digest.Digest]int64), roots: make(map[digest.Digest]*os.File)}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if d.Validate() != nil {
			if err := os.RemoveAll(p); err != nil { // a partial unpack (its name has a suffix)
				return nil, err
			}
			continue
		}
		n, err := treeSize(p)
		if err != nil {
			return nil, err
		}
		t.sizes[d] = n
	}
	return t, nil
}

// treeSize adds up the sizes of the regular files below dir, counting
// hardlinked files once.
func treeSize(dir string) (int64, error) {
	var n int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		n += info.Size()
		return nil
	})
	return n, err
}

// total is the size of every unpacked layer's files.
func (t *localTrees) total() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var n int64
	for _, s := range t.sizes {
		n += s
	}
	return n
}

// usage is the size of layer's files (0 when it is not unpacked).
func (t *localTrees) usage(layer digest.Digest) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sizes[layer]
}

// path returns the directory of layer's tree, or "" when the layer is not
// unpacked.
func (t *localTrees) path(layer digest.Digest) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.sizes[layer]; !ok {
		return ""
	}
	return filepath.Join(t.dir, layer.Encoded())
}

// open returns the regular file at name (a clean path relative to the
// layer's root) in layer's tree, or nil when the layer is not unpacked or
// the tree has no regular file there. The path is resolved beneath the
// tree's root without following any symlink, so it never leaves the tree.
func (t *localTrees) open(layer digest.Digest, name string) (*os.File, error) {
	root, err := t.root(layer)
	if root == nil || err != nil || !filepath.IsLocal(name) {
		return nil, err
	}
	fd, err := unix.Openat2(int(root.Fd()), name, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s in the tree of layer %s: %w", name, layer, err)
	}
	f := os.NewFile(uintptr(fd), name)
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, err
	}
	return f, nil
}

// root returns the open directory of layer's tree (nil when it is not
// unpacked), opened once.
func (t *localTrees) root(layer digest.Digest) (*os.File, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.sizes[layer]; !ok {
		return nil, nil
	}
	if f := t.roots[layer]; f != nil {
		return f, nil
	}
	f, err := os.Open(filepath.Join(t.dir, layer.Encoded()))
	if err != nil {
		return nil, fmt.Errorf("open the tree of layer %s: %w", layer, err)
	}
	t.roots[layer] = f
	return f, nil
}

// unpack writes layer's tree from blob, its compressed tar stream, which
// must have been verified against the layer: with containerd's
// archive.Apply and overlayfs whiteouts, as containerd's overlayfs
// snapshotter unpacks a layer.
func (t *localTrees) unpack(ctx context.Context, layer digest.Digest, alg ztoc.Compression, blob io.Reader) (err error) {
	final := filepath.Join(t.dir, layer.Encoded())
	tmp := final + ".unpacking" // not a digest: openLocalTrees deletes it
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	stream := blob
	if alg == ztoc.Gzip {
		zr, err := gzip.NewReader(blob)
		if err != nil {
			return fmt.Errorf("unpack layer %s: %w", layer, err)
		}
		defer zr.Close()
		stream = zr
	}
	if _, err := archive.Apply(ctx, tmp, stream, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		return fmt.Errorf("unpack layer %s: %w", layer, err)
	}
	n, err := treeSize(tmp)
	if err != nil {
		return fmt.Errorf("unpack layer %s: %w", layer, err)
	}
	if err := os.RemoveAll(final); err != nil {
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	t.mu.Lock()
	t.sizes[layer] = n
	t.mu.Unlock()
	return nil
}

// remove deletes layer's tree.
func (t *localTrees) remove(layer digest.Digest) error {
	t.mu.Lock()
	delete(t.sizes, layer)
	if f := t.roots[layer]; f != nil {
		f.Close()
		delete(t.roots, layer)
	}
	t.mu.Unlock()
	return os.RemoveAll(filepath.Join(t.dir, layer.Encoded()))
}

// close closes the trees' open root directories.
func (t *localTrees) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for d, f := range t.roots {
		f.Close()
		delete(t.roots, d)
	}
}
