package fusefs

import (
	"sort"
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/spanpull/spanpull/ztoc"
)

// Tree is the immutable image of a layer's TOC that a mount serves: every
// node the layer's tar defines, after the name rules of containerd's
// archive.Apply (see NewTree). It is built once and then only read, by
// any number of requests at once.
//
// The layout is chosen for a million entries: one slice of fixed-size
// nodes, one slice of directory entries (each directory's children are a
// sorted run of it), every name and symlink target in one string, and the
// rare data (xattrs, sparse maps) in a side table. A node's index in the
// node slice is its identity: the root is 0, the others follow in the
// order the TOC defines them, so the same TOC always gives the same
// indexes (and node IDs, see Mount).
type Tree struct {
	nodes  []node
	ents   []dirent
	strs   string
	extras []extra
	// bytes is the total size of the files, for statfs.
	bytes int64
	// sum identifies the tree (see fingerprint): Resume refuses to serve
	// a connection with a tree other than the one it was served with.
	sum [32]byte
}

// node is one inode of the layer. Hardlinks share a node. Some fields mean
// different things for different types; the accessors below read them.
type node struct {
	mtime int64
	// size is the data size of a regular file, the target length of a
	// symlink.
	size int64
	// data is, for a regular file, where its data starts in the
	// uncompressed tar stream; for a directory, the index of its first
	// child in Tree.ents; for a symlink, the offset of its target in
	// Tree.strs; for a device, its rdev.
	data int64
	// mode holds the S_IFMT and permission bits, plus the node flags.
	mode   uint32
	uid    uint32
	gid    uint32
	nlink  uint32
	nsec   uint32
	nchild uint32 // children of a directory
	// ent is the directory entry of the node's first name (noEnt for the
	// root); it gives the node's path.
	ent uint32
	// extra is 1 + the index of the node's rare data in Tree.extras, or 0.
	extra uint32
	// toc is the index of the TOC entry that defined the node (noEntry
	// for directories made for the paths of other entries).
	toc uint32
}

// Node flags, kept in node.mode above the bits the kernel sees.
const (
	modeBits     = 0o177777
	flagOpaque   = 1 << 16 // directory hides the lower layers' one
	flagWhiteout = 1 << 17 // node presents an OCI whiteout
)

const (
	noEnt   = ^uint32(0)
	noEntry = ^uint32(0)
)

// dirent names node in directory parent.
type dirent struct {
	name   uint32 // offset in Tree.strs
	nlen   uint32
	node   uint32
	parent uint32
}

// extra is the rare data of a node.
type extra struct {
	xattrs []xattr // sorted by name
	// sparse is the TOC entry of a GNU sparse file, whose data is not one
	// run of the stream.
	sparse *ztoc.FileMetadata
}

type xattr struct {
	name  string
	value string
}

// Len returns the number of nodes (inodes) of the tree.
func (t *Tree) Len() int { return len(t.nodes) }

func (t *Tree) typ(i uint32) uint32  { return t.nodes[i].mode & syscall.S_IFMT }
func (t *Tree) isDir(i uint32) bool  { return t.typ(i) == syscall.S_IFDIR }
func (t *Tree) isReg(i uint32) bool  { return t.typ(i) == syscall.S_IFREG }
func (t *Tree) opaque(i uint32) bool { return t.nodes[i].mode&flagOpaque != 0 }

func (t *Tree) name(e *dirent) string { return t.strs[e.name : e.name+e.nlen] }

// children returns the entries of directory i, sorted by name.
func (t *Tree) children(i uint32) []dirent {
	n := &t.nodes[i]
	if n.mode&syscall.S_IFMT != syscall.S_IFDIR {
		return nil
	}
	return t.ents[n.data : n.data+int64(n.nchild)]
}

// child returns the node named name in directory i.
func (t *Tree) child(i uint32, name string) (uint32, bool) {
	es := t.children(i)
	k := sort.Search(len(es), func(k int) bool { return t.name(&es[k]) >= name })
	if k < len(es) && t.name(&es[k]) == name {
		return es[k].node, true
	}
	return 0, false
}

// target returns the target of symlink i.
func (t *Tree) target(i uint32) string {
	n := &t.nodes[i]
	return t.strs[n.data : n.data+n.size]
}

// path returns the path of node i (its first name for hardlinks), "" for
// the root.
func (t *Tree) path(i uint32) string {
	var names []string
	for i != 0 {
		e := &t.ents[t.nodes[i].ent]
		names = append(names, t.name(e))
		i = e.parent
	}
	for l, r := 0, len(names)-1; l < r; l, r = l+1, r-1 {
		names[l], names[r] = names[r], names[l]
	}
	return strings.Join(names, "/")
}

func (t *Tree) xattrs(i uint32) []xattr {
	if x := t.nodes[i].extra; x != 0 {
		return t.extras[x-1].xattrs
	}
	return nil
}

func (t *Tree) sparse(i uint32) *ztoc.FileMetadata {
	if x := t.nodes[i].extra; x != 0 {
		return t.extras[x-1].sparse
	}
	return nil
}

// fill sets a to the attributes of node i, whose node ID is id.
func (t *Tree) fill(i uint32, id uint64, a *fuse.Attr) {
	n := &t.nodes[i]
	*a = fuse.Attr{
		Ino:     id,
		Mode:    n.mode & modeBits,
		Nlink:   n.nlink,
		Owner:   fuse.Owner{Uid: n.uid, Gid: n.gid},
		Blksize: 4096,
	}
	switch n.mode & syscall.S_IFMT {
	case syscall.S_IFREG, syscall.S_IFLNK:
		a.Size = uint64(n.size)
		a.Blocks = (a.Size + 511) / 512
	case syscall.S_IFCHR, syscall.S_IFBLK:
		a.Rdev = uint32(n.data)
	}
	a.Mtime, a.Mtimensec = uint64(n.mtime), n.nsec
	a.Atime, a.Atimensec = a.Mtime, a.Mtimensec
	a.Ctime, a.Ctimensec = a.Mtime, a.Mtimensec
}

// getxattr returns the value of xattr name of node i.
func (t *Tree) getxattr(i uint32, name string) (string, bool) {
	if name == OpaqueXattr && t.opaque(i) {
		return "y", true
	}
	xs := t.xattrs(i)
	k := sort.Search(len(xs), func(k int) bool { return xs[k].name >= name })
	if k < len(xs) && xs[k].name == name {
		return xs[k].value, true
	}
	return "", false
}

// listxattr appends the xattr names of node i, each NUL-terminated, to p.
func (t *Tree) listxattr(i uint32, p []byte) []byte {
	hasOpaque := false
	for _, x := range t.xattrs(i) {
		p = append(append(p, x.name...), 0)
		hasOpaque = hasOpaque || x.name == OpaqueXattr
	}
	if t.opaque(i) && !hasOpaque {
		p = append(append(p, OpaqueXattr...), 0)
	}
	return p
}

// Entry is a node of a mounted layer as the daemon's hooks see it (see
// Options). It is only valid during the call it is passed to.
type Entry struct {
	t *Tree
	i uint32
}

// Index returns the index in the TOC (archive order, from 0) of the entry
// that defined the node, or -1 for a directory that only exists because
// other entries are below it.
func (e Entry) Index() int {
	if x := e.t.nodes[e.i].toc; x != noEntry {
		return int(x)
	}
	return -1
}

// Path returns the path of the node in the layer, without a leading slash
// (its first name for a file with hardlinks).
func (e Entry) Path() string { return e.t.path(e.i) }

// Offset returns where the data of a regular file starts in the layer's
// uncompressed tar stream.
func (e Entry) Offset() int64 {
	if !e.t.isReg(e.i) {
		return 0
	}
	return e.t.nodes[e.i].data
}

// Size returns the size of a regular file.
func (e Entry) Size() int64 {
	if !e.t.isReg(e.i) {
		return 0
	}
	return e.t.nodes[e.i].size
}

// Sparse reports whether the node is a GNU sparse file, whose data is
// not the run [Offset, Offset+Size) of the stream.
func (e Entry) Sparse() bool { return e.t.sparse(e.i) != nil }
