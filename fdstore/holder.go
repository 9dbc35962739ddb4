package fdstore

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// DefaultGrace is how long a holder waits for a client by default.
const DefaultGrace = time.Minute

// ServeOptions configure a holder.
type ServeOptions struct {
	// Grace is how long the holder keeps its descriptors while no client
	// is connected (from its start, and from the last client's
	// departure). Then it aborts the FUSE connections it holds and
	// exits. Zero means DefaultGrace.
	Grace time.Duration
	// Logger receives what the holder does. Nil means stderr.
	Logger *log.Entry
}

// ErrRunning is returned by Serve when another holder serves the socket.
var ErrRunning = errors.New("fdstore: another holder serves the socket")

// PIDFile is the file that names the process ID of the holder serving
// socketPath (its lock file).
func PIDFile(socketPath string) string { return socketPath + ".lock" }

// Serve runs a holder on a unix socket at socketPath until ctx is done or
// no client has been connected for the grace period, and then aborts the
// FUSE connections it holds and closes everything. It returns ErrRunning
// when another holder serves the socket (a lock file next to it,
// socketPath+".lock", tells).
func Serve(ctx context.Context, socketPath string, opts ServeOptions) error {
	if opts.Grace <= 0 {
		opts.Grace = DefaultGrace
	}
	if opts.Logger == nil {
		opts.Logger = logrus.NewEntry(logrus.New())
	}
	// The daemon that started us may be gone, and stderr with it: a write
	// to a closed pipe must fail, not kill the holder.
	signal.Ignore(syscall.SIGPIPE)
	lock, err := os.OpenFile(PIDFile(socketPath), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("fdstore: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return ErrRunning
		}
		return fmt.Errorf("fdstore: lock %s: %w", lock.Name(), err)
	}
	// The lock file names the holder, for operators and tests (PIDFile).
	if err := lock.Truncate(0); err == nil {
		fmt.Fprintf(lock, "%d\n", os.Getpid())
	}
	if err := os.Remove(socketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("fdstore: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return fmt.Errorf("fdstore: %w", err)
	}
	defer os.Remove(socketPath)
	if err := os.Chmod(socketPath, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("fdstore: %w", err)
	}
	h := &holder{entries: map[string]*Entry{}, log: opts.Logger, grace: opts.Grace, idle: make(chan struct{}, 1)}
	h.log.WithField("socket", socketPath).Info("fdstore: holder started")
	h.serve(ctx, ln)
	h.abortAll()
	return nil
}

// holder is the state of a holder process.
type holder struct {
	log   *log.Entry
	grace time.Duration

	mu      sync.Mutex
	entries map[string]*Entry
	clients int
	// idle is signalled when the last client leaves.
	idle chan struct{}
}

// serve accepts clients until ctx is done or the holder has been without
// a client for the grace period, and returns once every client goroutine
// has ended.
func (h *holder) serve(ctx context.Context, ln *net.UnixListener) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	conns := make(chan *net.UnixConn)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(conns)
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			select {
			case conns <- c:
			case <-ctx.Done():
				c.Close()
				return
			}
		}
	}()
	timer := time.NewTimer(h.grace)
	defer timer.Stop()
	var live []*net.UnixConn
loop:
	for {
		select {
		case c, ok := <-conns:
			if !ok {
				break loop
			}
			if !samePeer(c) {
				c.Close()
				continue
			}
			h.mu.Lock()
			h.clients++
			h.mu.Unlock()
			timer.Stop()
			live = append(live, c)
			wg.Add(1)
			go func() {
				defer wg.Done()
				h.client(c)
			}()
		case <-h.idle:
			timer.Reset(h.grace)
		case <-timer.C:
			h.mu.Lock()
			n := h.clients
			h.mu.Unlock()
			if n == 0 {
				h.log.WithField("grace", h.grace).Warn("fdstore: no client within the grace period; aborting the held connections")
				break loop
			}
		case <-ctx.Done():
			break loop
		}
	}
	cancel()
	ln.Close()
	for _, c := range live {
		c.Close()
	}
	wg.Wait()
}

// samePeer reports whether the process at the other end of c runs as the
// holder's user.
func samePeer(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	return err == nil && cred != nil && int(cred.Uid) == os.Geteuid()
}

// client answers the requests of one connection until it closes.
func (h *holder) client(c *net.UnixConn) {
	defer func() {
		c.Close()
		h.mu.Lock()
		h.clients--
		last := h.clients == 0
		h.mu.Unlock()
		if last {
			select {
			case h.idle <- struct{}{}:
			default:
			}
		}
	}()
	for {
		f, err := readFrame(c)
		var ev errVersion
		if errors.As(err, &ev) {
			writeFrame(c, frame{kind: kindError, data: []byte(err.Error())})
			return
		}
		if err != nil {
			return
		}
		if err := h.handle(c, f); err != nil {
			h.log.WithError(err).Warn("fdstore: client connection")
			return
		}
	}
}

// handle answers request f.
func (h *holder) handle(c *net.UnixConn, f frame) error {
	switch f.kind {
	case kindPut:
		if f.key == "" {
			closeFiles(f.files)
			return writeFrame(c, frame{kind: kindError, data: []byte("fdstore: PUT without a key")})
		}
		h.mu.Lock()
		old := h.entries[f.key]
		h.entries[f.key] = &Entry{Key: f.key, State: f.data, Files: f.files}
		h.mu.Unlock()
		if old != nil {
			old.Close()
		}
		h.log.WithFields(log.Fields{"key": f.key, "descriptors": len(f.files)}).Debug("fdstore: put")
	case kindDelete:
		closeFiles(f.files)
		h.mu.Lock()
		old := h.entries[f.key]
		delete(h.entries, f.key)
		h.mu.Unlock()
		if old != nil {
			old.Close()
		}
	case kindList:
		closeFiles(f.files)
		return h.list(c)
	default:
		closeFiles(f.files)
		return writeFrame(c, frame{kind: kindError, data: []byte(fmt.Sprintf("fdstore: unknown request %q", f.kind))})
	}
	return writeFrame(c, frame{kind: kindOK})
}

// list sends every entry, in key order, then OK.
func (h *holder) list(c *net.UnixConn) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, k := range slices.Sorted(maps.Keys(h.entries)) {
		e := h.entries[k]
		if err := writeFrame(c, frame{kind: kindEntry, key: k, data: e.State, files: e.Files}); err != nil {
			return err
		}
	}
	return writeFrame(c, frame{kind: kindOK})
}

// abortAll aborts the FUSE connections among the held descriptors and
// closes them all.
func (h *holder) abortAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, e := range h.entries {
		for _, f := range e.Files {
			raw, err := f.SyscallConn()
			fuse := false
			if err == nil {
				raw.Control(func(fd uintptr) { fuse = isFUSE(int(fd)) })
			}
			if !fuse {
				continue
			}
			if err := Abort(f); err != nil {
				h.log.WithField("key", k).WithError(err).Warn("fdstore: closing the descriptor instead")
			} else {
				h.log.WithField("key", k).Info("fdstore: aborted FUSE connection")
			}
		}
		e.Close()
		delete(h.entries, k)
	}
}
