package fusefs

import (
	"errors"
	"fmt"
	"hash/maphash"
	"maps"
	"math"
	"path"
	"sort"
	"strings"
	"syscall"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

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

// Limits of the Linux device number encoding FUSE uses (new_encode_dev),
// of a name, and of the symlinks followed to resolve one path (containerd's
// fs.RootPath gives up after 255).
const (
	maxDevMajor = 1<<12 - 1
	maxDevMinor = 1<<20 - 1
	maxNameLen  = 255
	maxLinks    = 255
)

// noNode marks a directory entry whose name was removed.
const noNode = ^uint32(0)

// Entries yields the TOC entries of a layer, in archive order, to fn and
// stops at the first error fn returns, returning it. ztoc.DecodeFiles
// bound to a zTOC's bytes is one (the TOC then never exists as a slice);
// Files makes one of a slice.
type Entries func(fn func(*ztoc.FileMetadata) error) error

// Files returns the Entries of a TOC held in memory.
func Files(files []ztoc.FileMetadata) Entries {
	return func(fn func(*ztoc.FileMetadata) error) error {
		for i := range files {
			if err := fn(&files[i]); err != nil {
				return err
			}
		}
		return nil
	}
}

// NewTree builds the tree of a layer from its TOC entries. It keeps
// nothing of the entries but what the tree needs (about 100 bytes per
// entry besides the names; see the package documentation).
//
// The entries are applied as containerd's archive.Apply applies a layer's
// tar to an empty directory with overlayfs whiteouts, so that a lazily
// served layer shows what containerd would have unpacked:
//   - names are cleaned; absolute names and ".." stay inside the layer
//     (they are resolved as if the layer root were "/");
//   - symlinks met on the way to an entry's parent directory are followed,
//     inside the layer, as are those on the way to a hardlink's target;
//   - an entry that resolves to the layer root is skipped (a directory
//     entry there sets the root's attributes, as tar does);
//   - a later entry replaces an earlier one of the same name, and a
//     directory over a directory merges with it (attributes of the later
//     one, xattrs of both);
//   - missing parent directories are made, mode 0755, owned by root.
//
// Skipped entries are logged with the reason. Entries containerd refuses
// (a parent that is not a directory, a hardlink to nothing or to a
// directory, invalid whiteout names, unknown types, names the kernel
// cannot represent) make NewTree fail with an error naming the entry.
//
// OCI whiteouts become what overlayfs reads (a 0/0 character device, and
// trusted.overlay.opaque on opaque directories), and these rules, which
// differ from containerd where containerd fails, are kept from earlier
// versions: a whiteout of a name the layer itself holds keeps the layer's
// file (and makes a directory opaque), an entry under a whited-out name
// makes an opaque directory of it, AUFS metadata (.wh..wh.*) is skipped,
// and a hardlink cannot point at a whiteout.
//
// A nil logger discards the log lines.
func NewTree(entries Entries, logger *log.Entry) (*Tree, error) {
	if logger == nil {
		l := logrus.New()
		l.SetOutput(discard{})
		logger = logrus.NewEntry(l)
	}
	b := &builder{seed: maphash.MakeSeed(), log: logger, slots: make([]uint32, 1024)}
	b.nodes = append(b.nodes, node{mode: syscall.S_IFDIR | 0o755, nlink: 1, ent: noEnt, toc: noEntry})
	err := entries(func(f *ztoc.FileMetadata) error {
		if err := b.add(f); err != nil {
			return fmt.Errorf("tar entry %d %q: %w", b.toc, f.Name, err)
		}
		b.toc++
		return nil
	})
	if err != nil {
		return nil, err
	}
	return b.finish()
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// builder turns TOC entries into a Tree. Directory entries live in a
// hash table keyed by (parent, name) while the tree is built; each
// directory's entries are also chained (bent.next from node.data), so
// that finish can lay them out sorted.
type builder struct {
	nodes  []node
	extras []extra
	names  []byte
	ents   []bent
	// slots is an open-addressing hash table of 1 + indexes in ents.
	slots []uint32
	seed  maphash.Seed
	log   *log.Entry
	// toc is the index of the entry being added.
	toc uint32
}

// bent is a directory entry under construction.
type bent struct {
	dirent
	next uint32 // 1 + index of the next entry of the directory, or 0
}

func (b *builder) name(e *bent) string { return string(b.names[e.name : e.name+e.nlen]) }

// add applies TOC entry f to the tree.
func (b *builder) add(f *ztoc.FileMetadata) error {
	name := path.Clean(f.Name)
	dir, base := "", name
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		dir, base = name[:i+1], name[i+1:]
	}
	if base == "" || base == "." || base == ".." {
		return b.addRoot(f)
	}
	if isAUFSMetadata(name) {
		b.skip(f, "AUFS metadata")
		return nil
	}
	parent, _, err := b.walk(dir, true)
	if err != nil {
		return err
	}
	if base == whiteoutOpaque {
		b.nodes[parent].mode |= flagOpaque
		return nil
	}
	if orig, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
		return b.addWhiteout(parent, orig, f)
	}
	switch f.Type {
	case ztoc.TypeDir:
		return b.addDir(parent, base, f)
	case ztoc.TypeHardlink:
		return b.addHardlink(parent, base, f)
	}
	n, err := b.newEntryNode(f)
	if err != nil {
		return err
	}
	b.setMeta(n, f, false)
	return b.link(parent, base, n)
}

func (b *builder) skip(f *ztoc.FileMetadata, why string) {
	b.log.WithFields(log.Fields{"entry": b.toc, "name": f.Name, "reason": why}).Info("fusefs: tar entry skipped")
}

// isAUFSMetadata reports whether a cleaned name is or is below AUFS
// metadata (.wh..wh.*), the opaque marker aside.
func isAUFSMetadata(name string) bool {
	for rest := name; rest != ""; {
		var c string
		c, rest, _ = strings.Cut(rest, "/")
		if strings.HasPrefix(c, whiteoutMetaPrefix) && !(c == whiteoutOpaque && rest == "") {
			return true
		}
	}
	return false
}

// addRoot applies an entry that resolves to the layer root.
func (b *builder) addRoot(f *ztoc.FileMetadata) error {
	if f.Type != ztoc.TypeDir {
		b.skip(f, "resolves to the layer root")
		return nil
	}
	b.setMeta(0, f, true)
	return nil
}

// addWhiteout applies whiteout entry f, which hides parent/name of the
// lower layers.
func (b *builder) addWhiteout(parent uint32, name string, f *ztoc.FileMetadata) error {
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("whiteout of %q", name)
	}
	// A whiteout hides lower layers only: what this layer already holds
	// under the name stays, and a directory stops showing the lower ones.
	if old, ok := b.lookup(parent, name); ok && b.nodes[old].mode&flagWhiteout == 0 {
		if b.nodes[old].mode&syscall.S_IFMT == syscall.S_IFDIR {
			b.nodes[old].mode |= flagOpaque
		}
		return nil
	}
	n := b.newNode(syscall.S_IFCHR)
	b.setMeta(n, f, false)
	b.nodes[n].mode = syscall.S_IFCHR | flagWhiteout // overlayfs whiteout: c 0 0, mode 0
	b.nodes[n].extra = 0
	return b.link(parent, name, n)
}

// addDir applies directory entry f as parent/name.
func (b *builder) addDir(parent uint32, name string, f *ztoc.FileMetadata) error {
	old, ok := b.lookup(parent, name)
	if ok && b.nodes[old].mode&syscall.S_IFMT == syscall.S_IFDIR {
		b.setMeta(old, f, true)
		return nil
	}
	n := b.newNode(syscall.S_IFDIR)
	if ok && b.nodes[old].mode&flagWhiteout != 0 {
		b.nodes[n].mode |= flagOpaque
	}
	b.setMeta(n, f, false)
	return b.link(parent, name, n)
}

// addHardlink names the node of hardlink f's target parent/name too.
func (b *builder) addHardlink(parent uint32, name string, f *ztoc.FileMetadata) error {
	// containerd removes what the name holds before it looks for the
	// target.
	b.remove(parent, name)
	target, err := b.linkTarget(f.Linkname)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", f.Linkname, err)
	}
	return b.link(parent, name, target)
}

// linkTarget finds the node a hardlink names, as containerd's
// hardlinkRootPath does: symlinks in its directory are followed, the last
// component is not.
func (b *builder) linkTarget(linkname string) (uint32, error) {
	dir, base := path.Split(linkname)
	d, ok, err := b.walk(dir, false)
	if err != nil {
		return 0, err
	}
	n := d
	switch {
	case !ok:
	case base == "" || base == ".":
	case base == "..":
		n = b.parent(d)
	default:
		n, ok = b.lookup(d, base)
	}
	if !ok || b.nodes[n].mode&flagWhiteout != 0 {
		return 0, errors.New("no such file")
	}
	if b.nodes[n].mode&syscall.S_IFMT == syscall.S_IFDIR {
		return 0, errors.New("target is a directory")
	}
	return n, nil
}

// newEntryNode returns the node of entry f, a regular file, symlink,
// device or FIFO, without its metadata.
func (b *builder) newEntryNode(f *ztoc.FileMetadata) (uint32, error) {
	switch f.Type {
	case ztoc.TypeReg:
		if f.UncompressedOffset < 0 || f.UncompressedSize < 0 || f.UncompressedOffset > math.MaxInt64-f.UncompressedSize {
			return 0, fmt.Errorf("bad data range: offset %d, size %d", f.UncompressedOffset, f.UncompressedSize)
		}
		n := b.newNode(syscall.S_IFREG)
		b.nodes[n].data = f.UncompressedOffset
		b.nodes[n].size = f.UncompressedSize
		if m, ok := f.PAXRecords[ztoc.SparseMapRecord]; ok {
			sparse := &ztoc.FileMetadata{Name: f.Name, Type: f.Type, UncompressedOffset: f.UncompressedOffset,
				UncompressedSize: f.UncompressedSize, PAXRecords: map[string]string{ztoc.SparseMapRecord: m}}
			if _, err := sparse.Fragments(); err != nil {
				return 0, err
			}
			b.extra(n).sparse = sparse
		}
		return n, nil
	case ztoc.TypeSymlink:
		if f.Linkname == "" {
			return 0, errors.New("symlink has no target")
		}
		off, err := b.intern(f.Linkname)
		if err != nil {
			return 0, err
		}
		n := b.newNode(syscall.S_IFLNK)
		b.nodes[n].data, b.nodes[n].size = int64(off), int64(len(f.Linkname))
		return n, nil
	case ztoc.TypeChar, ztoc.TypeBlock:
		if f.Devmajor < 0 || f.Devmajor > maxDevMajor || f.Devminor < 0 || f.Devminor > maxDevMinor {
			return 0, fmt.Errorf("device number %d:%d out of range", f.Devmajor, f.Devminor)
		}
		mode := uint32(syscall.S_IFCHR)
		if f.Type == ztoc.TypeBlock {
			mode = syscall.S_IFBLK
		}
		n := b.newNode(mode)
		maj, minor := uint32(f.Devmajor), uint32(f.Devminor)
		b.nodes[n].data = int64(minor&0xff | maj<<8 | (minor&^0xff)<<12)
		return n, nil
	case ztoc.TypeFifo:
		return b.newNode(syscall.S_IFIFO), nil
	default:
		return 0, fmt.Errorf("unsupported entry type %q", f.Type)
	}
}

func (b *builder) newNode(mode uint32) uint32 {
	b.nodes = append(b.nodes, node{mode: mode, ent: noEnt, toc: b.toc})
	return uint32(len(b.nodes) - 1)
}

// newParentDir returns a directory made for the path of another entry:
// 0755, root-owned, time 0.
func (b *builder) newParentDir() uint32 {
	n := b.newNode(syscall.S_IFDIR | 0o755)
	b.nodes[n].toc = noEntry
	return n
}

func (b *builder) extra(n uint32) *extra {
	if b.nodes[n].extra == 0 {
		b.extras = append(b.extras, extra{})
		b.nodes[n].extra = uint32(len(b.extras))
	}
	return &b.extras[b.nodes[n].extra-1]
}

// setMeta copies an entry's attributes (not its type) to n. With merge,
// the xattrs n has keep those the entry does not set.
func (b *builder) setMeta(n uint32, f *ztoc.FileMetadata, merge bool) {
	nd := &b.nodes[n]
	nd.mode = nd.mode&^0o7777 | uint32(f.Mode)&0o7777
	nd.uid, nd.gid = f.UID, f.GID
	nd.mtime, nd.nsec = 0, 0
	if !f.ModTime.IsZero() {
		nd.mtime, nd.nsec = f.ModTime.Unix(), uint32(f.ModTime.Nanosecond())
	}
	nd.toc = b.toc
	xs := f.Xattrs()
	if nd.extra == 0 && len(xs) == 0 {
		return
	}
	x := b.extra(n)
	if merge {
		for _, old := range x.xattrs {
			if _, ok := xs[old.name]; !ok {
				if xs == nil {
					xs = make(map[string]string)
				}
				xs[old.name] = old.value
			}
		}
	}
	x.xattrs = x.xattrs[:0]
	for _, name := range sortedKeys(xs) {
		x.xattrs = append(x.xattrs, xattr{name, xs[name]})
	}
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range maps.Keys(m) {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// walk resolves p, a slash-separated path in the layer, the way
// containerd's fs.RootPath resolves a path under the directory it unpacks
// a layer to: the symlinks met on the way are followed (their absolute
// targets and ".." components stay inside the layer) and components that
// do not exist are taken as they are.
//
// With create, walk makes the directories missing from the result (as
// archive.Apply's mkparent does) and returns the directory p names; an
// existing non-directory on the way is an error. Without create, it
// returns the node p names, and false when there is none.
func (b *builder) walk(p string, create bool) (uint32, bool, error) {
	cur, links, missing := uint32(0), 0, 0
	for rest := p; ; {
		var c string
		c, rest = nextComponent(rest)
		isDir := b.nodes[cur].mode&syscall.S_IFMT == syscall.S_IFDIR
		switch {
		case c == "" && create && !isDir:
			return 0, false, fmt.Errorf("parent %q is not a directory", b.dirPath(cur))
		case c == "":
			return cur, missing == 0, nil
		case missing > 0:
			if c == ".." {
				missing--
			} else {
				missing++
			}
			continue
		case c == "..":
			cur = b.parent(cur)
			continue
		}
		if !isDir {
			if create {
				return 0, false, fmt.Errorf("parent %q is not a directory", b.dirPath(cur))
			}
			return 0, false, nil
		}
		child, ok := b.lookup(cur, c)
		switch {
		case ok && b.nodes[child].mode&syscall.S_IFMT == syscall.S_IFLNK:
			if links++; links > maxLinks {
				return 0, false, errors.New("too many levels of symbolic links")
			}
			target := b.symlinkTarget(child)
			if !strings.HasPrefix(target, "/") {
				target = b.dirPath(cur) + "/" + target
			}
			cur, rest = 0, path.Clean("/"+target+"/"+rest)
		case !create && (!ok || b.nodes[child].mode&flagWhiteout != 0):
			missing++
		case !ok || b.nodes[child].mode&flagWhiteout != 0:
			// A whited-out name: the layer deletes the lower
			// directory and makes a new one.
			d := b.newParentDir()
			if ok {
				b.nodes[d].mode |= flagOpaque
			}
			if err := b.link(cur, c, d); err != nil {
				return 0, false, err
			}
			cur = d
		default:
			cur = child
		}
	}
}

// nextComponent returns the first component of p other than "." and the
// rest of p after it; c is "" when there is none.
func nextComponent(p string) (c, rest string) {
	for p != "" {
		c, p, _ = strings.Cut(p, "/")
		if c != "" && c != "." {
			return c, p
		}
	}
	return "", ""
}

// parent returns the directory holding directory n (the root for the
// root).
func (b *builder) parent(n uint32) uint32 {
	if n == 0 || b.nodes[n].ent == noEnt {
		return 0
	}
	return b.ents[b.nodes[n].ent].parent
}

// dirPath returns the path of directory n, "" for the root.
func (b *builder) dirPath(n uint32) string {
	var names []string
	for ; n != 0; n = b.parent(n) {
		names = append(names, b.name(&b.ents[b.nodes[n].ent]))
	}
	var s strings.Builder
	for i := len(names) - 1; i >= 0; i-- {
		s.WriteString(names[i])
		if i > 0 {
			s.WriteByte('/')
		}
	}
	return s.String()
}

func (b *builder) symlinkTarget(n uint32) string {
	nd := &b.nodes[n]
	return string(b.names[nd.data : nd.data+nd.size])
}

// lookup returns the node named name in directory dir.
func (b *builder) lookup(dir uint32, name string) (uint32, bool) {
	e, ok := b.find(dir, name)
	if !ok || b.ents[e].node == noNode {
		return 0, false
	}
	return b.ents[e].node, true
}

// link names node n dir/name, replacing what had that name.
func (b *builder) link(dir uint32, name string, n uint32) error {
	e, ok := b.find(dir, name)
	if !ok {
		if err := checkName(name); err != nil {
			return err
		}
		off, err := b.intern(name)
		if err != nil {
			return err
		}
		b.ents = append(b.ents, bent{
			dirent: dirent{name: off, nlen: uint32(len(name)), node: n, parent: dir},
			next:   uint32(b.nodes[dir].data),
		})
		e = uint32(len(b.ents) - 1)
		b.nodes[dir].data = int64(e) + 1
		b.insert(e)
	}
	b.ents[e].node = n
	if b.nodes[n].ent == noEnt {
		b.nodes[n].ent = e
	}
	return nil
}

// remove drops dir/name, if it exists. (finish counts the links that are
// left, and drops the nodes no name reaches.)
func (b *builder) remove(dir uint32, name string) {
	if e, ok := b.find(dir, name); ok {
		b.ents[e].node = noNode
	}
}

// checkName refuses names the kernel cannot represent.
func checkName(name string) error {
	if len(name) > maxNameLen {
		return fmt.Errorf("name %.20q... is longer than %d bytes", name, maxNameLen)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return errors.New("name contains NUL")
	}
	return nil
}

// intern appends s to the string table and returns its offset.
func (b *builder) intern(s string) (uint32, error) {
	if len(b.names)+len(s) > math.MaxUint32 {
		return 0, errors.New("names of the layer exceed 4 GiB")
	}
	off := uint32(len(b.names))
	b.names = append(b.names, s...)
	return off, nil
}

func (b *builder) hash(dir uint32, name string) uint64 {
	return maphash.String(b.seed, name) ^ uint64(dir)*0x9E3779B97F4A7C15
}

// find returns the index in ents of dir/name.
func (b *builder) find(dir uint32, name string) (uint32, bool) {
	mask := uint64(len(b.slots) - 1)
	for i := b.hash(dir, name) & mask; ; i = (i + 1) & mask {
		s := b.slots[i]
		if s == 0 {
			return 0, false
		}
		if e := &b.ents[s-1]; e.parent == dir && string(b.names[e.name:e.name+e.nlen]) == name {
			return s - 1, true
		}
	}
}

// insert adds ents[e] to the hash table, which it keeps at most half full.
func (b *builder) insert(e uint32) {
	if 2*len(b.ents) > len(b.slots) {
		b.slots = make([]uint32, 2*len(b.slots))
		for k := range b.ents[:e] {
			b.put(uint32(k))
		}
	}
	b.put(e)
}

func (b *builder) put(e uint32) {
	mask := uint64(len(b.slots) - 1)
	be := &b.ents[e]
	h := maphash.Bytes(b.seed, b.names[be.name:be.name+be.nlen]) ^ uint64(be.parent)*0x9E3779B97F4A7C15
	i := h & mask
	for b.slots[i] != 0 {
		i = (i + 1) & mask
	}
	b.slots[i] = e + 1
}
