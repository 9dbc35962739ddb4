package fusefs

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"slices"
	"syscall"

	"github.com/spanpull/spanpull/ztoc"
)

// finish lays the built tree out as a Tree: the nodes no name reaches any
// more are dropped (the others keep their order, so indexes stay
// deterministic), each directory's entries become a sorted run of
// Tree.ents, and link counts and totals are computed from what is left.
func (b *builder) finish() (*Tree, error) {
	remap := b.reachable()
	t := &Tree{extras: b.extras}
	t.ents = make([]dirent, 0, len(b.ents))
	for i := range b.nodes {
		if remap[i] != noNode {
			b.nodes[i].nlink, b.nodes[i].ent = 0, noEnt
		}
	}
	for i := range b.nodes {
		if remap[i] == noNode || b.nodes[i].mode&syscall.S_IFMT != syscall.S_IFDIR {
			continue
		}
		start := len(t.ents)
		for e := uint32(b.nodes[i].data); e != 0; e = b.ents[e-1].next {
			if c := b.ents[e-1].node; c != noNode {
				d := b.ents[e-1].dirent
				d.node, d.parent = remap[c], remap[i]
				t.ents = append(t.ents, d)
			}
		}
		run := t.ents[start:]
		slices.SortFunc(run, func(x, y dirent) int {
			return bytes.Compare(b.names[x.name:x.name+x.nlen], b.names[y.name:y.name+y.nlen])
		})
		b.nodes[i].data, b.nodes[i].nchild = int64(start), uint32(len(run))
	}
	b.ents, b.slots = nil, nil
	// Compact the nodes; remap[i] <= i, so this moves them down.
	for i := range b.nodes {
		if j := remap[i]; j != noNode {
			b.nodes[j] = b.nodes[i]
		}
	}
	t.nodes = slices.Clip(b.nodes[:countReachable(remap)])
	b.nodes = nil
	for k := range t.ents {
		e := &t.ents[k]
		n := &t.nodes[e.node]
		n.nlink++
		if n.ent == noEnt {
			n.ent = uint32(k)
		}
		if n.mode&syscall.S_IFMT == syscall.S_IFDIR {
			t.nodes[e.parent].nlink++ // its ".." entry
		}
	}
	for i := range t.nodes {
		n := &t.nodes[i]
		if n.mode&syscall.S_IFMT == syscall.S_IFDIR {
			n.nlink += 1 // "." (the name in the parent was counted above)
			if i == 0 {
				n.nlink++ // the root's name is outside the layer
			}
		} else {
			t.bytes += n.size
		}
	}
	t.strs = string(b.names)
	b.names = nil
	t.sum = t.fingerprint()
	return t, nil
}

// reachable returns, for each built node, its index in the Tree, or noNode
// when no name reaches it.
func (b *builder) reachable() []uint32 {
	const seen = 0
	remap := make([]uint32, len(b.nodes))
	for i := range remap {
		remap[i] = noNode
	}
	remap[0] = seen
	stack := []uint32{0}
	for len(stack) > 0 {
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		for e := uint32(b.nodes[d].data); e != 0; e = b.ents[e-1].next {
			c := b.ents[e-1].node
			if c == noNode || remap[c] == seen {
				continue
			}
			remap[c] = seen
			if b.nodes[c].mode&syscall.S_IFMT == syscall.S_IFDIR {
				stack = append(stack, c)
			}
		}
	}
	next := uint32(0)
	for i := range remap {
		if remap[i] == seen {
			remap[i] = next
			next++
		}
	}
	return remap
}

func countReachable(remap []uint32) int {
	n := 0
	for _, j := range remap {
		if j != noNode {
			n++
		}
	}
	return n
}

// fingerprint returns a digest of everything a node ID stands for in the
// tree, so that a process taking over a mount can tell whether its tree
// is the one the kernel learned the node IDs from.
func (t *Tree) fingerprint() [32]byte {
	h := sha256.New()
	buf := make([]byte, 0, 64<<10)
	flush := func() {
		h.Write(buf)
		buf = buf[:0]
	}
	le := binary.LittleEndian
	buf = append(buf, "spanpull fusefs tree v1\x00"...)
	for i := range t.nodes {
		n := &t.nodes[i]
		buf = le.AppendUint64(buf, uint64(n.mtime))
		buf = le.AppendUint64(buf, uint64(n.size))
		buf = le.AppendUint64(buf, uint64(n.data))
		for _, v := range []uint32{n.mode, n.uid, n.gid, n.nlink, n.nsec, n.nchild, n.ent, n.toc} {
			buf = le.AppendUint32(buf, v)
		}
		for _, x := range t.xattrs(uint32(i)) {
			buf = append(append(append(buf, x.name...), 0), x.value...)
			buf = le.AppendUint32(buf, uint32(len(x.value)))
		}
		if sp := t.sparse(uint32(i)); sp != nil {
			buf = append(buf, sp.PAXRecords[ztoc.SparseMapRecord]...)
		}
		if len(buf) > cap(buf)-4096 {
			flush()
		}
	}
	for _, e := range t.ents {
		buf = le.AppendUint32(le.AppendUint32(le.AppendUint32(le.AppendUint32(buf, e.name), e.nlen), e.node), e.parent)
		if len(buf) > cap(buf)-64 {
			flush()
		}
	}
	flush()
	h.Write([]byte(t.strs))
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
