package resolver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/fdstore"
	"github.com/spanpull/spanpull/fusefs"
)

// HolderConfig says how the resolver keeps its FUSE connections alive
// across its own restarts: in an fd holder (package fdstore), a process of
// its own that outlives the daemon. A new daemon takes every live
// connection over, so containers reading lazy layers see no error when the
// daemon is killed, crashes or is upgraded.
type HolderConfig struct {
	// Socket is the holder's unix socket. Empty: no holder; lazy layers
	// are unmounted when the resolver is released and mounted anew.
	Socket string
	// Argv starts a holder when none answers on Socket (the daemon's own
	// binary with its hidden fd-holder subcommand). Empty: the holder is
	// run by someone else (on Kubernetes, a DaemonSet of its own that a
	// rollout of the daemon does not restart), and the resolver waits up
	// to ExternalWait for it to answer.
	Argv []string
}

// ExternalWait bounds how long the resolver waits for a holder it does not
// start itself.
const ExternalWait = time.Minute

// holder is the resolver's side of the fd holder: the connections a
// previous daemon left there, waiting to be taken over, and the client
// that keeps the current ones.
type holder struct {
	client *fdstore.Client
	log    *log.Entry

	mu   sync.Mutex
	left map[string]fdstore.Entry // by mount dir, until taken over or dropped
}

// openHolder connects to (or starts) the fd holder and lists what it
// keeps. A nil holder (no socket configured) keeps nothing.
func openHolder(ctx context.Context, cfg HolderConfig, logger *log.Entry) (*holder, error) {
	if cfg.Socket == "" {
		return nil, nil
	}
	c, err := connectHolder(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("fd holder: %w", err)
	}
	entries, err := c.List(ctx)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("fd holder: %w", err)
	}
	h := &holder{client: c, log: logger, left: make(map[string]fdstore.Entry, len(entries))}
	for _, e := range entries {
		h.left[e.Key] = e
	}
	return h, nil
}

// connectHolder connects to the holder of cfg, starting it when cfg says
// how, else waiting for it.
func connectHolder(ctx context.Context, cfg HolderConfig) (*fdstore.Client, error) {
	if len(cfg.Argv) > 0 {
		return fdstore.Ensure(ctx, cfg.Socket, cfg.Argv)
	}
	ctx, cancel := context.WithTimeout(ctx, ExternalWait)
	defer cancel()
	for {
		c, err := fdstore.Dial(ctx, cfg.Socket)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no holder answers on %s: %w", cfg.Socket, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// take returns the connection a previous daemon left for dir, if any; the
// caller owns it.
func (h *holder) take(dir string) (*fusefs.Handoff, bool) {
	if h == nil {
		return nil, false
	}
	h.mu.Lock()
	e, ok := h.left[dir]
	delete(h.left, dir)
	h.mu.Unlock()
	if !ok {
		return nil, false
	}
	ho, err := fusefs.HandoffFromFiles(e.Files, e.State)
	if err != nil {
		h.log.WithError(err).WithField("dir", dir).Warn("spanpull: held FUSE connection is unusable")
		e.Close()
		return nil, false
	}
	return ho, true
}

// keep hands the connection of srv, mounted on dir, to the holder.
func (h *holder) keep(ctx context.Context, dir string, srv *fusefs.Server) error {
	if h == nil {
		return nil
	}
	ho, err := srv.Handoff()
	if err != nil {
		return err
	}
	defer ho.Close()
	return h.client.Put(ctx, dir, ho.State, ho.Files()...)
}

// forget drops what the holder keeps for dir (its layer was removed).
func (h *holder) forget(ctx context.Context, dir string) error {
	if h == nil {
		return nil
	}
	return h.client.Delete(ctx, dir)
}

// dropLeft ends the connections no snapshot claimed: their layers were
// removed while no daemon ran. Each mount is detached and its connection
// aborted, so that nothing waits on it.
func (h *holder) dropLeft(ctx context.Context) error {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	left := h.left
	h.left = map[string]fdstore.Entry{}
	h.mu.Unlock()
	var errs []error
	for dir, e := range left {
		h.log.WithField("dir", dir).Info("spanpull: dropping a held FUSE connection no snapshot uses")
		errs = append(errs, dropConnection(dir, &e), h.client.Delete(ctx, dir))
	}
	return errors.Join(errs...)
}

// dropConnection detaches the mount on dir (if it is still there) and
// aborts its connection, then closes e's descriptors.
func dropConnection(dir string, e *fdstore.Entry) error {
	err := mount.UnmountRecursive(dir, unix.MNT_DETACH)
	if len(e.Files) > 0 {
		err = errors.Join(err, fdstore.Abort(e.Files[0]))
	}
	return errors.Join(err, e.Close())
}

// close closes the connection to the holder; it keeps what it holds.
func (h *holder) close() error {
	if h == nil {
		return nil
	}
	h.mu.Lock()
	for _, e := range h.left {
		e.Close()
	}
	h.left = nil
	h.mu.Unlock()
	return h.client.Close()
}
