package fusefs

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// DefaultTimeout is how long the kernel may cache entries, attributes and
// failed lookups by default: a layer never changes while it is mounted
// (Server.Replace tells the kernel to forget what it cached).
const DefaultTimeout = time.Hour

// maxWrite is the largest request the kernel sends (reads included):
// go-fuse's default, which sizes its request buffers. A successor reads
// the value the mount was made with from the handoff state.
const maxWrite = 128 << 10

// fsType is the type of the mounts in /proc/mounts: fuse.<subtype>.
const fsType = "fuse.spanpull"

// MountOptions configure a FUSE mount.
type MountOptions struct {
	// EntryTimeout, AttrTimeout and NegativeTimeout bound how long the
	// kernel caches lookups, attributes and failed lookups. Zero means
	// DefaultTimeout; a negative value disables caching.
	EntryTimeout, AttrTimeout, NegativeTimeout time.Duration
	// FsName is the source shown in /proc/mounts (for example the layer
	// digest). Empty means "spanpull".
	FsName string
	// Debug logs every FUSE request through the root's logger, at debug
	// level.
	Debug bool
}

// Server is a mounted layer.
type Server struct {
	dir string
	fs  *fsys
	srv *fuse.Server
	// dev is this process's reference to the FUSE connection, which
	// Handoff duplicates. devMu guards it (and the open table's file)
	// against the closing when the server stops.
	devMu  sync.Mutex
	dev    *os.File
	closed bool
	// init is the kernel's INIT request, which a successor replays.
	init     fuse.InitIn
	maxWrite uint32
	// stopped is closed when the server has stopped serving: the kernel
	// dropped the connection.
	stopped chan struct{}

	mu        sync.Mutex // Unmount, Replace, Handoff
	unmounted bool
}

// unmountWait bounds how long Unmount waits for the kernel to release the
// filesystem after the unmount.
const unmountWait = 5 * time.Second

// Mount mounts root read-only on dir and serves it until Unmount. The
// mount allows other users (containers run as any uid) and checks
// permissions in the kernel from the modes of the layer.
//
// The mount is made with mount(2) on a /dev/fuse descriptor opened here,
// and go-fuse serves that descriptor; Handoff passes it on.
func Mount(ctx context.Context, dir string, root *Root, opts MountOptions) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("mount layer at %s: %w", dir, err)
	}
	if !root.mounted.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("mount layer at %s: root is already mounted", dir)
	}
	s, err := mount(dir, root, opts)
	if err != nil {
		root.mounted.Store(false)
		return nil, fmt.Errorf("mount layer at %s: %w", dir, err)
	}
	return s, nil
}

func mount(dir string, root *Root, opts MountOptions) (*Server, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return nil, err
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// What go-fuse's direct mount passes, minus what only fusermount
	// understands. Read-only and no device access through this mount;
	// setuid binaries keep working.
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d,default_permissions,allow_other",
		fd, st.Mode&unix.S_IFMT, os.Geteuid(), os.Getegid(), maxWrite)
	if err := unix.Mount(fsName(opts), dir, fsType, unix.MS_RDONLY|unix.MS_NODEV, data); err != nil {
		unix.Close(fd)
		return nil, err
	}
	dev, err := dupFD(fd, "/dev/fuse")
	if err != nil {
		unix.Close(fd)
		unix.Unmount(dir, unix.MNT_DETACH)
		return nil, err
	}
	fs := newFS(&view{root: root, base: fuse.FUSE_ROOT_ID}, opts)
	if fs.opens, err = newOpenTable(); err != nil {
		root.log.WithError(err).Warn("fusefs: no FUSE passthrough for this mount")
	}
	// go-fuse takes over fd and answers the kernel's INIT.
	srv, err := fuse.NewServer(fs, "/dev/fd/"+strconv.Itoa(fd), fuseOptions(root.log, opts, maxWrite))
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		dev.Close()
		fs.closeOpens()
		return nil, err
	}
	s := start(dir, fs, srv, dev, maxWrite)
	if err := noPoll(dir); err != nil {
		root.log.WithError(err).Warn("fusefs: could not tell the kernel that the mount does not poll")
	}
	return s, nil
}

// noPoll makes the kernel learn that the filesystem does not implement
// poll, before this process opens a file of it: the Go runtime adds every
// file it opens to its epoll set without releasing its processor, the
// kernel then asks the server, and the server may need that processor to
// answer (a deadlock go-fuse avoids for the mounts it makes itself, the
// same way). go-fuse answers the special name it uses for this itself.
func noPoll(dir string) error {
	fd, err := unix.Open(filepath.Join(dir, ".go-fuse-epoll-hack"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return err
}

// start serves srv and returns the Server.
func start(dir string, fs *fsys, srv *fuse.Server, dev *os.File, maxWrite uint32) *Server {
	s := &Server{dir: dir, fs: fs, srv: srv, dev: dev, init: *srv.KernelSettings(), maxWrite: maxWrite,
		stopped: make(chan struct{})}
	go func() {
		srv.Serve()
		s.devMu.Lock()
		s.closed = true
		s.dev.Close()
		fs.closeOpens()
		s.devMu.Unlock()
		close(s.stopped)
	}()
	return s
}

func (f *fsys) closeOpens() {
	if f.opens != nil {
		f.opens.close()
	}
}

func fsName(opts MountOptions) string {
	if opts.FsName == "" {
		return "spanpull"
	}
	return opts.FsName
}

// fuseOptions returns go-fuse's options for a mount. go-fuse does not
// mount: it is given the /dev/fuse descriptor as /dev/fd/N.
func fuseOptions(logger *log.Entry, opts MountOptions, maxWrite uint32) *fuse.MountOptions {
	// go-fuse reports trouble (and, with Debug, every request) through a
	// standard library logger: route it to the layer's logger.
	level := logrus.WarnLevel
	if opts.Debug {
		level = logrus.DebugLevel
	}
	return &fuse.MountOptions{
		FsName:   fsName(opts),
		Name:     "spanpull",
		MaxWrite: int(maxWrite),
		Debug:    opts.Debug,
		Logger:   stdLogger(logger, level),
	}
}

// stdLogger returns a standard library logger (what go-fuse logs to)
// whose lines go to e at level.
func stdLogger(e *log.Entry, level logrus.Level) *stdlog.Logger {
	return stdlog.New(entryWriter{e: e.WithField("component", "go-fuse"), level: level}, "", 0)
}

// entryWriter logs each Write (one line of a standard library logger) as
// one line of e.
type entryWriter struct {
	e     *log.Entry
	level logrus.Level
}

func (w entryWriter) Write(p []byte) (int, error) {
	w.e.Log(w.level, strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// dupFD duplicates descriptor fd as a file named name.
func dupFD(fd int, name string) (*os.File, error) {
	d, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	return os.NewFile(uintptr(d), name), nil
}

// dupFile duplicates f, which must be in blocking mode (as /dev/fuse
// descriptors and memfds are here).
func dupFile(f *os.File) (*os.File, error) { return dupFD(int(f.Fd()), f.Name()) }

// Dir returns the mountpoint.
func (s *Server) Dir() string { return s.dir }

// Unmount unmounts the layer and waits until the server has stopped.
//
// It fails, changing nothing, while files of the mount are open or a
// process has its working directory inside it. It also fails when the
// kernel still holds the filesystem after the unmount, which happens when
// it is a lower layer of a live overlayfs mount: the layer then keeps
// being served (to the overlay only) until that mount goes, and calling
// Unmount again after that returns nil. Unmounting again, or after
// someone else unmounted the directory, returns nil.
func (s *Server) Unmount() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.unmounted {
		var err error
		for delay := 5 * time.Millisecond; ; delay *= 2 {
			err = unix.Unmount(s.dir, 0)
			if !errors.Is(err, unix.EBUSY) || delay > 200*time.Millisecond {
				break
			}
			time.Sleep(delay)
		}
		// EINVAL: dir is no longer a mountpoint; someone else
		// unmounted it.
		if err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount layer at %s: %w", s.dir, err)
		}
		s.unmounted = true
	}
	select {
	case <-s.stopped:
		return nil
	case <-time.After(unmountWait):
		return fmt.Errorf("unmount layer at %s: unmounted, but the kernel still uses the filesystem "+
			"(a lower layer of a live overlay mount?); it is served until released", s.dir)
	}
}

// Wait blocks until the server stops, after Unmount or an unmount from
// outside.
func (s *Server) Wait() { <-s.stopped }

// initBytes returns the bytes of an InitIn as the kernel sends them.
func initBytes(in *fuse.InitIn) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(in)), unsafe.Sizeof(*in))
}
