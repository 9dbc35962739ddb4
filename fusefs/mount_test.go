package fusefs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/internal/testutil/dirtest"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
	"github.com/spanpull/spanpull/internal/testutil/treediff"
)

// layerEntries has an entry of every kind the filesystem must present.
func layerEntries() []layertest.Entry {
	mtime := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	nsTime := time.Date(2022, 1, 2, 3, 4, 5, 987654321, time.UTC)
	big := make([]byte, 5<<20+128)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(big); i += 8 {
		binary.LittleEndian.PutUint64(big[i:], rng.Uint64())
	}
	longDir := "long/" + strings.Repeat("d", 120)
	es := []layertest.Entry{
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o751, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./dir/", Mode: 0o750, Uid: 1000, Gid: 1001, ModTime: mtime,
			PAXRecords: map[string]string{"SCHILY.xattr.user.dirattr": "on a dir"}}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/file.txt", Mode: 0o644, Uid: 1000, Gid: 1001, ModTime: mtime}, Data: []byte("hello, lazy world\n")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/empty", Mode: 0o600, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/shadow", Mode: 0, ModTime: mtime}, Data: []byte("secret")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/setuid", Mode: 0o4755, ModTime: mtime}, Data: []byte("#!/bin/sh\n")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/setgid", Mode: 0o2711, Gid: 50, ModTime: mtime}, Data: []byte("g")},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./dir/sticky/", Mode: 0o1777, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dir/big", Mode: 0o644, ModTime: mtime}, Data: big},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "./dir/link", Linkname: "file.txt", Mode: 0o777, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "./dir/abslink", Linkname: "/etc/passwd", Mode: 0o777, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "./dir/hard", Linkname: "./dir/file.txt", ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "./other/hard2", Linkname: "dir/file.txt", ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./dev/", Mode: 0o755, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "./dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "./dev/sda1", Mode: 0o660, Gid: 6, Devmajor: 8, Devminor: 1, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "./dev/nvme", Mode: 0o660, Devmajor: 259, Devminor: 300000, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "./dev/fifo", Mode: 0o644, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./xattrs", Mode: 0o644, ModTime: mtime, PAXRecords: map[string]string{
			"SCHILY.xattr.user.foo":     "bar",
			"SCHILY.xattr.user.bin":     "\x00\x01\xffbinary",
			"SCHILY.xattr.trusted.priv": "t",
			"LIBARCHIVE.xattr.user.no":  "ignored",
		}}, Data: []byte("has xattrs")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./nanos", Mode: 0o644, ModTime: nsTime, Format: tar.FormatPAX}, Data: []byte("ns")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dup", Mode: 0o644, ModTime: mtime}, Data: []byte("first version")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./dup", Mode: 0o640, ModTime: mtime}, Data: []byte("second")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./implicit/a/b.txt", Mode: 0o644, ModTime: mtime}, Data: []byte("b")},
		// long names: GNU long name/link records and PAX path/linkpath
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: longDir + "/" + strings.Repeat("g", 200), Mode: 0o644, ModTime: mtime, Format: tar.FormatGNU}, Data: []byte("gnu")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: longDir + "/" + strings.Repeat("p", 230), Mode: 0o644, ModTime: mtime, Format: tar.FormatPAX}, Data: []byte("pax")},
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "long/sym", Linkname: strings.Repeat("../", 60) + "x", Mode: 0o777, ModTime: mtime, Format: tar.FormatPAX}},
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "long/hard", Linkname: longDir + "/" + strings.Repeat("g", 200), ModTime: mtime, Format: tar.FormatGNU}},
		// OCI whiteouts and AUFS metadata
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./wh/", Mode: 0o755, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./wh/.wh.gone", Mode: 0o600, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./opq/", Mode: 0o755, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./opq/.wh..wh..opq", Mode: 0o600, ModTime: mtime}},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./opq/kept", Mode: 0o644, ModTime: mtime}, Data: []byte("kept")},
		{Header: tar.Header{Typeflag: tar.TypeReg, Name: "./.wh..wh.plnk/1.2", Mode: 0o644, ModTime: mtime}, Data: []byte("aufs")},
	}
	return es
}

// TestMountMatchesGNUTar mounts a layer and checks that it looks like what
// GNU tar extracts from the same tar, whiteouts aside.
func TestMountMatchesGNUTar(t *testing.T) {
	layer := layertest.Tar(t, layerEntries()...)
	files, _ := toctest.FromTar(t, layer)
	src := &memSource{b: layer, files: files}
	mnt := mountTOC(t, files, src, Options{})

	tarFile := filepath.Join(t.TempDir(), "layer.tar")
	if err := os.WriteFile(tarFile, layer, 0o644); err != nil {
		t.Fatal(err)
	}
	want := t.TempDir()
	out, err := exec.Command("tar", "-xpf", tarFile, "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", want).CombinedOutput()
	if err != nil {
		t.Fatalf("GNU tar: %v\n%s", err, out)
	}

	synthesized := map[string]bool{"other": true, "implicit": true, "implicit/a": true, "long": true, "long/" + strings.Repeat("d", 120): true}
	// GNU tar path -> FUSE path ("" for names that must not show)
	seen := map[string]bool{}
	inoMap := map[uint64]uint64{}
	revIno := map[uint64]uint64{}
	walkRel(t, want, func(rel, p string, d fs.DirEntry) error {
		base := filepath.Base(rel)
		switch {
		case strings.HasPrefix(rel, ".wh..wh.plnk"):
			return nil
		case base == ".wh..wh..opq":
			dirPath := filepath.Join(mnt, filepath.Dir(rel))
			if v := getxattr(t, dirPath, OpaqueXattr); v != "y" {
				t.Errorf("%s: %s = %q, want y", filepath.Dir(rel), OpaqueXattr, v)
			}
			if _, err := os.Lstat(filepath.Join(mnt, rel)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s is shown: %v", rel, err)
			}
			return nil
		case strings.HasPrefix(base, ".wh."):
			name := filepath.Join(filepath.Dir(rel), strings.TrimPrefix(base, ".wh."))
			seen[name] = true
			st := lstat(t, filepath.Join(mnt, name))
			if st.Mode != syscall.S_IFCHR || st.Rdev != 0 {
				t.Errorf("%s: mode %o rdev %d, want a 0/0 char device with mode 0", name, st.Mode, st.Rdev)
			}
			if _, err := os.Lstat(filepath.Join(mnt, rel)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s is shown: %v", rel, err)
			}
			return nil
		}
		seen[rel] = true
		g := lstat(t, p)
		f := lstat(t, filepath.Join(mnt, rel))
		if synthesized[rel] {
			if f.Mode != syscall.S_IFDIR|0o755 || f.Uid != 0 || f.Gid != 0 || f.Mtim.Sec != 0 {
				t.Errorf("%s: synthesized dir has mode %o uid %d gid %d mtime %d", rel, f.Mode, f.Uid, f.Gid, f.Mtim.Sec)
			}
			if f.Nlink != g.Nlink {
				t.Errorf("%s: nlink %d, GNU tar %d", rel, f.Nlink, g.Nlink)
			}
			return nil
		}
		if rel == "" {
			// GNU tar also extracted the AUFS metadata dir.
			g.Nlink--
		}
		compareStat(t, rel, g, f)
		if prev, ok := inoMap[g.Ino]; ok && prev != f.Ino {
			t.Errorf("%s: inode %d, but its hardlinks have %d", rel, f.Ino, prev)
		}
		if prev, ok := revIno[f.Ino]; ok && prev != g.Ino {
			t.Errorf("%s: inode %d is shared with a file that is not its hardlink", rel, f.Ino)
		}
		inoMap[g.Ino], revIno[f.Ino] = f.Ino, g.Ino
		if d.Type()&fs.ModeSymlink != 0 {
			gl, _ := os.Readlink(p)
			fl, err := os.Readlink(filepath.Join(mnt, rel))
			if err != nil || gl != fl {
				t.Errorf("%s: readlink %q, %v; GNU tar %q", rel, fl, err, gl)
			}
		} else {
			gx, fx := treediff.Xattrs(t, p), treediff.Xattrs(t, filepath.Join(mnt, rel))
			if _, err := os.Lstat(filepath.Join(p, ".wh..wh..opq")); err == nil {
				gx[OpaqueXattr] = "y"
			}
			if !maps.Equal(gx, fx) {
				t.Errorf("%s: xattrs %q, GNU tar %q", rel, fx, gx)
			}
		}
		if d.Type().IsRegular() {
			gb, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			fb, err := os.ReadFile(filepath.Join(mnt, rel))
			if err != nil {
				t.Errorf("read %s: %v", rel, err)
			} else if !bytes.Equal(gb, fb) {
				t.Errorf("%s: content differs (%d bytes, GNU tar %d)", rel, len(fb), len(gb))
			}
		}
		return nil
	})
	// Nothing more is shown than GNU tar extracted.
	walkRel(t, mnt, func(rel, _ string, _ fs.DirEntry) error {
		if !seen[rel] {
			t.Errorf("%s is shown but GNU tar did not extract it", rel)
		}
		return nil
	})
	src.check(t)
}

// walkRel walks the tree at root like filepath.WalkDir, calling fn with
// each path relative to root ("" for root itself) and as walked, and
// fails the test on an error from the walk or fn.
func walkRel(t *testing.T, root string, fn func(rel, p string, d fs.DirEntry) error) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			rel = ""
		}
		return fn(rel, p, d)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func compareStat(t *testing.T, rel string, g, f *syscall.Stat_t) {
	t.Helper()
	if g.Mode != f.Mode {
		t.Errorf("%s: mode %o, GNU tar %o", rel, f.Mode, g.Mode)
	}
	if g.Uid != f.Uid || g.Gid != f.Gid {
		t.Errorf("%s: owner %d:%d, GNU tar %d:%d", rel, f.Uid, f.Gid, g.Uid, g.Gid)
	}
	if g.Mode&syscall.S_IFMT != syscall.S_IFDIR && g.Size != f.Size {
		t.Errorf("%s: size %d, GNU tar %d", rel, f.Size, g.Size)
	}
	if g.Mtim != f.Mtim {
		t.Errorf("%s: mtime %v, GNU tar %v", rel, f.Mtim, g.Mtim)
	}
	if f.Atim != f.Mtim || f.Ctim != f.Mtim {
		t.Errorf("%s: atime %v ctime %v differ from mtime %v", rel, f.Atim, f.Ctim, f.Mtim)
	}
	if g.Nlink != f.Nlink {
		t.Errorf("%s: nlink %d, GNU tar %d", rel, f.Nlink, g.Nlink)
	}
	if g.Rdev != f.Rdev {
		t.Errorf("%s: rdev %#x, GNU tar %#x", rel, f.Rdev, g.Rdev)
	}
}

func getxattr(t *testing.T, p, name string) string {
	t.Helper()
	buf := make([]byte, 256)
	n, err := unix.Lgetxattr(p, name, buf)
	if err != nil {
		t.Errorf("getxattr %s %s: %v", p, name, err)
		return ""
	}
	return string(buf[:n])
}

func TestReadOnly(t *testing.T) {
	mnt := mountLayer(t, layertest.Reg("f", 0o666, []byte("data")), layertest.Dir("d/", 0o777))
	checks := map[string]error{}
	checks["write"] = os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o666)
	_, err := os.OpenFile(filepath.Join(mnt, "f"), os.O_RDWR, 0)
	checks["open rw"] = err
	checks["create"] = os.WriteFile(filepath.Join(mnt, "d/new"), []byte("x"), 0o666)
	checks["mkdir"] = os.Mkdir(filepath.Join(mnt, "d/sub"), 0o755)
	checks["chmod"] = os.Chmod(filepath.Join(mnt, "f"), 0o600)
	checks["remove"] = os.Remove(filepath.Join(mnt, "f"))
	checks["rename"] = os.Rename(filepath.Join(mnt, "f"), filepath.Join(mnt, "g"))
	checks["setxattr"] = unix.Setxattr(filepath.Join(mnt, "f"), "user.x", []byte("y"), 0)
	for what, err := range checks {
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", what, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(b) != "data" {
		t.Errorf("read f = %q, %v", b, err)
	}
}

// failingSource fails every read, or returns short reads without error.
type failingSource struct{ short bool }

func (s failingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if s.short {
		return len(p) / 2, nil
	}
	return 0, errors.New("span 3 digest mismatch")
}

func TestReadErrorIsEIO(t *testing.T) {
	layer := layertest.Tar(t, layertest.Reg("f", 0o644, []byte(strings.Repeat("x", 10000))), layertest.Reg("empty", 0o644, nil))
	files, _ := toctest.FromTar(t, layer)
	for _, short := range []bool{false, true} {
		var logs syncio.Buffer
		logger := logrus.New()
		logger.SetOutput(&logs)
		mnt := mountTOC(t, files, failingSource{short: short}, Options{Logger: logrus.NewEntry(logger)})
		_, err := os.ReadFile(filepath.Join(mnt, "f"))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("short=%v: read = %v, want EIO", short, err)
		}
		wantLog := "span 3 digest mismatch"
		if short {
			wantLog = "unexpected EOF"
		}
		if !strings.Contains(logs.String(), wantLog) || !strings.Contains(logs.String(), "path=f") {
			t.Errorf("short=%v: log %q does not report %q for f", short, logs.String(), wantLog)
		}
		// Metadata and empty files need no data.
		if b, err := os.ReadFile(filepath.Join(mnt, "empty")); err != nil || len(b) != 0 {
			t.Errorf("short=%v: read empty = %q, %v", short, b, err)
		}
		if fi, err := os.Stat(filepath.Join(mnt, "f")); err != nil || fi.Size() != 10000 {
			t.Errorf("short=%v: stat f = %v, %v", short, fi, err)
		}
	}
}

// TestConcurrentReads reads a big file from many goroutines at random
// offsets through the kernel.
func TestConcurrentReads(t *testing.T) {
	data := make([]byte, 3<<20+7)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	layer := layertest.Tar(t, layertest.Reg("a", 0o644, []byte("small")), layertest.Reg("big", 0o644, data))
	files, _ := toctest.FromTar(t, layer)
	src := &memSource{b: layer, files: files}
	mnt := mountTOC(t, files, src, Options{})
	f, err := os.Open(filepath.Join(mnt, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 9))
			buf := make([]byte, 200000)
			for range 20 {
				off := r.Int64N(int64(len(data)))
				n, err := f.ReadAt(buf, off)
				if err != nil && !errors.Is(err, io.EOF) {
					t.Errorf("read at %d: %v", off, err)
					return
				}
				if !bytes.Equal(buf[:n], data[off:off+int64(n)]) || (n < len(buf) && off+int64(n) != int64(len(data))) {
					t.Errorf("read at %d: wrong bytes (%d)", off, n)
					return
				}
			}
		}()
	}
	wg.Wait()
	src.check(t)
}

func TestStatfsAndReaddir(t *testing.T) {
	var es []layertest.Entry
	var names []string
	for i := range 300 {
		name := "d/" + strings.Repeat("n", i%50+1) + string(rune('a'+i%26)) + "-" + string(rune('A'+i/26))
		es = append(es, layertest.Reg(name, 0o644, []byte("12345")))
		names = append(names, filepath.Base(name))
	}
	mnt := mountLayer(t, es...)
	got := dirtest.Names(t, filepath.Join(mnt, "d"))
	sort.Strings(names)
	if strings.Join(got, ",") != strings.Join(names, ",") {
		t.Errorf("readdir = %v, want %v", got, names)
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Files != 302 || st.Blocks != 1 || st.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("statfs: files %d blocks %d flags %#x", st.Files, st.Blocks, st.Flags)
	}
}

func TestMountTwiceFails(t *testing.T) {
	root := newRoot(t, nil, &memSource{}, Options{})
	srv, err := Mount(context.Background(), t.TempDir(), root, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Unmount()
	if _, err := Mount(context.Background(), t.TempDir(), root, MountOptions{}); err == nil {
		t.Error("second Mount of the same root succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	root2 := newRoot(t, nil, &memSource{}, Options{})
	if _, err := Mount(ctx, t.TempDir(), root2, MountOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Mount with a canceled context = %v", err)
	}
}

// TestPermissions reads as an unprivileged user: the mount allows other
// users and the kernel enforces the layer's modes.
func TestPermissions(t *testing.T) {
	mnt := mountLayer(t,
		layertest.Reg("public", 0o644, []byte("public data")),
		layertest.Reg("secret", 0o600, []byte("secret data")),
		layertest.Dir("closed/", 0o700),
		layertest.Reg("closed/f", 0o644, []byte("hidden")),
	)
	// let the user reach the mountpoint
	for p := filepath.Dir(mnt); p != "/" && p != os.TempDir(); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cat := func(p string) (string, error) {
		cmd := exec.Command("cat", filepath.Join(mnt, p))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := cat("public"); err != nil || out != "public data" {
		t.Errorf("nobody reading public: %q, %v", out, err)
	}
	for _, p := range []string{"secret", "closed/f"} {
		if out, err := cat(p); err == nil || !strings.Contains(out, "Permission denied") {
			t.Errorf("nobody reading %s: %q, %v; want permission denied", p, out, err)
		}
	}
}
