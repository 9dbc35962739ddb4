package fusefs

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// DefaultTimeout is how long the kernel may cache entries, attributes and
// failed lookups by default: a layer never changes while it is mounted.
const DefaultTimeout = time.Hour

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
	srv *fuse.Server
	// stopped is closed when the server has stopped serving: the kernel
	// dropped the connection.
	stopped chan struct{}

	mu        sync.Mutex
	unmounted bool
}

// unmountWait bounds how long Unmount waits for the kernel to release the
// filesystem after the unmount.
const unmountWait = 5 * time.Second

// Mount mounts root read-only on dir and serves it until Unmount. The
// mount allows other users (containers run as any uid) and checks
// permissions in the kernel from the modes of the layer.
func Mount(ctx context.Context, dir string, root *Root, opts MountOptions) (*Server, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("mount layer at %s: %w", dir, err)
	}
	if !root.mounted.CompareAndSwap(false, true) {
		return nil, fmt.Errorf("mount layer at %s: root is already mounted", dir)
	}
	fsName := opts.FsName
	if fsName == "" {
		fsName = "spanpull"
	}
	// go-fuse reports trouble (and, with Debug, every request) through
	// standard library loggers: route them to the layer's logger. Its node
	// diagnostics (inode number overrides, orphaned paths) are for
	// debugging only.
	serverLevel := logrus.WarnLevel
	if opts.Debug {
		serverLevel = logrus.DebugLevel
	}
	fo := &fs.Options{
		Logger:          stdLogger(root.l.log, logrus.DebugLevel),
		EntryTimeout:    timeout(opts.EntryTimeout),
		AttrTimeout:     timeout(opts.AttrTimeout),
		NegativeTimeout: timeout(opts.NegativeTimeout),
		// Show modes as they are, 0000 included (go-fuse would
		// otherwise turn 0000 into 0644).
		NullPermissions: true,
		MountOptions: fuse.MountOptions{
			FsName:            fsName,
			Name:              "spanpull",
			AllowOther:        true,
			DirectMount:       true,
			DirectMountStrict: true,
			// Read-only and no device access through this mount;
			// setuid binaries keep working.
			DirectMountFlags: syscall.MS_RDONLY | syscall.MS_NODEV,
			Options:          []string{"default_permissions"},
			Debug:            opts.Debug,
			Logger:           stdLogger(root.l.log, serverLevel),
		},
	}
	srv, err := fs.Mount(dir, root, fo)
	if err != nil {
		return nil, fmt.Errorf("mount layer at %s: %w", dir, err)
	}
	s := &Server{dir: dir, srv: srv, stopped: make(chan struct{})}
	go func() {
		srv.Wait()
		close(s.stopped)
	}()
	return s, nil
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

func timeout(d time.Duration) *time.Duration {
	switch {
	case d == 0:
		d = DefaultTimeout
	case d < 0:
		d = 0
	}
	return &d
}

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
