package fusefs

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"sync"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// openTable counts, per node ID, the files the kernel has open and the
// backing file of those it reads by passthrough.
//
// The kernel insists that all open files of an inode use the same mode:
// an open for passthrough fails while the inode is open for normal reads,
// a normal open fails while it is open for passthrough, and passthrough
// opens must all name the backing file the first one named (fs/fuse
// iomode.c). Every open therefore reuses the mode of the files already
// open, and a backing file is registered when the first file of a node
// opens and unregistered when the last closes.
//
// These opens outlive the process serving the mount (a library mapped by
// every process of a container stays open across a takeover), so the table
// lives in a memfd that Handoff passes on and Resume maps again: a
// successor knows which backing id to name. Each slot is 8 bytes: the
// backing id (int32, 0 for none) and the count of open files (uint32).
type openTable struct {
	mu  sync.Mutex
	f   *os.File
	mem []byte
}

const openSlot = 8

func newOpenTable() (*openTable, error) {
	fd, err := unix.MemfdCreate("spanpull-fusefs-opens", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("open table: memfd_create: %w", err)
	}
	return &openTable{f: os.NewFile(uintptr(fd), "spanpull-fusefs-opens")}, nil
}

// loadOpenTable shares the table in f, the memfd of a predecessor.
func loadOpenTable(f *os.File) (*openTable, error) {
	dup, err := dupFile(f)
	if err != nil {
		return nil, fmt.Errorf("open table: %w", err)
	}
	t := &openTable{f: dup}
	if _, err := t.grow(0); err != nil {
		dup.Close()
		return nil, err
	}
	return t, nil
}

// grow maps the table far enough to hold the slot of id, and returns the
// slot.
func (t *openTable) grow(id uint64) ([]byte, error) {
	need := (id + 1) * openSlot
	if need <= uint64(len(t.mem)) {
		return t.mem[id*openSlot : need], nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(t.f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("open table: %w", err)
	}
	size := max(uint64(st.Size), need, 2*uint64(len(t.mem)), 64<<10)
	size = (size + 1<<16 - 1) &^ (1<<16 - 1)
	if size > uint64(st.Size) {
		if err := unix.Ftruncate(int(t.f.Fd()), int64(size)); err != nil {
			return nil, fmt.Errorf("open table: grow to %d bytes: %w", size, err)
		}
	}
	mem, err := unix.Mmap(int(t.f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("open table: map %d bytes: %w", size, err)
	}
	if t.mem != nil {
		unix.Munmap(t.mem)
	}
	t.mem = mem
	return t.mem[id*openSlot : need], nil
}

// get returns the backing id and the open count of node ID id. t.mu must
// be held.
func (t *openTable) get(id uint64) (backing int32, opens uint32, err error) {
	s, err := t.grow(id)
	if err != nil {
		return 0, 0, err
	}
	return int32(binary.LittleEndian.Uint32(s)), binary.LittleEndian.Uint32(s[4:]), nil
}

// set records the backing id and the open count of node ID id, whose slot
// get has mapped. t.mu must be held.
func (t *openTable) set(id uint64, backing int32, opens uint32) {
	s := t.mem[id*openSlot : (id+1)*openSlot]
	binary.LittleEndian.PutUint32(s, uint32(backing))
	binary.LittleEndian.PutUint32(s[4:], opens)
}

func (t *openTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.mem != nil {
		unix.Munmap(t.mem)
		t.mem = nil
	}
	t.f.Close()
}

// openFile opens regular file i, whose node ID is id: for passthrough
// when the node is already open that way, or when it is not open at all
// and Options.Backing has a file for it; for normal reads otherwise.
func (f *fsys) openFile(ctx context.Context, v *view, id uint64, i uint32, out *fuse.OpenOut) fuse.Status {
	t := f.opens
	if t == nil {
		return fuse.OK
	}
	t.mu.Lock()
	backing, opens, err := t.get(id)
	if err == nil && opens > 0 {
		t.set(id, backing, opens+1)
	}
	t.mu.Unlock()
	if err != nil {
		f.log.WithError(err).Error("fusefs: open failed")
		return fuse.EIO
	}
	if opens == 0 {
		backing = f.backing(ctx, v.root, i)
		t.mu.Lock()
		cur, opens, _ := t.get(id)
		if opens > 0 {
			// Another open of the node won the race: use its mode.
			if backing > 0 {
				f.unregister(backing)
			}
			backing = cur
		}
		t.set(id, backing, opens+1)
		t.mu.Unlock()
	}
	if backing > 0 {
		out.OpenFlags, out.BackingID = fuse.FOPEN_PASSTHROUGH|fuse.FOPEN_NOFLUSH, backing
	}
	return fuse.OK
}

// backing registers the backing file of regular file i with the kernel
// and returns its id, or 0 when reads are to come to this process.
func (f *fsys) backing(ctx context.Context, r *Root, i uint32) int32 {
	if r.opts.Backing == nil || f.noPassthrough.Load() {
		return 0
	}
	file, err := r.opts.Backing(ctx, r.entry(i))
	if err != nil {
		r.log.WithField("path", r.tree.path(i)).WithError(err).Warn("fusefs: no backing file; reads go through the daemon")
		return 0
	}
	if file == nil {
		return 0
	}
	defer file.Close()
	// The kernel serves a passthrough file without asking: verify before
	// registering it (a failure is reported by the reads, which come
	// here). Not before asking for the file: an open of a file that has
	// none must not wait on the check's fetch, whose failure the first
	// read then met again and the kernel's retry fetched a third time.
	if err, _ := r.verify(ctx, i); err != nil {
		return 0
	}
	srv := f.srv.Load()
	id, errno := srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(file.Fd())})
	if errno != 0 {
		if f.noPassthrough.CompareAndSwap(false, true) {
			f.log.WithField("path", r.tree.path(i)).WithError(errno).
				Warn("fusefs: FUSE passthrough is unavailable on this mount; reads go through the daemon")
		}
		return 0
	}
	return id
}

func (f *fsys) unregister(backing int32) {
	if errno := f.srv.Load().UnregisterBackingFd(backing); errno != 0 {
		f.log.WithError(errno).WithField("backing_id", backing).Warn("fusefs: unregister backing file")
	}
}

// release records that a file of node ID id was closed.
func (f *fsys) release(id uint64) {
	t := f.opens
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	backing, opens, err := t.get(id)
	if err != nil || opens == 0 {
		return
	}
	if opens--; opens == 0 && backing > 0 {
		f.unregister(backing)
		backing = 0
	}
	t.set(id, backing, opens)
}
