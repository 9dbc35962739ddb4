package fusefs

import (
	"errors"
	"io"
	"math"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/spanpull/spanpull/ztoc"
)

// view is what a server serves at one moment: a Root, and how node IDs map
// to its nodes. Server.Replace swaps it whole; a request uses the view it
// loaded when it started.
type view struct {
	root *Root
	// base places the tree in the ID space: node i > 0 has ID base+i
	// (the root is always FUSE_ROOT_ID). The first tree of a mount has
	// base 1; each replacement starts after every ID given out before.
	base uint64
	// gens map the IDs of the trees served before (which the kernel may
	// still hold) to nodes of this one.
	gens []generation
}

// generation maps the node IDs of a tree served before to the current
// tree: ID base+k stands for node to[k] now, or for nothing when to[k] is
// 0.
type generation struct {
	base uint64
	to   []uint32
}

// node returns the node that ID id stands for.
func (v *view) node(id uint64) (uint32, fuse.Status) {
	if id == fuse.FUSE_ROOT_ID {
		return 0, fuse.OK
	}
	if id > v.base && id-v.base < uint64(v.root.tree.Len()) {
		return uint32(id - v.base), fuse.OK
	}
	for _, g := range v.gens {
		if id > g.base && id-g.base < uint64(len(g.to)) {
			if i := g.to[id-g.base]; i != 0 {
				return i, fuse.OK
			}
			break
		}
	}
	return 0, fuse.Status(syscall.ESTALE)
}

// dir is node for an ID that must name a directory: the status is
// node's for an unknown ID and ENOTDIR for a node that is no directory.
func (v *view) dir(id uint64) (uint32, fuse.Status) {
	d, st := v.node(id)
	if !st.Ok() {
		return 0, st
	}
	if !v.root.tree.isDir(d) {
		return 0, fuse.ENOTDIR
	}
	return d, fuse.OK
}

// id returns the node ID of node i.
func (v *view) id(i uint32) uint64 {
	if i == 0 {
		return fuse.FUSE_ROOT_ID
	}
	return v.base + uint64(i)
}

// next returns the first ID after every ID the view's trees gave out.
func (v *view) next() uint64 {
	n := v.base + uint64(v.root.tree.Len())
	for _, g := range v.gens {
		n = max(n, g.base+uint64(len(g.to)))
	}
	return n
}

// fsys is the FUSE filesystem of a mount. It keeps no state about the
// kernel's view of it except the open-file table (see openTable), which a
// successor inherits: node IDs are derived from the tree, Forget is a
// no-op, and file handles are 0.
type fsys struct {
	fuse.RawFileSystem
	view atomic.Pointer[view]
	srv  atomic.Pointer[fuse.Server]
	log  *log.Entry
	// entry, attr and negative are the kernel cache timeouts.
	entry, attr, negative time.Duration
	// opens counts open files per node ID; nil disables passthrough.
	opens         *openTable
	noPassthrough atomic.Bool
}

var _ fuse.RawFileSystem = (*fsys)(nil)

func newFS(v *view, opts MountOptions) *fsys {
	f := &fsys{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		log:           v.root.log,
		entry:         timeout(opts.EntryTimeout),
		attr:          timeout(opts.AttrTimeout),
		negative:      timeout(opts.NegativeTimeout),
	}
	f.view.Store(v)
	return f
}

func timeout(d time.Duration) time.Duration {
	switch {
	case d == 0:
		return DefaultTimeout
	case d < 0:
		return 0
	}
	return d
}

// String implements fuse.RawFileSystem.
func (f *fsys) String() string { return "spanpull" }

// Init implements fuse.RawFileSystem: it keeps the server, which the
// filesystem uses to register backing files.
func (f *fsys) Init(s *fuse.Server) { f.srv.Store(s) }

func (f *fsys) entryOut(v *view, i uint32, out *fuse.EntryOut) {
	id := v.id(i)
	out.NodeId, out.Generation = id, 0
	v.root.tree.fill(i, id, &out.Attr)
	out.SetEntryTimeout(f.entry)
	out.SetAttrTimeout(f.attr)
}

// Lookup implements fuse.RawFileSystem.
func (f *fsys) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	v := f.view.Load()
	d, st := v.dir(h.NodeId)
	if !st.Ok() {
		return st
	}
	t := v.root.tree
	c, ok := t.child(d, name)
	if !ok {
		if f.negative <= 0 {
			return fuse.ENOENT
		}
		// A node ID of 0 caches the absence of the name.
		out.NodeId = 0
		out.SetEntryTimeout(f.negative)
		return fuse.OK
	}
	f.entryOut(v, c, out)
	return fuse.OK
}

// GetAttr implements fuse.RawFileSystem.
func (f *fsys) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	v := f.view.Load()
	i, st := v.node(in.NodeId)
	if !st.Ok() {
		return st
	}
	v.root.tree.fill(i, in.NodeId, &out.Attr)
	out.SetTimeout(f.attr)
	return fuse.OK
}

// Open implements fuse.RawFileSystem. The layer never changes while it is
// served, so the kernel may keep file pages cached across opens; and a
// read-only file has nothing to flush, so closing it never waits for this
// process (which matters while no process serves the mount).
func (f *fsys) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY || in.Flags&syscall.O_TRUNC != 0 {
		return fuse.EROFS
	}
	v := f.view.Load()
	i, st := v.node(in.NodeId)
	if !st.Ok() {
		return st
	}
	out.Fh, out.OpenFlags = 0, fuse.FOPEN_KEEP_CACHE|fuse.FOPEN_NOFLUSH
	if !v.root.tree.isReg(i) {
		return fuse.OK
	}
	v.root.observeOpen(i)
	return f.openFile(&fuse.Context{Caller: in.Caller, Cancel: cancel}, v, in.NodeId, i, out)
}

// Release implements fuse.RawFileSystem.
func (f *fsys) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	f.release(in.NodeId)
}

// Read implements fuse.RawFileSystem: file bytes [off, off+len(buf)) are
// tar stream bytes [offset+off, ...).
func (f *fsys) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	v := f.view.Load()
	i, st := v.node(in.NodeId)
	if !st.Ok() {
		return nil, st
	}
	r, t := v.root, v.root.tree
	if !t.isReg(i) || in.Offset > math.MaxInt64 {
		return nil, fuse.EINVAL
	}
	off, n := int64(in.Offset), &t.nodes[i]
	if off >= n.size {
		return fuse.ReadResultData(nil), fuse.OK
	}
	want := min(int64(len(buf)), n.size-off)
	if r.opts.Observer != nil {
		r.opts.Observer.Read(r.entry(i), off, int(want))
	}
	ctx := &fuse.Context{Caller: in.Caller, Cancel: cancel}
	fields := func() log.Fields {
		return log.Fields{"path": t.path(i), "ino": in.NodeId, "offset": off, "length": want, "stream_offset": n.data + off}
	}
	if err, first := r.verify(ctx, i); err != nil {
		if first {
			r.log.WithFields(fields()).WithError(err).Error("fusefs: file failed verification; its reads fail")
		}
		return nil, fuse.EIO
	}
	var got int
	var err error
	if sp := t.sparse(i); sp != nil {
		got, err = ztoc.ReadFileAt(streamAt{ctx, r.src}, sp, buf[:want], off)
	} else {
		got, err = r.src.ReadAt(ctx, buf[:want], n.data+off)
	}
	if int64(got) == want && (err == nil || errors.Is(err, io.EOF)) {
		return fuse.ReadResultData(buf[:want]), fuse.OK
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	r.log.WithFields(fields()).WithError(err).Error("fusefs: read failed")
	return nil, fuse.EIO
}

// streamAt binds a read context to a StreamReader, as io.ReaderAt.
type streamAt struct {
	ctx *fuse.Context
	src StreamReader
}

func (s streamAt) ReadAt(p []byte, off int64) (int, error) { return s.src.ReadAt(s.ctx, p, off) }

// Readlink implements fuse.RawFileSystem.
func (f *fsys) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	v := f.view.Load()
	i, st := v.node(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	if v.root.tree.typ(i) != syscall.S_IFLNK {
		return nil, fuse.EINVAL
	}
	// A symlink's target is content, like a file's bytes: a forged one
	// sends whoever follows it to another file.
	if err, first := v.root.verify(&fuse.Context{Caller: h.Caller, Cancel: cancel}, i); err != nil {
		if first {
			v.root.log.WithFields(log.Fields{"path": v.root.tree.path(i), "ino": h.NodeId}).WithError(err).
				Error("fusefs: symlink failed verification; reading it fails")
		}
		return nil, fuse.EIO
	}
	return []byte(v.root.tree.target(i)), fuse.OK
}

// GetXAttr implements fuse.RawFileSystem.
func (f *fsys) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	v := f.view.Load()
	i, st := v.node(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	val, ok := v.root.tree.getxattr(i, attr)
	if !ok {
		return 0, fuse.ENOATTR
	}
	if len(dest) < len(val) {
		return uint32(len(val)), fuse.ERANGE
	}
	return uint32(copy(dest, val)), fuse.OK
}

// ListXAttr implements fuse.RawFileSystem.
func (f *fsys) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	v := f.view.Load()
	i, st := v.node(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	names := v.root.tree.listxattr(i, nil)
	if len(dest) < len(names) {
		return uint32(len(names)), fuse.ERANGE
	}
	return uint32(copy(dest, names)), fuse.OK
}

// OpenDir implements fuse.RawFileSystem. Directories never change while a
// tree is served, so the kernel may cache their listings.
func (f *fsys) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if _, st := f.view.Load().dir(in.NodeId); !st.Ok() {
		return st
	}
	out.Fh, out.OpenFlags = 0, fuse.FOPEN_KEEP_CACHE|fuse.FOPEN_CACHE_DIR
	return fuse.OK
}

// ReadDir implements fuse.RawFileSystem. The offset of an entry is its
// position in the directory's sorted entries, which any process serving
// the same tree agrees on.
func (f *fsys) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return f.readDir(in, out, false)
}

// ReadDirPlus implements fuse.RawFileSystem.
func (f *fsys) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return f.readDir(in, out, true)
}

func (f *fsys) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	v := f.view.Load()
	d, st := v.dir(in.NodeId)
	if !st.Ok() {
		return st
	}
	t := v.root.tree
	es := t.children(d)
	for k := in.Offset; k < uint64(len(es)); k++ {
		e := &es[k]
		de := fuse.DirEntry{Name: t.name(e), Mode: t.nodes[e.node].mode & modeBits, Ino: v.id(e.node), Off: k + 1}
		if !plus {
			if !out.AddDirEntry(de) {
				break
			}
			continue
		}
		eo := out.AddDirLookupEntry(de)
		if eo == nil {
			break
		}
		f.entryOut(v, e.node, eo)
	}
	return fuse.OK
}

// StatFs implements fuse.RawFileSystem.
func (f *fsys) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	const bsize = 4096
	t := f.view.Load().root.tree
	*out = fuse.StatfsOut{
		Blocks:  uint64((t.bytes + bsize - 1) / bsize),
		Files:   uint64(t.Len()),
		Bsize:   bsize,
		Frsize:  bsize,
		NameLen: maxNameLen,
	}
	return fuse.OK
}
