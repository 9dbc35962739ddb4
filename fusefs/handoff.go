package fusefs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Handoff is what another process needs to serve a live mount: Resume
// takes it. Package fdstore keeps one while no process serves the mount.
type Handoff struct {
	// FUSE is a duplicate of the mount's /dev/fuse descriptor: the
	// connection itself.
	FUSE *os.File
	// Opens is the table of the files the kernel has open (a memfd, see
	// openTable), or nil when the mount has none.
	Opens *os.File
	// State is the rest, opaque to the holder: the kernel's INIT request,
	// the mountpoint, the identity of the tree and the node ID ranges.
	// It changes when the tree is replaced (Server.Replace): take a new
	// Handoff then.
	State []byte
}

// Files returns the descriptors of h, FUSE first, in the order
// HandoffFromFiles expects them.
func (h *Handoff) Files() []*os.File {
	if h.Opens == nil {
		return []*os.File{h.FUSE}
	}
	return []*os.File{h.FUSE, h.Opens}
}

// HandoffFromFiles rebuilds a Handoff from the descriptors Files returned
// and its State.
func HandoffFromFiles(files []*os.File, state []byte) (*Handoff, error) {
	switch len(files) {
	case 1:
		return &Handoff{FUSE: files[0], State: state}, nil
	case 2:
		return &Handoff{FUSE: files[0], Opens: files[1], State: state}, nil
	}
	return nil, fmt.Errorf("fusefs: a handoff has 1 or 2 descriptors, not %d", len(files))
}

// Close closes the descriptors of h.
func (h *Handoff) Close() error {
	err := h.FUSE.Close()
	if h.Opens != nil {
		err = errors.Join(err, h.Opens.Close())
	}
	return err
}

// ErrTreeMismatch is returned by Resume when the tree it is given is not
// the one the mount was served with: the node IDs the kernel holds would
// name other files.
var ErrTreeMismatch = errors.New("fusefs: the tree differs from the one the mount was served with")

// Handoff returns what another process needs to serve the mount (see
// Resume). The caller owns the descriptors it returns.
func (s *Server) Handoff() (*Handoff, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.devMu.Lock()
	defer s.devMu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("handoff of %s: the server has stopped", s.dir)
	}
	dev, err := dupFile(s.dev)
	if err != nil {
		return nil, fmt.Errorf("handoff of %s: %w", s.dir, err)
	}
	h := &Handoff{FUSE: dev}
	if t := s.fs.opens; t != nil {
		if h.Opens, err = dupFile(t.f); err != nil {
			dev.Close()
			return nil, fmt.Errorf("handoff of %s: %w", s.dir, err)
		}
	}
	v := s.fs.view.Load()
	h.State = handoffState{dir: s.dir, init: s.init, maxWrite: s.maxWrite, sum: v.root.tree.sum, base: v.base,
		gens: v.gens}.encode()
	return h, nil
}

// Resume serves a live mount on dir that another process served, from what
// that process's Handoff returned, with root, which must hold the tree the
// mount was served with (else ErrTreeMismatch; Resume, then Replace, to
// serve another). The other process must have stopped serving: it died,
// or is about to exit without reading the connection again. Requests that
// it read but did not answer are sent again by the kernel and answered
// here, so a program reading the mount sees no error. Resume does not
// close h's descriptors.
//
// go-fuse insists on answering an INIT request before it serves, and the
// kernel sends INIT once per connection: so go-fuse is first given one
// end of a socket pair into which the kernel's recorded INIT was written,
// answers it there, and then the connection is put in place of that end
// (dup3) before the first real request is read.
func Resume(ctx context.Context, dir string, h *Handoff, root *Root, opts MountOptions) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("resume layer at %s: %w", dir, err)
	}
	st, err := decodeState(h.State)
	if err != nil {
		return nil, fmt.Errorf("resume layer at %s: %w", dir, err)
	}
	if st.dir != dir {
		return nil, fmt.Errorf("resume layer at %s: the connection is mounted on %s", dir, st.dir)
	}
	if st.sum != root.tree.sum {
		return nil, fmt.Errorf("resume layer at %s: %w", dir, ErrTreeMismatch)
	}
	if !root.mounted.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("resume layer at %s: root is already mounted", dir)
	}
	s, err := resume(st, h, root, opts)
	if err != nil {
		root.mounted.Store(false)
		return nil, fmt.Errorf("resume layer at %s: %w", dir, err)
	}
	return s, nil
}

func resume(st handoffState, h *Handoff, root *Root, opts MountOptions) (_ *Server, err error) {
	dev, err := dupFile(h.FUSE)
	if err != nil {
		return nil, err
	}
	fs := newFS(&view{root: root, base: st.base, gens: st.gens}, opts)
	defer func() {
		if err != nil {
			dev.Close()
			fs.closeOpens()
		}
	}()
	if h.Opens != nil {
		if fs.opens, err = loadOpenTable(h.Opens); err != nil {
			return nil, err
		}
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	defer unix.Close(pair[0])
	in := st.init
	in.InHeader = fuse.InHeader{Length: uint32(unsafe.Sizeof(in)), Opcode: opInit, Unique: 2}
	if _, err := unix.Write(pair[0], initBytes(&in)); err != nil {
		unix.Close(pair[1])
		return nil, fmt.Errorf("replay INIT: %w", err)
	}
	// go-fuse owns pair[1] from here, and answers INIT into it.
	srv, err := fuse.NewServer(fs, "/dev/fd/"+strconv.Itoa(pair[1]), fuseOptions(root.log, opts, st.maxWrite))
	if err != nil {
		return nil, fmt.Errorf("replay INIT: %w", err)
	}
	reply := make([]byte, 4096)
	if _, _, err := unix.Recvfrom(pair[0], reply, unix.MSG_DONTWAIT); err != nil {
		root.log.WithError(err).Warn("fusefs: no answer to the replayed INIT")
	}
	if err := unix.Dup3(int(dev.Fd()), pair[1], unix.O_CLOEXEC); err != nil {
		// go-fuse would serve the socket: make it see the end.
		unix.Shutdown(pair[0], unix.SHUT_RDWR)
		return nil, fmt.Errorf("dup3: %w", err)
	}
	// Ask the kernel to send again the requests the previous server read
	// but did not answer (FUSE_NOTIFY_RESEND, Linux 6.9+).
	var resend [16]byte
	binary.LittleEndian.PutUint32(resend[0:], 16)
	binary.LittleEndian.PutUint32(resend[4:], notifyResend)
	if _, err := unix.Write(pair[1], resend[:]); err != nil {
		root.log.WithError(err).Warn("fusefs: the kernel cannot resend the requests of the previous server; reads in flight may hang")
	}
	return start(st.dir, fs, srv, dev, st.maxWrite), nil
}

// FUSE protocol constants go-fuse does not export.
const (
	opInit       = 26
	notifyResend = 7
)

// handoffState is Handoff.State, decoded.
type handoffState struct {
	dir      string
	init     fuse.InitIn
	maxWrite uint32
	sum      [32]byte
	base     uint64
	gens     []generation
}

// stateVersion starts every encoded state. A version of this package
// must decode the states of the versions before it: the process that
// reads a state may be newer than the one that wrote it.
const stateVersion = 1

// encode lays the state out as: version byte; INIT request (length, bytes);
// max write; tree digest; ID base; mountpoint (length, bytes); generations
// (count, then base, length and node indexes of each). Integers are
// little-endian, lengths and counts 32-bit.
func (st handoffState) encode() []byte {
	le := binary.LittleEndian
	init := initBytes(&st.init)
	b := []byte{stateVersion}
	b = append(le.AppendUint32(b, uint32(len(init))), init...)
	b = le.AppendUint32(b, st.maxWrite)
	b = append(b, st.sum[:]...)
	b = le.AppendUint64(b, st.base)
	b = append(le.AppendUint32(b, uint32(len(st.dir))), st.dir...)
	b = le.AppendUint32(b, uint32(len(st.gens)))
	for _, g := range st.gens {
		b = le.AppendUint32(le.AppendUint64(b, g.base), uint32(len(g.to)))
		for _, i := range g.to {
			b = le.AppendUint32(b, i)
		}
	}
	return b
}

func decodeState(b []byte) (handoffState, error) {
	var st handoffState
	d := stateDecoder{b: b}
	if v := d.bytes(1); len(v) == 1 && v[0] != stateVersion {
		return st, fmt.Errorf("handoff state version %d is unknown (want %d)", v[0], stateVersion)
	}
	copy(initBytes(&st.init), d.bytes(int(d.u32())))
	st.maxWrite = d.u32()
	copy(st.sum[:], d.bytes(len(st.sum)))
	st.base = d.u64()
	st.dir = string(d.bytes(int(d.u32())))
	if n := d.u32(); uint64(n)*12 <= uint64(len(d.b)) {
		st.gens = make([]generation, n)
	} else {
		d.err = true
	}
	for k := range st.gens {
		g := &st.gens[k]
		g.base = d.u64()
		n := d.u32()
		if uint64(n)*4 > uint64(len(d.b)) {
			d.err = true
			break
		}
		g.to = make([]uint32, n)
		for i := range g.to {
			g.to[i] = d.u32()
		}
	}
	if d.err || len(d.b) != 0 || st.maxWrite == 0 || st.base == 0 {
		return handoffState{}, errors.New("handoff state is malformed")
	}
	return st, nil
}

// stateDecoder reads a state; err is set, and zeros returned, once the
// bytes run out.
type stateDecoder struct {
	b   []byte
	err bool
}

func (d *stateDecoder) bytes(n int) []byte {
	if n < 0 || n > len(d.b) {
		d.err, d.b = true, nil
		return make([]byte, 8) // enough for u32 and u64; copy takes what fits
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *stateDecoder) u32() uint32 { return binary.LittleEndian.Uint32(d.bytes(4)) }
func (d *stateDecoder) u64() uint64 { return binary.LittleEndian.Uint64(d.bytes(8)) }
