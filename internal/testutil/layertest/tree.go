package layertest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/proc"
)

// Times and owners of the trees that an old tar header cannot hold.
var (
	time1960 = time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)
	time2100 = time.Date(2100, 6, 1, 12, 0, 0, 0, time.UTC)
	time2300 = time.Date(2300, 3, 4, 5, 6, 7, 0, time.UTC)
)

// Owners beyond the 2^21-1 that a ustar octal field holds, up to ~2^31.
const (
	bigUID  = 3000000
	bigGID  = 4000000
	hugeUID = 2147483000
	hugeGID = 2147483600
)

// Paths well beyond ustar's 100/155 bytes.
var (
	longDir  = "d/" + strings.Repeat("long-directory-name-", 5) + "x"
	longName = longDir + "/" + strings.Repeat("file-name-", 13) + "end.txt"
	longLink = "../" + strings.Repeat("t", 150) + "/" + strings.Repeat("target-", 10)
)

// Directories WriteFullTree, WriteSimpleTree and WriteSparseTree create
// below their root, to archive with GNUTar.
const (
	FullTreeDir   = "d"
	SimpleTreeDir = "u"
	SparseTreeDir = "s"
)

// treeWriter creates files below root; after the first failure it does
// nothing and err holds the failure.
type treeWriter struct {
	root string
	err  error
}

func (w *treeWriter) p(name string) string { return filepath.Join(w.root, name) }

func (w *treeWriter) do(f func() error) {
	if w.err == nil {
		w.err = f()
	}
}

func (w *treeWriter) dir(name string, mode os.FileMode) {
	w.do(func() error { return os.MkdirAll(w.p(name), 0o755) })
	w.do(func() error { return os.Chmod(w.p(name), mode) })
}

// file writes data, then sets the owner before the mode (chown clears
// setuid).
func (w *treeWriter) file(name string, data []byte, mode os.FileMode, uid, gid int) {
	w.do(func() error { return os.WriteFile(w.p(name), data, 0o600) })
	w.do(func() error { return os.Lchown(w.p(name), uid, gid) })
	w.do(func() error { return os.Chmod(w.p(name), mode) })
}

func (w *treeWriter) node(name string, mode uint32, major, minor uint32) {
	w.do(func() error { return unix.Mknod(w.p(name), mode, int(unix.Mkdev(major, minor))) })
}

// touch sets the time of everything below name but symlinks (os.Chtimes
// follows links).
func (w *treeWriter) touch(name string, t time.Time) {
	w.do(func() error {
		return filepath.Walk(w.p(name), func(path string, info os.FileInfo, err error) error {
			if err != nil || info.Mode()&os.ModeSymlink != 0 {
				return err
			}
			return os.Chtimes(path, t, t)
		})
	})
}

// WriteFullTree creates root/d with one of everything a layer can hold:
// every file type, special mode bits, big and huge owners, times before
// 1970 and after 2038, long names and link targets, UTF-8 names, xattrs
// and hard links. It needs root (mknod, chown).
func WriteFullTree(root string) error {
	w := &treeWriter{root: root}
	w.dir("d", 0o755)
	w.dir("d/sub/deeper", 0o755)
	w.dir("d/sticky-dir", 0o755|os.ModeSticky)
	w.dir("d/setgid-dir", 0o775|os.ModeSetgid)
	w.dir("d/private", 0o700)
	w.dir("d/xattr-dir", 0o755)
	w.dir(longDir, 0o755)
	writeFullTreeFiles(w)
	writeFullTreeLinks(w)
	// Times last: adding entries changes directory mtimes.
	w.touch("d", ModTime)
	// Symlinks get a time of their own, so their mtime check cannot pass
	// by the coincidence of creation and extraction in the same second.
	w.do(func() error {
		_, err := proc.Output(context.Background(), nil, nil, "touch", "-h", "-d", "@1000000000",
			w.p("d/link"), w.p("d/dangling"), w.p("d/long-target"))
		return err
	})
	w.do(func() error { return os.Chtimes(w.p("d/old-1960"), time1960, time1960) })
	w.do(func() error { return os.Chtimes(w.p("d/future-2100"), time2100, time2100) })
	w.do(func() error { return os.Chtimes(w.p("d/text.txt"), ModTime, ModTime.Add(123456789*time.Nanosecond)) })
	return w.err
}

func writeFullTreeFiles(w *treeWriter) {
	w.file("d/empty", nil, 0o644, 0, 0)
	w.file("d/small.txt", []byte("hello, world\n"), 0o644, 0, 0)
	w.file("d/random.bin", Random(1, 3<<20+123), 0o644, 0, 0)
	w.file("d/text.txt", Text(2, 2<<20+77), 0o600, 1000, 1000)
	w.file("d/random-70k", Random(3, 70000), 0o640, 0, 0)
	w.file("d/exact-512", Random(4, 512), 0o644, 0, 0)
	w.file("d/exact-1024", Text(5, 1024), 0o644, 0, 0)
	w.file("d/setuid", []byte("#!/bin/sh\necho setuid\n"), 0o755|os.ModeSetuid, 1000, 0)
	w.file("d/setgid", []byte("#!/bin/sh\necho setgid\n"), 0o755|os.ModeSetgid, 0, 1000)
	w.file("d/sticky-file", []byte("sticky\n"), 0o644|os.ModeSticky, 0, 0)
	w.file("d/all-special", []byte("ugt\n"), 0o777|os.ModeSetuid|os.ModeSetgid|os.ModeSticky, 0, 0)
	w.file("d/mode000", []byte("no access\n"), 0, 0, 0)
	w.file("d/old-1960", []byte("from 1960\n"), 0o644, 0, 0)
	w.file("d/future-2100", []byte("from 2100\n"), 0o644, 0, 0)
	w.file("d/big-owner", []byte("uid 3000000\n"), 0o644, bigUID, bigGID)
	w.file("d/huge-owner", []byte("uid ~2^31\n"), 0o644, hugeUID, hugeGID)
	w.file("d/with space.txt", []byte("space\n"), 0o644, 0, 0)
	w.file("d/café-ü.txt", []byte("utf-8\n"), 0o644, 0, 0)
	w.file("d/sub/deeper/file", Text(6, 5000), 0o644, 0, 0)
	w.file("d/setgid-dir/inherits", []byte("x\n"), 0o644, 0, 0)
	w.file(longName, Random(7, 100000), 0o644, 0, 0)
	w.do(func() error { return os.Lchown(w.p("d/private"), 2097153, 2097154) })

	w.do(func() error { return unix.Setxattr(w.p("d/small.txt"), "user.x", []byte("value of x"), 0) })
	w.do(func() error { return unix.Setxattr(w.p("d/small.txt"), "user.other", []byte("a=b c"), 0) })
	w.do(func() error { return unix.Setxattr(w.p("d/xattr-dir"), "user.dirattr", []byte("on a directory"), 0) })
}

func writeFullTreeLinks(w *treeWriter) {
	w.do(func() error { return os.Symlink("small.txt", w.p("d/link")) })
	w.do(func() error { return os.Lchown(w.p("d/link"), bigUID+1, bigGID+1) })
	w.do(func() error { return os.Symlink("/nonexistent/target", w.p("d/dangling")) })
	w.do(func() error { return os.Symlink(longLink, w.p("d/long-target")) })
	w.do(func() error { return os.Symlink(longLink, w.p(longDir+"/"+strings.Repeat("symlink-", 15))) })
	w.do(func() error { return os.Link(w.p("d/small.txt"), w.p("d/hard")) })
	w.do(func() error { return os.Link(w.p("d/random.bin"), w.p("d/hard-random")) })
	w.do(func() error { return os.Link(w.p(longName), w.p("d/hard-to-long")) })

	w.node("d/null", unix.S_IFCHR|0o666, 1, 3)
	w.node("d/bigchar", unix.S_IFCHR|0o600, 300, 70000)
	w.node("d/loop", unix.S_IFBLK|0o660, 7, 0)
	w.node("d/bigblock", unix.S_IFBLK|0o600, 4095, 1048575)
	w.do(func() error { return unix.Mkfifo(w.p("d/fifo"), 0o600) })
	w.do(func() error { return os.Chmod(w.p("d/fifo"), 0o620) })
}

// WriteSimpleTree creates root/u with what the old ustar, oldgnu and v7
// formats can hold: short names (a 150-byte path that ustar splits into
// prefix and name), files, links and devices. It needs root (mknod).
func WriteSimpleTree(root string) error {
	w := &treeWriter{root: filepath.Join(root, "u")}
	deep := "sub/" + strings.Repeat("d", 50) + "/" + strings.Repeat("f", 90)
	w.dir(filepath.Dir(deep), 0o755)
	w.do(func() error { return os.WriteFile(w.p("file"), Random(60, 150000), 0o644) })
	w.do(func() error { return os.WriteFile(w.p("text"), Text(61, 50000), 0o600) })
	w.do(func() error { return os.WriteFile(w.p("empty"), nil, 0o644) })
	w.do(func() error { return os.WriteFile(w.p(deep), Text(62, 3000), 0o644) })
	w.do(func() error { return os.Chmod(w.p("empty"), 0o4755) })
	w.do(func() error { return os.Symlink("file", w.p("link")) })
	w.do(func() error { return os.Link(w.p("text"), w.p("hard")) })
	w.node("null", unix.S_IFCHR|0o666, 1, 3)
	w.do(func() error { return unix.Mkfifo(w.p("fifo"), 0o600) })
	w.touch(".", ModTime)
	return w.err
}

// WriteSparseTree creates root/s with sparse files (holes made by
// seeking) and one dense file.
func WriteSparseTree(root string) error {
	w := &treeWriter{root: filepath.Join(root, "s")}
	w.dir(".", 0o755)
	sparse := func(name string, size int64, chunks map[int64][]byte) {
		w.do(func() error {
			f, err := os.Create(w.p(name))
			if err != nil {
				return err
			}
			for off, b := range chunks {
				if _, err := f.WriteAt(b, off); err != nil {
					f.Close()
					return err
				}
			}
			return errors.Join(f.Truncate(size), f.Close(), os.Chtimes(f.Name(), ModTime, ModTime))
		})
	}
	sparse("holes", 4<<20, map[int64][]byte{0: Random(30, 4096), 1 << 20: Random(31, 10000), 3 << 20: Text(32, 100)})
	sparse("all-hole", 2<<20, nil)
	sparse("tail-data", 1<<20+4096, map[int64][]byte{1 << 20: Random(33, 4096)})
	many := map[int64][]byte{}
	for i := int64(0); i < 32; i++ {
		many[i*256<<10] = Random(uint64(40+i), 4096+int(i))
	}
	sparse("many-holes", 8<<20, many)
	w.do(func() error { return os.WriteFile(w.p("dense"), Random(34, 5000), 0o644) })
	w.do(func() error { return os.Chtimes(w.p("dense"), ModTime, ModTime) })
	return w.err
}

// GNUTar archives root/dir with GNU tar, members sorted by name, with the
// extra arguments (a --format, --sparse, --xattrs, --exclude ...).
func GNUTar(root, dir string, args ...string) ([]byte, error) {
	all := append([]string{"--sort=name", "-cf", "-", "-C", root}, args...)
	return proc.Output(context.Background(), nil, nil, "tar", append(all, dir)...)
}
