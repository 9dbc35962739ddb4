package fdstore

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// fusectlDir is where the kernel's FUSE control filesystem is mounted.
const fusectlDir = "/sys/fs/fuse/connections"

// Abort ends the FUSE connection of f, a /dev/fuse descriptor, as if its
// server had died and nothing kept it alive: requests waiting for an
// answer, and all later ones, fail (ECONNABORTED, ENOTCONN) instead of
// waiting. It writes to the connection's abort file in the FUSE control
// filesystem, which it mounts when it is not. A connection that has
// already ended is left alone. It needs root, and a kernel that names the
// connection of a /dev/fuse descriptor in /proc/self/fdinfo (6.18 does):
// without that, closing every descriptor of the connection ends it too.
func Abort(f *os.File) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("abort FUSE connection: %w", err)
	}
	var conn uint64
	var live bool
	cerr := raw.Control(func(fd uintptr) {
		if live, err = connected(int(fd)); err == nil && live {
			conn, err = connection(int(fd))
		}
	})
	if err = errors.Join(cerr, err); err != nil || !live {
		if err != nil {
			err = fmt.Errorf("abort FUSE connection: %w", err)
		}
		return err
	}
	abort := filepath.Join(fusectlDir, strconv.FormatUint(conn, 10), "abort")
	if _, err := os.Stat(abort); errors.Is(err, os.ErrNotExist) {
		if err := unix.Mount("fusectl", fusectlDir, "fusectl", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("abort FUSE connection %d: mount %s: %w", conn, fusectlDir, err)
		}
	}
	if err := os.WriteFile(abort, []byte("1"), 0); err != nil {
		return fmt.Errorf("abort FUSE connection %d: %w", conn, err)
	}
	return nil
}

// isFUSE reports whether descriptor fd is /dev/fuse.
func isFUSE(fd int) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR &&
		unix.Major(st.Rdev) == 10 && unix.Minor(st.Rdev) == 229
}

// connected reports whether the FUSE connection of /dev/fuse descriptor
// fd is still up: the device polls as an error once it has ended.
func connected(fd int) (bool, error) {
	if !isFUSE(fd) {
		return false, errors.New("not a /dev/fuse descriptor")
	}
	p := []unix.PollFd{{Fd: int32(fd)}}
	if _, err := unix.Poll(p, 0); err != nil {
		return false, err
	}
	return p[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) == 0, nil
}

// connection returns the number of the FUSE connection of descriptor fd
// (its directory in the control filesystem).
func connection(fd int) (uint64, error) {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return 0, err
	}
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		if v, ok := bytes.CutPrefix(s.Bytes(), []byte("fuse_connection:")); ok {
			return strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64)
		}
	}
	return 0, errors.New("the kernel does not tell the connection of a /dev/fuse descriptor")
}
