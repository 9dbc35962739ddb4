package fusefs

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"syscall"

	"github.com/spanpull/spanpull/ztoc"
)

// Whiteout names of the OCI image spec (AUFS style).
const (
	whiteoutPrefix = ".wh."
	// whiteoutMetaPrefix starts AUFS metadata names (.wh..wh.plnk and
	// the like), which carry no file of the image and are skipped.
	whiteoutMetaPrefix = whiteoutPrefix + whiteoutPrefix
	// whiteoutOpaque marks its directory opaque.
	whiteoutOpaque = whiteoutMetaPrefix + ".opq"
	// OpaqueXattr is the xattr overlayfs reads to know that a lower
	// directory hides the directories below it. An opaque directory
	// reports it with the value "y".
	OpaqueXattr = "trusted.overlay.opaque"
)

// Limits of the Linux device number encoding FUSE uses (new_encode_dev).
const (
	maxDevMajor = 1<<12 - 1
	maxDevMinor = 1<<20 - 1
)

// node is one inode of the layer. Hardlinks share a node.
type node struct {
	ino  uint64
	mode uint32 // S_IFMT bits | permission bits
	uid  uint32
	gid  uint32
	// nlink counts the names of a non-directory; directories compute
	// theirs from dir.subdirs.
	nlink     uint32
	rdev      uint32
	mtimeNsec uint32
	mtime     int64
	// size is the data size of a regular file, the target length of a
	// symlink.
	size int64
	// offset is where a regular file's data starts in the uncompressed
	// tar stream.
	offset int64
	// sparse is the regular file itself when it is a GNU sparse file,
	// whose bytes are not one run of the stream.
	sparse   *ztoc.FileMetadata
	target   string   // symlink target
	xattrs   []xattr  // sorted by name
	whiteout bool     // presents an OCI whiteout
	dir      *dirData // non-nil for directories
}

type xattr struct {
	name  string
	value string
}

type dirData struct {
	children map[string]*node
	// names lists children in the order they first appeared in the tar.
	names   []string
	opaque  bool
	subdirs uint32
}

func (n *node) isDir() bool { return n.dir != nil }

// tree is the in-memory image of a layer's TOC.
type tree struct {
	root    *node
	nextIno uint64
	// nodes counts the nodes currently reachable (for statfs).
	nodes int
	bytes int64
}

// buildTree turns a TOC into a tree. Its cost is linear in the total
// length of the names.
func buildTree(files []ztoc.FileMetadata) (*tree, error) {
	t := &tree{nextIno: 1}
	t.root = t.newDir()
	t.root.nlink = 1
	var comps []string
	for i := range files {
		f := &files[i]
		var err error
		comps, err = splitName(comps[:0], f.Name)
		if err == nil {
			err = t.add(f, comps)
		}
		if err != nil {
			return nil, fmt.Errorf("tar entry %d %q: %w", i, f.Name, err)
		}
	}
	t.finish(t.root)
	return t, nil
}

// splitName appends the components of a tar name to comps. Leading "./",
// "." components, repeated and trailing slashes are dropped; absolute
// names and ".." components are refused since they would escape the layer.
func splitName(comps []string, name string) ([]string, error) {
	if name == "" {
		return nil, errors.New("empty name")
	}
	if name[0] == '/' {
		return nil, errors.New("absolute name")
	}
	for name != "" {
		var c string
		c, name, _ = strings.Cut(name, "/")
		switch c {
		case "", ".":
		case "..":
			return nil, errors.New(`name has a ".." component`)
		default:
			comps = append(comps, c)
		}
	}
	return comps, nil
}

func (t *tree) newNode(mode uint32) *node {
	n := &node{ino: t.nextIno, mode: mode}
	t.nextIno++
	return n
}

// newDir returns a directory with no entry of its own: 0755, root-owned.
func (t *tree) newDir() *node {
	n := t.newNode(syscall.S_IFDIR | 0o755)
	n.dir = &dirData{children: make(map[string]*node)}
	return n
}

// add adds TOC entry f, whose name has the components comps, to the tree.
func (t *tree) add(f *ztoc.FileMetadata, comps []string) error {
	for i, c := range comps {
		if strings.HasPrefix(c, whiteoutMetaPrefix) && !(c == whiteoutOpaque && i == len(comps)-1) {
			return nil // AUFS metadata, not part of the image
		}
	}
	if len(comps) == 0 {
		if f.Type != ztoc.TypeDir {
			return fmt.Errorf("the layer root can only be a directory, not %q", f.Type)
		}
		setMeta(t.root, f)
		return nil
	}
	parent, err := t.parentDir(comps)
	if err != nil {
		return err
	}
	base := comps[len(comps)-1]
	if base == whiteoutOpaque {
		parent.dir.opaque = true
		return nil
	}
	if name, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
		return t.addWhiteout(parent, name, f)
	}
	switch f.Type {
	case ztoc.TypeDir:
		t.addDir(parent, base, f)
		return nil
	case ztoc.TypeHardlink:
		return t.addHardlink(parent, base, f)
	}
	n, err := t.newEntryNode(f)
	if err != nil {
		return err
	}
	setMeta(n, f)
	t.link(parent, base, n)
	return nil
}

// addWhiteout adds whiteout entry f, which hides parent/name of the lower
// layers.
func (t *tree) addWhiteout(parent *node, name string, f *ztoc.FileMetadata) error {
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout of %q", name)
	}
	// A whiteout hides lower layers only: what this layer already holds
	// under the name stays, and a directory stops showing the lower ones.
	if old := parent.dir.children[name]; old != nil && !old.whiteout {
		if old.isDir() {
			old.dir.opaque = true
		}
		return nil
	}
	n := t.newNode(syscall.S_IFCHR)
	setMeta(n, f)
	n.mode = syscall.S_IFCHR // overlayfs whiteout: c 0 0, mode 0
	n.whiteout = true
	n.xattrs = nil
	t.link(parent, name, n)
	return nil
}

// addDir adds directory entry f as parent/name.
func (t *tree) addDir(parent *node, name string, f *ztoc.FileMetadata) {
	old := parent.dir.children[name]
	if old != nil && old.isDir() {
		// A directory entry for an existing directory updates its
		// metadata and keeps its children (as tar does).
		setMeta(old, f)
		return
	}
	n := t.newDir()
	if old != nil && old.whiteout {
		n.dir.opaque = true
	}
	setMeta(n, f)
	t.link(parent, name, n)
}

// addHardlink names the node of hardlink f's target parent/name too.
func (t *tree) addHardlink(parent *node, name string, f *ztoc.FileMetadata) error {
	target, err := t.lookup(f.Linkname)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", f.Linkname, err)
	}
	if target.isDir() {
		return fmt.Errorf("hardlink to directory %q", f.Linkname)
	}
	t.link(parent, name, target)
	return nil
}

// newEntryNode returns the node of entry f, a regular file, symlink,
// device or FIFO, without its metadata.
func (t *tree) newEntryNode(f *ztoc.FileMetadata) (*node, error) {
	switch f.Type {
	case ztoc.TypeReg:
		if f.UncompressedOffset < 0 || f.UncompressedSize < 0 || f.UncompressedOffset > math.MaxInt64-f.UncompressedSize {
			return nil, fmt.Errorf("bad data range: offset %d, size %d", f.UncompressedOffset, f.UncompressedSize)
		}
		n := t.newNode(syscall.S_IFREG)
		n.offset = f.UncompressedOffset
		n.size = f.UncompressedSize
		if _, ok := f.PAXRecords[ztoc.SparseMapRecord]; ok {
			if _, err := f.Fragments(); err != nil {
				return nil, err
			}
			n.sparse = f
		}
		return n, nil
	case ztoc.TypeSymlink:
		if f.Linkname == "" {
			return nil, errors.New("symlink has no target")
		}
		n := t.newNode(syscall.S_IFLNK)
		n.target = f.Linkname
		n.size = int64(len(f.Linkname))
		return n, nil
	case ztoc.TypeChar, ztoc.TypeBlock:
		if f.Devmajor < 0 || f.Devmajor > maxDevMajor || f.Devminor < 0 || f.Devminor > maxDevMinor {
			return nil, fmt.Errorf("device number %d:%d out of range", f.Devmajor, f.Devminor)
		}
		mode := uint32(syscall.S_IFCHR)
		if f.Type == ztoc.TypeBlock {
			mode = syscall.S_IFBLK
		}
		n := t.newNode(mode)
		maj, minor := uint32(f.Devmajor), uint32(f.Devminor)
		n.rdev = minor&0xff | maj<<8 | (minor&^0xff)<<12
		return n, nil
	case ztoc.TypeFifo:
		return t.newNode(syscall.S_IFIFO), nil
	default:
		return nil, fmt.Errorf("unsupported entry type %q", f.Type)
	}
}

// setMeta copies an entry's attributes (not its type) to n.
func setMeta(n *node, f *ztoc.FileMetadata) {
	n.mode = n.mode&syscall.S_IFMT | uint32(f.Mode)&0o7777
	n.uid, n.gid = f.UID, f.GID
	n.mtime, n.mtimeNsec = 0, 0
	if !f.ModTime.IsZero() {
		n.mtime, n.mtimeNsec = f.ModTime.Unix(), uint32(f.ModTime.Nanosecond())
	}
	n.xattrs = n.xattrs[:0]
	for name, v := range f.Xattrs() {
		n.xattrs = append(n.xattrs, xattr{name, v})
	}
	sort.Slice(n.xattrs, func(i, j int) bool { return n.xattrs[i].name < n.xattrs[j].name })
}

// parentDir returns the directory that holds comps' last component,
// synthesizing the missing ones.
func (t *tree) parentDir(comps []string) (*node, error) {
	d := t.root
	for i, c := range comps[:len(comps)-1] {
		child := d.dir.children[c]
		switch {
		case child == nil:
			child = t.newDir()
			t.link(d, c, child)
		case child.whiteout:
			// The layer deletes the lower directory and makes a new one.
			child = t.newDir()
			child.dir.opaque = true
			t.link(d, c, child)
		case !child.isDir():
			return nil, fmt.Errorf("parent %q is not a directory", strings.Join(comps[:i+1], "/"))
		}
		d = child
	}
	return d, nil
}

// lookup finds the node at a tar path.
func (t *tree) lookup(name string) (*node, error) {
	comps, err := splitName(nil, name)
	if err != nil {
		return nil, err
	}
	n := t.root
	for _, c := range comps {
		if !n.isDir() {
			return nil, errors.New("no such file")
		}
		n = n.dir.children[c]
		if n == nil || n.whiteout {
			return nil, errors.New("no such file")
		}
	}
	return n, nil
}

// link names n as parent/name, replacing what had that name.
func (t *tree) link(parent *node, name string, n *node) {
	n.nlink++
	if old := parent.dir.children[name]; old != nil {
		unlink(old)
	} else {
		parent.dir.names = append(parent.dir.names, name)
	}
	parent.dir.children[name] = n
}

// unlink drops one name of n, and of everything below n: hardlinks from
// elsewhere into a replaced directory lose those names.
func unlink(n *node) {
	n.nlink--
	if n.isDir() {
		for _, c := range n.dir.children {
			unlink(c)
		}
	}
}

// finish computes directory link counts and the totals statfs reports.
func (t *tree) finish(d *node) {
	linked := make(map[*node]bool)
	var walk func(d *node)
	walk = func(d *node) {
		t.nodes++
		d.dir.subdirs = 0
		for _, c := range d.dir.children {
			switch {
			case c.isDir():
				d.dir.subdirs++
				walk(c)
			case c.nlink > 1 && linked[c]:
				// another name of a node already counted
			default:
				if c.nlink > 1 {
					linked[c] = true
				}
				t.nodes++
				t.bytes += c.size
			}
		}
	}
	walk(d)
}
