// Package fdstore keeps file descriptors, and a little state with each,
// outside the process that made them, so that the FUSE connections of
// lazily served layers outlive the daemon that serves them.
//
// # Why a holder process
//
// The kernel ends a FUSE connection when the last descriptor of its
// /dev/fuse file closes: if the daemon dies (kill -9, crash, upgrade)
// holding the only one, every later read of a lazy layer fails with
// ENOTCONN, inside running containers. A second process that holds a
// duplicate keeps the connection alive; the next daemon takes the
// descriptor back (fusefs.Resume) and serves the requests that were
// waiting, so the containers see a delay, not an error.
//
// systemd's file descriptor store (FileDescriptorStoreMax) does this job
// for a systemd service, but it is not there in containers, in CI or when
// the daemon is started by hand. A child process that served FUSE itself
// would only move the problem: upgrading it would need the same takeover.
// So the holder does nothing but hold: it is small and its protocol is
// versioned, so that it never needs to be upgraded along with the daemon
// (an old holder serves a new daemon).
//
// The daemon starts it when it is not running (Ensure), as its own
// session so that it survives the daemon; a systemd unit needs
// KillMode=process so that stopping the daemon does not kill it.
//
// # Protocol
//
// Version 1, over a unix stream socket. Every message is a frame:
//
//	offset size
//	0      1    version (1)
//	1      1    kind
//	2      1    number of descriptors passed with the frame (SCM_RIGHTS,
//	            attached to the frame's first 12 bytes; at most 16)
//	3      1    0
//	4      4    key length (little-endian, at most 4096)
//	8      4    data length (little-endian, at most 64 MiB)
//	12          key, then data
//
// Requests: 'P' (PUT: key, data = state, descriptors), 'D' (DELETE: key),
// 'L' (LIST). Answers: 'O' (done), 'E' (failed; data = the reason), and,
// for LIST, one 'N' frame per entry (key, state, descriptors) before the
// 'O'. A holder that gets a frame of a version it does not speak answers
// 'E' and closes the connection. The holder accepts connections from its
// own user only.
//
// # Limits
//
// The holder keeps everything in memory. If it dies, the descriptors
// close and the connections end as if no holder had been there; the next
// daemon finds nothing to take over and must clean up the mounts left
// behind. If no client is connected for Grace, it aborts the FUSE
// connections it holds (so that reads fail instead of waiting forever for
// a daemon that does not come back) and exits.
package fdstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Version is the protocol version this package speaks.
const Version = 1

// Frame kinds.
const (
	kindPut    = 'P'
	kindDelete = 'D'
	kindList   = 'L'
	kindOK     = 'O'
	kindError  = 'E'
	kindEntry  = 'N'
)

// Limits of a frame.
const (
	headerSize = 12
	maxKey     = 4096
	maxData    = 64 << 20
	maxFiles   = 16
)

// Entry is what the holder keeps under a key.
type Entry struct {
	Key   string
	State []byte
	// Files are the descriptors, in the order they were put.
	Files []*os.File
}

// Close closes the descriptors of e.
func (e *Entry) Close() error {
	var err error
	for _, f := range e.Files {
		err = errors.Join(err, f.Close())
	}
	return err
}

// frame is one message.
type frame struct {
	kind  byte
	key   string
	data  []byte
	files []*os.File
}

// writeFrame sends f on c: the header with the descriptors in one
// sendmsg, then the key and data.
func writeFrame(c *net.UnixConn, f frame) error {
	if len(f.key) > maxKey || len(f.data) > maxData || len(f.files) > maxFiles {
		return fmt.Errorf("fdstore: frame too large (key %d bytes, data %d bytes, %d descriptors)", len(f.key), len(f.data), len(f.files))
	}
	h := make([]byte, headerSize)
	h[0], h[1], h[2] = Version, f.kind, byte(len(f.files))
	binary.LittleEndian.PutUint32(h[4:], uint32(len(f.key)))
	binary.LittleEndian.PutUint32(h[8:], uint32(len(f.data)))
	var oob []byte
	if len(f.files) > 0 {
		fds := make([]int, len(f.files))
		for i, file := range f.files {
			fds[i] = int(file.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.WriteMsgUnix(h, oob, nil)
	if err != nil {
		return err
	}
	if n != len(h) {
		return io.ErrShortWrite
	}
	if _, err := c.Write(append([]byte(f.key), f.data...)); err != nil {
		return err
	}
	return nil
}

// errVersion is returned by readFrame for a frame of another version.
type errVersion byte

func (e errVersion) Error() string {
	return fmt.Sprintf("fdstore: protocol version %d is not supported (this side speaks %d)", byte(e), Version)
}

// readFrame reads a frame from c. The descriptors it returns are the
// caller's, also when it fails.
func readFrame(c *net.UnixConn) (frame, error) {
	h := make([]byte, headerSize)
	oob := make([]byte, unix.CmsgSpace(maxFiles*4))
	n, oobn, _, _, err := c.ReadMsgUnix(h, oob)
	var f frame
	if oobn > 0 {
		files, perr := parseRights(oob[:oobn])
		f.files = files
		if perr != nil && err == nil {
			err = perr
		}
	}
	if err == nil && n < headerSize {
		_, err = io.ReadFull(c, h[n:])
	}
	if err != nil {
		closeFiles(f.files)
		return frame{}, err
	}
	if h[0] != Version {
		closeFiles(f.files)
		return frame{}, errVersion(h[0])
	}
	f.kind = h[1]
	klen, dlen := binary.LittleEndian.Uint32(h[4:]), binary.LittleEndian.Uint32(h[8:])
	if int(h[2]) != len(f.files) || klen > maxKey || dlen > maxData {
		closeFiles(f.files)
		return frame{}, fmt.Errorf("fdstore: bad frame (key %d bytes, data %d bytes, %d descriptors announced, %d passed)",
			klen, dlen, h[2], len(f.files))
	}
	body := make([]byte, klen+dlen)
	if _, err := io.ReadFull(c, body); err != nil {
		closeFiles(f.files)
		return frame{}, err
	}
	f.key, f.data = string(body[:klen]), body[klen:]
	return f, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "fdstore"))
		}
	}
	return files, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
