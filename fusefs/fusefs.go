// Package fusefs presents one layer of an image, described by its zTOC, as
// a read-only FUSE filesystem whose file contents are read on demand.
//
// The filesystem is built in memory from the zTOC's TOC once, when the
// layer is mounted (linear in the size of the TOC; no database), and
// shows exactly what the layer's tar holds: types, modes, owners, times,
// links, devices, xattrs, and OCI whiteouts in the form overlayfs
// understands, so the mount can serve as an overlayfs lowerdir.
//
// The package knows nothing about registries or spans: file data comes
// from a StreamReader that returns bytes of the layer's uncompressed tar
// stream.
package fusefs

import (
	"context"
	"errors"
	"io"
	"sort"
	"sync/atomic"
	"syscall"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"

	"github.com/spanpull/spanpull/ztoc"
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

// Options configure a Root.
type Options struct {
	// Logger receives the errors that reads return to the kernel as EIO
	// (the kernel cannot carry their cause) and go-fuse's diagnostics.
	// Nil means a logger of its own on stderr at info level; the daemon
	// passes its one logger.
	Logger *log.Entry
}

// Root is the root directory of a layer's filesystem, ready to be
// mounted once with Mount.
type Root struct {
	fsNode
	mounted atomic.Bool
}

// layer is what every node of a mount shares.
type layer struct {
	src  StreamReader
	log  *log.Entry
	tree *tree
}

// NewRoot builds the filesystem of a layer from its TOC (ztoc.Ztoc.Files,
// in archive order). Entries that would escape the layer (absolute names,
// ".." components), hardlinks to missing files and other malformed
// entries make it fail with an error that names the entry.
func NewRoot(files []ztoc.FileMetadata, src StreamReader, opts Options) (*Root, error) {
	if src == nil {
		return nil, errors.New("fusefs: nil StreamReader")
	}
	t, err := buildTree(files)
	if err != nil {
		return nil, err
	}
	l := &layer{src: src, log: opts.Logger, tree: t}
	if l.log == nil {
		l.log = logrus.NewEntry(logrus.New())
	}
	return &Root{fsNode: fsNode{n: t.root, l: l}}, nil
}

// fsNode is the go-fuse node of every inode; go-fuse creates them lazily,
// on lookup, and drops them when the kernel forgets them.
type fsNode struct {
	fs.Inode
	n *node
	l *layer
}

var (
	_ fs.NodeLookuper    = (*fsNode)(nil)
	_ fs.NodeReaddirer   = (*fsNode)(nil)
	_ fs.NodeGetattrer   = (*fsNode)(nil)
	_ fs.NodeOpener      = (*fsNode)(nil)
	_ fs.NodeReader      = (*fsNode)(nil)
	_ fs.NodeReadlinker  = (*fsNode)(nil)
	_ fs.NodeGetxattrer  = (*fsNode)(nil)
	_ fs.NodeListxattrer = (*fsNode)(nil)
	_ fs.NodeStatfser    = (*fsNode)(nil)
)

func (n *node) fill(a *fuse.Attr) {
	a.Ino = n.ino
	a.Mode = n.mode
	a.Size = uint64(n.size)
	a.Blocks = (uint64(n.size) + 511) / 512
	a.Blksize = 4096
	a.Nlink = n.nlink
	if n.isDir() {
		a.Nlink = 2 + n.dir.subdirs
	}
	a.Owner = fuse.Owner{Uid: n.uid, Gid: n.gid}
	a.Rdev = n.rdev
	a.Mtime, a.Mtimensec = uint64(n.mtime), n.mtimeNsec
	a.Atime, a.Atimensec = a.Mtime, a.Mtimensec
	a.Ctime, a.Ctimensec = a.Mtime, a.Mtimensec
}

// Lookup implements fs.NodeLookuper.
func (f *fsNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if !f.n.isDir() {
		return nil, syscall.ENOTDIR
	}
	c := f.n.dir.children[name]
	if c == nil {
		return nil, syscall.ENOENT
	}
	c.fill(&out.Attr)
	// Hardlinks share the Ino, so go-fuse hands back the live inode of
	// another name when there is one.
	return f.NewInode(ctx, &fsNode{n: c, l: f.l}, fs.StableAttr{Mode: c.mode & syscall.S_IFMT, Ino: c.ino}), 0
}

// Readdir implements fs.NodeReaddirer.
func (f *fsNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if !f.n.isDir() {
		return nil, syscall.ENOTDIR
	}
	d := f.n.dir
	entries := make([]fuse.DirEntry, len(d.names))
	for i, name := range d.names {
		c := d.children[name]
		entries[i] = fuse.DirEntry{Name: name, Mode: c.mode, Ino: c.ino}
	}
	return fs.NewListDirStream(entries), 0
}

// Getattr implements fs.NodeGetattrer.
func (f *fsNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.n.fill(&out.Attr)
	return 0
}

// Open implements fs.NodeOpener. The layer never changes, so the kernel
// may keep file pages cached across opens.
func (f *fsNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

// Read implements fs.NodeReader: file bytes [off, off+len(dest)) are tar
// stream bytes [offset+off, ...).
func (f *fsNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n := f.n
	if n.mode&syscall.S_IFMT != syscall.S_IFREG {
		return nil, syscall.EINVAL
	}
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= n.size {
		return fuse.ReadResultData(nil), 0
	}
	want := min(int64(len(dest)), n.size-off)
	var got int
	var err error
	if n.sparse != nil {
		got, err = ztoc.ReadFileAt(streamAt{ctx, f.l.src}, n.sparse, dest[:want], off)
	} else {
		got, err = f.l.src.ReadAt(ctx, dest[:want], n.offset+off)
	}
	if int64(got) == want && (err == nil || errors.Is(err, io.EOF)) {
		return fuse.ReadResultData(dest[:want]), 0
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	f.l.log.WithFields(log.Fields{"path": f.Path(nil), "ino": n.ino, "offset": off, "length": want,
		"stream_offset": n.offset + off}).WithError(err).Error("fusefs: read failed")
	return nil, syscall.EIO
}

// streamAt binds a read context to a StreamReader, as io.ReaderAt.
type streamAt struct {
	ctx context.Context
	src StreamReader
}

func (s streamAt) ReadAt(p []byte, off int64) (int, error) { return s.src.ReadAt(s.ctx, p, off) }

// Readlink implements fs.NodeReadlinker.
func (f *fsNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if f.n.mode&syscall.S_IFMT != syscall.S_IFLNK {
		return nil, syscall.EINVAL
	}
	return []byte(f.n.target), 0
}

// getxattr returns the value of xattr name.
func (n *node) getxattr(name string) (string, bool) {
	if name == OpaqueXattr && n.isDir() && n.dir.opaque {
		return "y", true
	}
	i := sort.Search(len(n.xattrs), func(i int) bool { return n.xattrs[i].name >= name })
	if i < len(n.xattrs) && n.xattrs[i].name == name {
		return n.xattrs[i].value, true
	}
	return "", false
}

// Getxattr implements fs.NodeGetxattrer.
func (f *fsNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := f.n.getxattr(attr)
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

// Listxattr implements fs.NodeListxattrer.
func (f *fsNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	n := f.n
	names := make([]string, 0, len(n.xattrs)+1)
	for _, x := range n.xattrs {
		names = append(names, x.name)
	}
	if n.isDir() && n.dir.opaque && !hasXattr(n.xattrs, OpaqueXattr) {
		names = append(names, OpaqueXattr)
	}
	size := 0
	for _, name := range names {
		size += len(name) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	p := dest[:0]
	for _, name := range names {
		p = append(p, name...)
		p = append(p, 0)
	}
	return uint32(size), 0
}

func hasXattr(xs []xattr, name string) bool {
	for _, x := range xs {
		if x.name == name {
			return true
		}
	}
	return false
}

// Statfs implements fs.NodeStatfser.
func (f *fsNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	const bsize = 4096
	t := f.l.tree
	*out = fuse.StatfsOut{
		Blocks:  uint64((t.bytes + bsize - 1) / bsize),
		Files:   uint64(t.nodes),
		Bsize:   bsize,
		Frsize:  bsize,
		NameLen: 255,
	}
	return 0
}
