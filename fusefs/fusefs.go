// Package fusefs presents one layer of an image, described by its zTOC, as
// a read-only FUSE filesystem whose file contents are read on demand.
//
// The filesystem is a compact, immutable Tree built once from the layer's
// TOC (NewTree, linear in the size of the TOC; the entries can be streamed
// from the zTOC with ztoc.DecodeFiles, so the TOC never exists as a slice)
// and shows what containerd's archive.Apply would unpack from the layer's
// tar: types, modes, owners, times, links, devices, xattrs, and OCI
// whiteouts in the form overlayfs understands, so the mount can serve as an
// overlayfs lowerdir.
//
// # Memory
//
// A tree costs about 80 bytes of heap per entry plus the entry's name, and
// nothing of the TOC is kept. TestTreeMemory measures it: a layer of
// 1,000,000 entries (98% files and links, 12-byte names) holds 91 MB of
// live heap, 91 bytes per entry, and builds in 1.6 s on one core of the
// 2-core test machine; 100,000 entries cost the same per entry.
//
// # Serving and taking over
//
// The filesystem speaks the FUSE protocol directly (a fuse.RawFileSystem):
// a node's ID is 1 for the root and 1+i for the node at index i of the
// tree, the same in every process for the same TOC, and open files carry no
// state of the serving process. So a mount outlives the process that
// serves it: Server.Handoff gives the /dev/fuse descriptor and the little
// state a successor needs, and Resume, in another process, serves the live
// connection again, kernel requests in flight included (package fdstore
// keeps the descriptor while no daemon runs).
//
// # Local files
//
// Once a file's bytes are on local disk (Options.Backing), the kernel reads
// them itself, without a round trip to this process (FUSE passthrough,
// Linux 6.9+). Other reads go to the layer's StreamReader, which returns
// bytes of the layer's uncompressed tar stream: the package knows nothing
// about registries or spans.
package fusefs

import (
	"context"
	"errors"
	"os"
	"sync"
	"sync/atomic"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
)

// StreamReader returns the verified bytes of the layer's uncompressed tar
// stream. span.Layer implements it; fusefs only asks for the bytes a read
// needs.
type StreamReader interface {
	// ReadAt fills p with uncompressed bytes at offset off of the layer's
	// tar stream. It returns as soon as these bytes are available, and
	// an error if it returns fewer than len(p) bytes.
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// Observer learns which files a workload uses, for recorded prefetch. Its
// methods are called on the paths that serve the kernel and must return
// quickly.
type Observer interface {
	// Opened is called the first time a file is opened (per Root).
	Opened(e Entry)
	// Read is called for every read the kernel sends for a file: n bytes
	// at offset off of the file. Reads the kernel serves itself (from
	// its cache, or from a backing file) are not seen.
	Read(e Entry, off int64, n int)
}

// Options configure a Root.
type Options struct {
	// Logger receives the errors that reads return to the kernel as EIO
	// (the kernel cannot carry their cause) and go-fuse's diagnostics.
	// Nil means a logger of its own on stderr at info level; the daemon
	// passes its one logger.
	Logger *log.Entry
	// Backing, when set, is asked at the first open of a regular file
	// (while no file of the node is open) for a local file holding the
	// file's whole content. When it returns one, the kernel reads that
	// file directly (FUSE passthrough) until the last open file of the
	// node is closed; fusefs closes the returned file. A nil file means
	// reads go to the StreamReader.
	Backing func(ctx context.Context, e Entry) (*os.File, error)
	// VerifyEntry, when set, is called per regular file before the first
	// byte of it is served (before a passthrough open, or before the first
	// read), and per symlink before its target is first read, until it
	// succeeds or rejects the entry. An error fails that
	// read with EIO; one wrapping ErrRejected fails every later read too,
	// and is logged once.
	VerifyEntry func(ctx context.Context, e Entry) error
	// Observer, when set, sees opens and reads.
	Observer Observer
}

// ErrRejected marks a VerifyEntry error that is a verdict: the entry does
// not match the layer, and every later read of it fails too. Any other
// error (the bytes to check could not be read) fails the read at hand
// only, and the check runs again on the next read.
var ErrRejected = errors.New("entry failed verification")

// Root is a layer ready to be served: its tree, where its bytes come from,
// and the hooks of the daemon. A Root is mounted once, by Mount, Resume or
// Server.Replace.
type Root struct {
	tree *Tree
	src  StreamReader
	opts Options
	log  *log.Entry

	mounted atomic.Bool
	// verified remembers VerifyEntry's results (node index ->
	// *verification).
	verified sync.Map
	// opened has a bit per node once Observer.Opened saw it.
	opened []atomic.Uint64
}

// NewRoot returns the Root that serves tree with bytes from src.
func NewRoot(tree *Tree, src StreamReader, opts Options) (*Root, error) {
	if tree == nil {
		return nil, errors.New("fusefs: nil Tree")
	}
	if src == nil {
		return nil, errors.New("fusefs: nil StreamReader")
	}
	r := &Root{tree: tree, src: src, opts: opts, log: opts.Logger}
	if r.log == nil {
		r.log = logrus.NewEntry(logrus.New())
	}
	if opts.Observer != nil {
		r.opened = make([]atomic.Uint64, (tree.Len()+63)/64)
	}
	return r, nil
}

// entry returns the hooks' view of node i.
func (r *Root) entry(i uint32) Entry { return Entry{t: r.tree, i: i} }

// verification is VerifyEntry's result for one node.
type verification struct {
	mu     sync.Mutex
	done   bool
	err    error
	logged bool
	ok     atomic.Bool
}

// verify runs VerifyEntry for regular file or symlink i once, and reports its result
// and whether this is the first time a failure is reported.
func (r *Root) verify(ctx context.Context, i uint32) (err error, first bool) {
	if r.opts.VerifyEntry == nil {
		return nil, false
	}
	vi, ok := r.verified.Load(i)
	if !ok {
		vi, _ = r.verified.LoadOrStore(i, &verification{})
	}
	v := vi.(*verification)
	if v.ok.Load() {
		return nil, false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.done {
		// Not canceled when the kernel interrupts the request (its caller
		// got a signal: a Go program gets SIGURG all the time, runc's
		// init while it execs through a symlink too): the kernel still
		// waits for the answer, and the verdict serves every later read.
		err := r.opts.VerifyEntry(context.WithoutCancel(ctx), r.entry(i))
		if err != nil && !errors.Is(err, ErrRejected) {
			// Not a verdict (the bytes could not be read): the next
			// read tries again.
			return err, true
		}
		v.done, v.err = true, err
		v.ok.Store(err == nil)
	}
	if v.err == nil {
		return nil, false
	}
	first = !v.logged
	v.logged = true
	return v.err, first
}

// observeOpen tells the Observer about the first open of node i.
func (r *Root) observeOpen(i uint32) {
	if r.opts.Observer == nil {
		return
	}
	w, bit := &r.opened[i/64], uint64(1)<<(i%64)
	for {
		old := w.Load()
		if old&bit != 0 {
			return
		}
		if w.CompareAndSwap(old, old|bit) {
			r.opts.Observer.Opened(r.entry(i))
			return
		}
	}
}
