//go:build linux

// Package treediff compares two directory trees entry by entry: type,
// mode, owner, device number, link count, modification time, xattrs, link
// target, file content, and which entries are hard links of each other.
// Tests use it to check that a lazy mount shows what containerd unpacks
// from the same layer, down to the last attribute.
package treediff

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Options says where the two trees may differ legitimately. The zero
// value requires them identical.
type Options struct {
	// Mtime, when set, checks the modification times of the entry rel
	// instead of requiring them equal (containerd gives what it makes
	// itself the current time, for instance): it returns the difference
	// to report, or "".
	Mtime func(rel string, want, got *syscall.Stat_t) string
	// SkipXattr, when set, reports whether the xattr name of the got side
	// is left out of the comparison (one the want side could not hold).
	SkipXattr func(name string) bool
}

// Compare reports with t.Errorf every difference between the tree at got
// and the tree at want, the roots' own attributes aside. want is the
// reference (containerd's unpacking), got the tree under test. It returns
// how many entries of want it compared, for the caller to check that the
// walk saw the tree it meant.
func Compare(t testing.TB, want, got string, opts Options) int {
	t.Helper()
	seen := map[string]bool{}
	inodes := map[uint64]uint64{}
	err := filepath.WalkDir(want, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		seen[rel] = true
		if rel == "." {
			return nil
		}
		var w, g syscall.Stat_t
		if err := syscall.Lstat(p, &w); err != nil {
			return err
		}
		if err := syscall.Lstat(filepath.Join(got, rel), &g); err != nil {
			t.Errorf("%s: the reference has it, the tree under test: %v", rel, err)
			return nil
		}
		compareEntry(t, rel, p, filepath.Join(got, rel), &w, &g, opts)
		if prev, ok := inodes[w.Ino]; ok && prev != g.Ino {
			t.Errorf("%s: inode %d, but its hardlinks have %d", rel, g.Ino, prev)
		}
		inodes[w.Ino] = g.Ino
		return nil
	})
	if err != nil {
		t.Fatalf("walk the reference tree: %v", err)
	}
	n := len(seen) - 1 // the root is not compared
	err = filepath.WalkDir(got, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if rel, _ := filepath.Rel(got, p); !seen[rel] {
			t.Errorf("%s is in the tree under test, not in the reference", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk the tree under test: %v", err)
	}
	return n
}

// compareEntry compares the entry rel, at wp in the reference and gp in
// the tree under test.
func compareEntry(t testing.TB, rel, wp, gp string, w, g *syscall.Stat_t, opts Options) {
	t.Helper()
	if w.Mode != g.Mode || w.Uid != g.Uid || w.Gid != g.Gid || w.Rdev != g.Rdev || w.Nlink != g.Nlink {
		t.Errorf("%s: mode %o owner %d:%d rdev %#x nlink %d; reference: mode %o owner %d:%d rdev %#x nlink %d",
			rel, g.Mode, g.Uid, g.Gid, g.Rdev, g.Nlink, w.Mode, w.Uid, w.Gid, w.Rdev, w.Nlink)
	}
	if opts.Mtime != nil {
		if diff := opts.Mtime(rel, w, g); diff != "" {
			t.Errorf("%s: %s", rel, diff)
		}
	} else if w.Mtim != g.Mtim {
		t.Errorf("%s: mtime %d.%09d, reference %d.%09d", rel, g.Mtim.Sec, g.Mtim.Nsec, w.Mtim.Sec, w.Mtim.Nsec)
	}
	switch w.Mode & syscall.S_IFMT {
	case syscall.S_IFLNK:
		wl, _ := os.Readlink(wp)
		if gl, err := os.Readlink(gp); err != nil || gl != wl {
			t.Errorf("%s: readlink %q, %v; reference %q", rel, gl, err, wl)
		}
		return
	case syscall.S_IFREG:
		if w.Size != g.Size || FileHash(t, wp) != FileHash(t, gp) {
			t.Errorf("%s: content differs (%d bytes, reference %d)", rel, g.Size, w.Size)
		}
	}
	gx := Xattrs(t, gp)
	for k := range gx {
		if opts.SkipXattr != nil && opts.SkipXattr(k) {
			delete(gx, k)
		}
	}
	if wx := Xattrs(t, wp); !maps.Equal(wx, gx) {
		t.Errorf("%s: xattrs %q, reference %q", rel, gx, wx)
	}
}

// FileHash returns the hex SHA-256 of the file at p's content ("" after
// reporting a failure to read it).
func FileHash(t testing.TB, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Errorf("open %s: %v", p, err)
		return ""
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Errorf("read %s: %v", p, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Xattrs returns the xattrs of the entry at p (not followed if a
// symlink), by name.
func Xattrs(t testing.TB, p string) map[string]string {
	t.Helper()
	sz, err := unix.Llistxattr(p, nil)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	buf := make([]byte, sz)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	m := map[string]string{}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		vsz, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		v := make([]byte, vsz)
		vn, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		m[name] = string(v[:vn])
	}
	return m
}
