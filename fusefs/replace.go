package fusefs

import (
	"context"
	"fmt"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// Replace serves root instead of what the server serves now, without
// unmounting: the repair of a layer whose index turned out to be forged
// swaps in the tree built from the layer itself.
//
// Node IDs the kernel already holds keep working: each stands for the
// node of the new tree at the same path (with the same file type), and for
// nothing (ESTALE) when the new tree has no such node. The kernel is told
// to forget every name and attribute and every cached page it has of the
// old tree, so what it shows afterwards comes from the new one; files that
// the kernel reads by passthrough keep reading the backing file they were
// opened with until they are closed. Requests in flight finish with the
// root they started with.
//
// The new tree's IDs follow all IDs given out before, so the handoff state
// changes: call Handoff again for a successor.
func (s *Server) Replace(ctx context.Context, root *Root) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("replace layer at %s: %w", s.dir, err)
	}
	if !root.mounted.CompareAndSwap(false, true) {
		return fmt.Errorf("replace layer at %s: root is already mounted", s.dir)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.stopped:
		root.mounted.Store(false)
		return fmt.Errorf("replace layer at %s: the server has stopped", s.dir)
	default:
	}
	old := s.fs.view.Load()
	to := translate(old.root.tree, root.tree, nil)
	nv := &view{root: root, base: old.next(), gens: make([]generation, 0, len(old.gens)+1)}
	for _, g := range old.gens {
		ng := generation{base: g.base, to: make([]uint32, len(g.to))}
		for k, i := range g.to {
			if i != 0 {
				ng.to[k] = to[i]
			}
		}
		nv.gens = append(nv.gens, ng)
	}
	nv.gens = append(nv.gens, generation{base: old.base, to: to})
	s.fs.view.Store(nv)
	s.invalidate(old, root.tree)
	return nil
}

// invalidate tells the kernel to forget what it cached of view old, now
// that tree is served: the attributes and pages of every node ID it may
// hold, and the names (and absences of names) that differ or may differ.
func (s *Server) invalidate(old *view, tree *Tree) {
	failed := 0
	note := func(st fuse.Status) {
		if !st.Ok() && st != fuse.ENOENT {
			failed++
		}
	}
	note(s.srv.InodeNotify(fuse.FUSE_ROOT_ID, 0, 0))
	for i := 1; i < old.root.tree.Len(); i++ {
		note(s.srv.InodeNotify(old.id(uint32(i)), 0, 0))
	}
	for _, g := range old.gens {
		for k, i := range g.to {
			if i != 0 {
				note(s.srv.InodeNotify(g.base+uint64(k), 0, 0))
			}
		}
	}
	translate(old.root.tree, tree, func(dir uint32, name string) {
		note(s.srv.EntryNotify(old.id(dir), name))
	})
	if failed > 0 {
		s.fs.log.WithField("failed", failed).Warn("fusefs: the kernel refused to forget some of the replaced tree; it may show stale data until its caches expire")
	}
}

// translate maps the nodes of tree a to those of tree b by path: to[i] is
// the node of b at the path of a's node i (its first name, for
// hardlinks), or 0 when b has no node of the same file type there. If
// stale is not nil, it is called with every name of a, and every name b
// adds to a directory a has: the kernel may have cached the name or its
// absence.
func translate(a, b *Tree, stale func(dir uint32, name string)) []uint32 {
	to := make([]uint32, a.Len())
	type pair struct{ a, b uint32 }
	stack := []pair{{0, 0}}
	for len(stack) > 0 {
		p := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		ea, eb := a.children(p.a), b.children(p.b)
		for len(ea) > 0 || len(eb) > 0 {
			var na, nb string
			if len(ea) > 0 {
				na = a.name(&ea[0])
			}
			if len(eb) > 0 {
				nb = b.name(&eb[0])
			}
			switch {
			case len(eb) == 0 || len(ea) > 0 && na < nb:
				ea = ea[1:]
			case len(ea) == 0 || nb < na:
				eb = eb[1:]
				na = nb
			default:
				ca, cb := ea[0].node, eb[0].node
				if to[ca] == 0 && a.typ(ca) == b.typ(cb) {
					to[ca] = cb
					if a.typ(ca) == syscall.S_IFDIR {
						stack = append(stack, pair{ca, cb})
					}
				}
				ea, eb = ea[1:], eb[1:]
			}
			if stale != nil {
				stale(p.a, na)
			}
		}
	}
	return to
}
