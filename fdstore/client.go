package fdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Client talks to a holder. Its methods may be called from several
// goroutines; requests are answered one at a time.
type Client struct {
	mu   sync.Mutex
	conn *net.UnixConn
}

// Dial connects to the holder serving socketPath.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("fdstore: %w", err)
	}
	return &Client{conn: c.(*net.UnixConn)}, nil
}

// ensureWait bounds how long Ensure waits for a holder it started.
const ensureWait = 10 * time.Second

// Ensure connects to the holder serving socketPath, starting one first
// when none answers: the command argv (for the daemon, its own binary
// with the hidden fd-holder subcommand), in a session of its own so that
// it outlives the caller, logging to socketPath+".log" (not to the
// caller's stderr, which may be a pipe that dies with the caller) and
// with "/" as its working directory. Starting a second holder is harmless: it finds the first
// one's lock and exits.
func Ensure(ctx context.Context, socketPath string, argv []string) (*Client, error) {
	if c, err := Dial(ctx, socketPath); err == nil {
		return c, nil
	}
	if len(argv) == 0 {
		return nil, errors.New("fdstore: no command to start a holder")
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	logFile, err := os.OpenFile(socketPath+".log", os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("fdstore: holder log: %w", err)
	}
	defer logFile.Close() // the holder has its own copy
	cmd.Stderr = logFile
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("fdstore: start holder: %w", err)
	}
	// Reap the holder when it exits; this goroutine ends with it.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	ctx, cancel := context.WithTimeout(ctx, ensureWait)
	defer cancel()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if c, err := Dial(ctx, socketPath); err == nil {
			return c, nil
		}
		select {
		case err := <-exited:
			// Another holder may have won the race to the lock.
			if c, derr := Dial(ctx, socketPath); derr == nil {
				return c, nil
			}
			return nil, fmt.Errorf("fdstore: holder %v exited: %v", argv, err)
		case <-ctx.Done():
			return nil, fmt.Errorf("fdstore: holder %v does not answer on %s: %w", argv, socketPath, ctx.Err())
		case <-tick.C:
		}
	}
}

// Close closes the connection. The holder keeps what was put.
func (c *Client) Close() error { return c.conn.Close() }

// Put keeps state and duplicates of files under key, replacing what key
// held. The caller keeps its files.
func (c *Client) Put(ctx context.Context, key string, state []byte, files ...*os.File) error {
	if key == "" {
		return errors.New("fdstore: empty key")
	}
	return c.do(ctx, frame{kind: kindPut, key: key, data: state, files: files}, nil)
}

// Delete drops what key holds; deleting a missing key is not an error.
func (c *Client) Delete(ctx context.Context, key string) error {
	return c.do(ctx, frame{kind: kindDelete, key: key}, nil)
}

// List returns every entry the holder keeps, in key order, with
// duplicates of its descriptors, which the caller owns (Entry.Close).
func (c *Client) List(ctx context.Context) ([]Entry, error) {
	var es []Entry
	err := c.do(ctx, frame{kind: kindList}, func(f frame) {
		es = append(es, Entry{Key: f.key, State: f.data, Files: f.files})
	})
	if err != nil {
		for i := range es {
			es[i].Close()
		}
		return nil, err
	}
	return es, nil
}

// do sends request req and reads the answer, passing entries to entry.
func (c *Client) do(ctx context.Context, req frame, entry func(frame)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Now()) })
	defer func() {
		if !stop() {
			// The deadline was set: clear it for the next request.
			c.conn.SetDeadline(time.Time{})
		}
	}()
	if err := writeFrame(c.conn, req); err != nil {
		return fmt.Errorf("fdstore: %c %q: %w", req.kind, req.key, err)
	}
	for {
		f, err := readFrame(c.conn)
		if err != nil {
			return fmt.Errorf("fdstore: %c %q: %w", req.kind, req.key, err)
		}
		switch f.kind {
		case kindOK:
			closeFiles(f.files)
			return nil
		case kindError:
			closeFiles(f.files)
			return fmt.Errorf("fdstore: %c %q: holder: %s", req.kind, req.key, f.data)
		case kindEntry:
			if entry == nil {
				closeFiles(f.files)
				continue
			}
			entry(f)
		default:
			closeFiles(f.files)
			return fmt.Errorf("fdstore: %c %q: unexpected answer %q", req.kind, req.key, f.kind)
		}
	}
}
