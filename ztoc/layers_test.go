package ztoc

// Test-only generators of tar layers for the conformance tests: trees on
// disk archived by GNU tar (as root, so devices, owners and setuid bits are
// real), tars written with archive/tar for what GNU tar cannot produce, and
// the compressions a layer can arrive in. Everything is deterministic.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// cfTar is a generated uncompressed tar stream.
type cfTar struct {
	name string
	tar  []byte
}

// cfCompression turns a tar stream into a layer blob.
type cfCompression struct {
	name     string
	compress func(t testing.TB, tarball []byte) []byte
}

// cfRandom returns n deterministic pseudo-random (incompressible) bytes.
func cfRandom(seed uint64, n int) []byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(s).Read(b)
	return b
}

// cfText returns n bytes of compressible text.
func cfText(seed, n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %08d of text %d: the quick brown fox jumps over the lazy dog %x\n", i, seed, i*i)
	}
	return b.Bytes()[:n]
}

// cfRun runs a command and returns its stdout; it fails the test with the
// command's stderr when the command fails.
func cfRun(t testing.TB, stdin []byte, env []string, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

// Fixed times used by the generated trees.
var (
	cfTime1960 = time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)
	cfTime2100 = time.Date(2100, 6, 1, 12, 0, 0, 0, time.UTC)
	cfTime2300 = time.Date(2300, 3, 4, 5, 6, 7, 0, time.UTC)
	cfTimeBase = time.Date(2021, 2, 3, 4, 5, 6, 0, time.UTC)
)

// Owners beyond the 2^21-1 that a ustar octal field holds, up to ~2^31.
const (
	cfBigUID  = 3000000
	cfBigGID  = 4000000
	cfHugeUID = 2147483000
	cfHugeGID = 2147483600
)

// cfLongDir and cfLongName make paths well beyond ustar's 100/155 bytes.
var (
	cfLongDir  = "d/" + strings.Repeat("long-directory-name-", 5) + "x"
	cfLongName = cfLongDir + "/" + strings.Repeat("file-name-", 13) + "end.txt"
	cfLongLink = "../" + strings.Repeat("t", 150) + "/" + strings.Repeat("target-", 10)
)

// cfMakeTree creates, under root, the directory "d" with one of everything
// a layer can hold. It needs root (mknod, chown).
func cfMakeTree(t testing.TB, root string) {
	t.Helper()
	p := func(name string) string { return filepath.Join(root, name) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	dir := func(name string, mode os.FileMode) {
		t.Helper()
		must(os.MkdirAll(p(name), 0o755))
		must(os.Chmod(p(name), mode))
	}
	// file writes data, then sets owner before mode (chown clears setuid).
	file := func(name string, data []byte, mode os.FileMode, uid, gid int) {
		t.Helper()
		must(os.WriteFile(p(name), data, 0o600))
		must(os.Lchown(p(name), uid, gid))
		must(os.Chmod(p(name), mode))
	}
	dir("d", 0o755)
	dir("d/sub/deeper", 0o755)
	dir("d/sticky-dir", 0o755|os.ModeSticky)
	dir("d/setgid-dir", 0o775|os.ModeSetgid)
	dir("d/private", 0o700)
	dir("d/xattr-dir", 0o755)
	dir(cfLongDir, 0o755)

	file("d/empty", nil, 0o644, 0, 0)
	file("d/small.txt", []byte("hello, world\n"), 0o644, 0, 0)
	file("d/random.bin", cfRandom(1, 3<<20+123), 0o644, 0, 0)
	file("d/text.txt", cfText(2, 2<<20+77), 0o600, 1000, 1000)
	file("d/random-70k", cfRandom(3, 70000), 0o640, 0, 0)
	file("d/exact-512", cfRandom(4, 512), 0o644, 0, 0)
	file("d/exact-1024", cfText(5, 1024), 0o644, 0, 0)
	file("d/setuid", []byte("#!/bin/sh\necho setuid\n"), 0o755|os.ModeSetuid, 1000, 0)
	file("d/setgid", []byte("#!/bin/sh\necho setgid\n"), 0o755|os.ModeSetgid, 0, 1000)
	file("d/sticky-file", []byte("sticky\n"), 0o644|os.ModeSticky, 0, 0)
	file("d/all-special", []byte("ugt\n"), 0o777|os.ModeSetuid|os.ModeSetgid|os.ModeSticky, 0, 0)
	file("d/mode000", []byte("no access\n"), 0, 0, 0)
	file("d/old-1960", []byte("from 1960\n"), 0o644, 0, 0)
	file("d/future-2100", []byte("from 2100\n"), 0o644, 0, 0)
	file("d/big-owner", []byte("uid 3000000\n"), 0o644, cfBigUID, cfBigGID)
	file("d/huge-owner", []byte("uid ~2^31\n"), 0o644, cfHugeUID, cfHugeGID)
	file("d/with space.txt", []byte("space\n"), 0o644, 0, 0)
	file("d/café-ü.txt", []byte("utf-8\n"), 0o644, 0, 0)
	file("d/sub/deeper/file", cfText(6, 5000), 0o644, 0, 0)
	file("d/setgid-dir/inherits", []byte("x\n"), 0o644, 0, 0)
	file(cfLongName, cfRandom(7, 100000), 0o644, 0, 0)
	must(os.Lchown(p("d/private"), 2097153, 2097154))

	must(syscall.Setxattr(p("d/small.txt"), "user.x", []byte("value of x"), 0))
	must(syscall.Setxattr(p("d/small.txt"), "user.other", []byte("a=b c"), 0))
	must(syscall.Setxattr(p("d/xattr-dir"), "user.dirattr", []byte("on a directory"), 0))

	must(os.Symlink("small.txt", p("d/link")))
	must(os.Lchown(p("d/link"), cfBigUID+1, cfBigGID+1))
	must(os.Symlink("/nonexistent/target", p("d/dangling")))
	must(os.Symlink(cfLongLink, p("d/long-target")))
	must(os.Symlink(cfLongLink, p(cfLongDir+"/"+strings.Repeat("symlink-", 15))))
	must(os.Link(p("d/small.txt"), p("d/hard")))
	must(os.Link(p("d/random.bin"), p("d/hard-random")))
	must(os.Link(p(cfLongName), p("d/hard-to-long")))

	must(syscall.Mknod(p("d/null"), syscall.S_IFCHR|0o666, int(cfMkdev(1, 3))))
	must(syscall.Mknod(p("d/bigchar"), syscall.S_IFCHR|0o600, int(cfMkdev(300, 70000))))
	must(syscall.Mknod(p("d/loop"), syscall.S_IFBLK|0o660, int(cfMkdev(7, 0))))
	must(syscall.Mknod(p("d/bigblock"), syscall.S_IFBLK|0o600, int(cfMkdev(4095, 1048575))))
	must(syscall.Mkfifo(p("d/fifo"), 0o600))
	must(os.Chmod(p("d/fifo"), 0o620))

	// Times last: adding entries changes directory mtimes. Symlinks keep
	// their creation time (os.Chtimes follows links).
	err := filepath.Walk(p("d"), func(path string, info os.FileInfo, err error) error {
		if err != nil || info.Mode()&os.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(path, cfTimeBase, cfTimeBase)
	})
	must(err)
	// Symlinks get a time of their own, so their mtime check cannot pass
	// by the coincidence of creation and extraction in the same second.
	cfRun(t, nil, nil, "touch", "-h", "-d", "@1000000000", p("d/link"), p("d/dangling"), p("d/long-target"))
	must(os.Chtimes(p("d/old-1960"), cfTime1960, cfTime1960))
	must(os.Chtimes(p("d/future-2100"), cfTime2100, cfTime2100))
	must(os.Chtimes(p("d/text.txt"), cfTimeBase, cfTimeBase.Add(123456789*time.Nanosecond)))
}

// cfMakeSimpleTree creates, under root, the directory "u" with what the
// old ustar, oldgnu and v7 formats can hold: short names (a 150-byte path
// that ustar splits into prefix and name), files, links and devices.
func cfMakeSimpleTree(t testing.TB, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(name string) string { return filepath.Join(root, "u", name) }
	deep := "sub/" + strings.Repeat("d", 50) + "/" + strings.Repeat("f", 90)
	must(os.MkdirAll(filepath.Dir(p(deep)), 0o755))
	must(os.WriteFile(p("file"), cfRandom(60, 150000), 0o644))
	must(os.WriteFile(p("text"), cfText(61, 50000), 0o600))
	must(os.WriteFile(p("empty"), nil, 0o644))
	must(os.WriteFile(p(deep), cfText(62, 3000), 0o644))
	must(os.Chmod(p("empty"), 0o4755))
	must(os.Symlink("file", p("link")))
	must(os.Link(p("text"), p("hard")))
	must(syscall.Mknod(p("null"), syscall.S_IFCHR|0o666, int(cfMkdev(1, 3))))
	must(syscall.Mkfifo(p("fifo"), 0o600))
	must(filepath.Walk(filepath.Join(root, "u"), func(path string, info os.FileInfo, err error) error {
		if err != nil || info.Mode()&os.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(path, cfTimeBase, cfTimeBase)
	}))
}

// cfGNUTarOf archives root/dir with GNU tar.
func cfGNUTarOf(t testing.TB, root, dir string, args ...string) []byte {
	t.Helper()
	all := append([]string{"--sort=name", "-cf", "-", "-C", root}, args...)
	return cfRun(t, nil, nil, "tar", append(all, dir)...)
}

// cfMkdev encodes a Linux device number.
func cfMkdev(major, minor uint64) uint64 {
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12 | (major&^0xfff)<<32
}

// cfDevMajor and cfDevMinor decode a Linux device number.
func cfDevMajor(dev uint64) int64 { return int64((dev>>8)&0xfff | (dev>>32)&^0xfff) }
func cfDevMinor(dev uint64) int64 { return int64(dev&0xff | (dev>>12)&^0xff) }

// cfGNUTar archives root/d with GNU tar in the given format.
func cfGNUTar(t testing.TB, root string, args ...string) []byte {
	t.Helper()
	all := append([]string{"--sort=name", "-cf", "-", "-C", root}, args...)
	return cfRun(t, nil, nil, "tar", append(all, "d")...)
}

var (
	cfTarsOnce sync.Once
	cfTars     []cfTar
	cfTarsErr  error
)

// cfGeneratedTars returns the generated tars shared by the conformance
// tests: the tree in GNU and PAX format, archive/tar-made edge cases, and
// span-boundary tars for 16 KiB and 64 KiB spans.
func cfGeneratedTars(t testing.TB) []cfTar {
	t.Helper()
	cfTarsOnce.Do(func() {
		cfTars, cfTarsErr = cfMakeTars()
	})
	if cfTarsErr != nil {
		t.Fatal(cfTarsErr)
	}
	return cfTars
}

// cfMakeTars builds the shared tars, reporting a failure as an error (it
// runs once, outside any one test).
func cfMakeTars() (tars []cfTar, err error) {
	rt := &cfRecorder{}
	defer func() {
		if r := recover(); r != nil {
			if r != cfFatal {
				panic(r)
			}
			err = fmt.Errorf("generate test tars: %s", rt.msg)
		}
	}()
	root, err := os.MkdirTemp("", "ztoc-conformance-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	cfMakeTree(rt, root)
	cfMakeSimpleTree(rt, root)
	tars = append(tars,
		cfTar{"gnu", cfGNUTar(rt, root, "--format=gnu")},
		cfTar{"posix", cfGNUTar(rt, root, "--format=posix", "--xattrs", "--xattrs-include=*",
			"--pax-option=globexthdr.name=pax_global_header,comment=spanpull-conformance")},
		cfTar{"ustar", cfGNUTarOf(rt, root, "u", "--format=ustar")},
		cfTar{"oldgnu", cfGNUTarOf(rt, root, "u", "--format=oldgnu")},
		cfTar{"v7", cfGNUTarOf(rt, root, "u", "--format=v7", "--exclude=u/null", "--exclude=u/fifo", "--exclude=u/sub")},
		cfTar{"gotar", cfGoTar(rt)},
		cfTar{"edge16k", cfEdgeTar(rt, 16<<10)},
		cfTar{"edge64k", cfEdgeTar(rt, 64<<10)},
	)
	return tars, nil
}

// cfRecorder is a testing.TB for code that runs outside a test (shared
// fixtures): Fatal records the message and unwinds with a panic.
type cfRecorder struct {
	testing.TB
	msg string
}

var cfFatal = new(int)

func (r *cfRecorder) Helper() {}
func (r *cfRecorder) Fatal(args ...any) {
	r.msg = fmt.Sprint(args...)
	panic(cfFatal)
}
func (r *cfRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	panic(cfFatal)
}

// cfWriteTar writes headers (and data for regular files) with archive/tar.
func cfWriteTar(t testing.TB, entries []cfEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if e.data != nil {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatalf("write tar data %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// cfEntry is one archive/tar entry to write.
type cfEntry struct {
	hdr  tar.Header
	data []byte
}

// cfGoTar makes what GNU tar cannot be asked for directly: a PAX global
// header from archive/tar, PAX xattrs with awkward values, GNU base-256
// owners and times, GNU long names/link targets, an mtime past what an
// octal field holds, duplicate names and "./" prefixes.
func cfGoTar(t testing.TB) []byte {
	t.Helper()
	mt := cfTimeBase
	reg := func(name string, data []byte, f tar.Format) cfEntry {
		return cfEntry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: mt, Format: f}, data}
	}
	e := []cfEntry{
		{hdr: tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header", PAXRecords: map[string]string{"comment": "made by archive/tar"}}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: mt}},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "./dot/", Mode: 0o750, ModTime: mt}},
		{tar.Header{Typeflag: tar.TypeReg, Name: "./dot/xattr.txt", Mode: 0o644, ModTime: mt, Format: tar.FormatPAX,
			PAXRecords: map[string]string{
				"SCHILY.xattr.user.x":       "x-value",
				"SCHILY.xattr.user.newline": "a=b\nc d",
				"SCHILY.xattr.user.empty":   "",
			}}, cfText(10, 3000)},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "go/", Mode: 0o755, ModTime: mt}},
		reg("go/ustar-plain", cfRandom(11, 12345), tar.FormatUSTAR),
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/gnu-base256-owner", Mode: 0o600, Uid: 5000000, Gid: 6000000, ModTime: mt, Format: tar.FormatGNU}, []byte("base-256\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/pax-owner", Mode: 0o600, Uid: 2147483647, Gid: 2147483646, ModTime: mt, Format: tar.FormatPAX}, []byte("pax uid\n")},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "go/gnu-owned-dir/", Mode: 0o711, Uid: 2097152, Gid: 2097152, ModTime: mt, Format: tar.FormatGNU}},
		reg("go/gnu-long-"+strings.Repeat("n", 150), cfText(12, 777), tar.FormatGNU),
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "go/gnu-long-link", Linkname: strings.Repeat("l", 200) + "/target", Mode: 0o777, ModTime: mt, Format: tar.FormatGNU}},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/gnu-1960", Mode: 0o644, ModTime: cfTime1960, Format: tar.FormatGNU}, []byte("1960\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/pax-1960", Mode: 0o644, ModTime: cfTime1960, Format: tar.FormatPAX}, []byte("1960\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/ustar-2100", Mode: 0o644, ModTime: cfTime2100, Format: tar.FormatUSTAR}, []byte("2100\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/pax-2300", Mode: 0o644, ModTime: cfTime2300, Format: tar.FormatPAX}, []byte("2300\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/pax-nanos", Mode: 0o644, ModTime: mt.Add(987654321), Format: tar.FormatPAX}, []byte("nanos\n")},
		reg("go/dup", []byte("first version\n"), tar.FormatUSTAR),
		reg("go/exact-1536", cfRandom(13, 1536), tar.FormatUSTAR),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "go/hardlink", Linkname: "./dot/xattr.txt", ModTime: mt}},
		{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "go/char", Mode: 0o600, Devmajor: 4095, Devminor: 1048575, ModTime: mt}},
		{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "go/block", Mode: 0o600, Devmajor: 8, Devminor: 1, ModTime: mt}},
		{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "go/fifo", Mode: 0o644, ModTime: mt}},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/setuid", Mode: 0o4755, ModTime: mt}, []byte("#!/bin/true\n")},
		reg("go/empty", []byte{}, tar.FormatUSTAR),
		reg("go/dup", []byte("second version, the one that stays\n"), tar.FormatUSTAR),
		reg("go/after-dup", cfRandom(14, 200000), tar.FormatUSTAR),
	}
	return cfWriteTar(t, e)
}

// cfEdge describes where a file of an edge tar must sit relative to the
// span grid of an uncompressed layer with span size S.
type cfEdge struct {
	name             string
	startsOn, endsOn bool // data starts / ends exactly on a multiple of S
	spansCrossed     int  // span boundaries strictly inside the data
}

// cfEdgeFiles lists the files of cfEdgeTar(S) and where they sit: with
// 512-byte ustar headers, "a" holds [512, S), "b" [S+512, 2S-512), "c"
// [2S, 3S), "d" [3S+512, 4S+1512), "e" [4S+2048, 6S+2148).
var cfEdgeFiles = []cfEdge{
	{name: "edge/a", endsOn: true},
	{name: "edge/b"},
	{name: "edge/c", startsOn: true, endsOn: true},
	{name: "edge/d", spansCrossed: 1},
	{name: "edge/e", spansCrossed: 2},
}

// cfEdgeTar writes a ustar archive laid out for span size s (see
// cfEdgeFiles).
func cfEdgeTar(t testing.TB, s int) []byte {
	t.Helper()
	reg := func(name string, data []byte) cfEntry {
		return cfEntry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: cfTimeBase, Format: tar.FormatUSTAR}, data}
	}
	return cfWriteTar(t, []cfEntry{
		reg("edge/a", cfRandom(20, s-512)),
		reg("edge/b", cfText(21, s-1024)),
		reg("edge/c", cfRandom(22, s)),
		reg("edge/d", cfText(23, s+1000)),
		reg("edge/e", cfRandom(24, 2*s+100)),
		reg("edge/empty", []byte{}),
	})
}

// cfSparseTree creates root/s with sparse files (holes made by seeking).
func cfSparseTree(t testing.TB, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "s"), 0o755))
	sparse := func(name string, size int64, chunks map[int64][]byte) {
		t.Helper()
		f, err := os.Create(filepath.Join(root, "s", name))
		must(err)
		for off, b := range chunks {
			_, err := f.WriteAt(b, off)
			must(err)
		}
		must(f.Truncate(size))
		must(f.Close())
		must(os.Chtimes(f.Name(), cfTimeBase, cfTimeBase))
	}
	sparse("holes", 4<<20, map[int64][]byte{0: cfRandom(30, 4096), 1 << 20: cfRandom(31, 10000), 3 << 20: cfText(32, 100)})
	sparse("all-hole", 2<<20, nil)
	sparse("tail-data", 1<<20+4096, map[int64][]byte{1 << 20: cfRandom(33, 4096)})
	sparse("many-holes", 8<<20, func() map[int64][]byte {
		m := map[int64][]byte{}
		for i := int64(0); i < 32; i++ {
			m[i*256<<10] = cfRandom(uint64(40+i), 4096+int(i))
		}
		return m
	}())
	must(os.WriteFile(filepath.Join(root, "s", "dense"), cfRandom(34, 5000), 0o644))
	must(os.Chtimes(filepath.Join(root, "s", "dense"), cfTimeBase, cfTimeBase))
}

// cfSparseTar archives a sparse tree with GNU tar --sparse in the given
// format arguments.
func cfSparseTar(t testing.TB, args ...string) []byte {
	t.Helper()
	root := t.TempDir()
	cfSparseTree(t, root)
	all := append([]string{"--sparse", "--sort=name", "-cf", "-", "-C", root}, args...)
	return cfRun(t, nil, nil, "tar", append(all, "s")...)
}

// cfGzipCLI compresses with the gzip command: -n leaves out FNAME.
func cfGzipCLI(level string) func(testing.TB, []byte) []byte {
	return func(t testing.TB, b []byte) []byte {
		return cfRun(t, b, nil, "gzip", "-n", level, "-c")
	}
}

// cfCompressions is every way a layer is compressed in the conformance
// tests.
var cfCompressions = []cfCompression{
	{"tar", func(_ testing.TB, b []byte) []byte { return b }},
	{"gzip-1", cfGzipCLI("-1")},
	{"gzip-6", cfGzipCLI("-6")},
	{"gzip-9", cfGzipCLI("-9")},
	{"gzip-6-fname", func(t testing.TB, b []byte) []byte {
		// gzip of a named file stores FNAME and MTIME.
		dir := t.TempDir()
		name := filepath.Join(dir, "layer-with-a-name.tar")
		if err := os.WriteFile(name, b, 0o644); err != nil {
			t.Fatal(err)
		}
		out := cfRun(t, nil, nil, "gzip", "-6", "-c", name)
		if out[3]&0x08 == 0 {
			t.Fatalf("gzip did not set FNAME (flags %#x)", out[3])
		}
		return out
	}},
	{"gzip-extra-comment", func(t testing.TB, b []byte) []byte {
		if len(b) < 1<<20 {
			return cfGoGzip(t, b, gzip.Header{Name: "layer.tar", Comment: "spanpull conformance layer",
				Extra: []byte{'S', 'P', 6, 0, 'e', 'x', 't', 'r', 'a', '!'}, ModTime: cfTimeBase, OS: 3})
		}
		// compress/flate is slow under -race: big tars get the same header
		// fields on gzip's deflate stream.
		return cfRewriteGzipHeader(t, cfGzipCLI("-6")(t, b), []byte{'S', 'P', 6, 0, 'e', 'x', 't', 'r', 'a', '!'}, "layer.tar", "spanpull conformance layer", false)
	}},
	{"gzip-multi", cfMultiMember},
	{"gzip-multi-tiny", func(t testing.TB, b []byte) []byte {
		// Many small members: checkpoints fall right after member headers.
		return cfRun(t, b, nil, "split", "-b", "20011", "--filter=gzip -n -6", "-")
	}},
	{"gzip-stored", func(t testing.TB, b []byte) []byte {
		var buf bytes.Buffer
		zw, err := gzip.NewWriterLevel(&buf, gzip.NoCompression)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := zw.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}},
	{"gzip-fhcrc", func(t testing.TB, b []byte) []byte {
		// compress/gzip never writes FHCRC.
		return cfRewriteGzipHeader(t, cfGzipCLI("-6")(t, b), nil, "with-header-crc.tar", "", true)
	}},
	{"pigz", func(t testing.TB, b []byte) []byte {
		// pigz ends each 128 KiB block with an empty stored block.
		return cfRun(t, b, nil, "pigz", "-n", "-6", "-p", "2", "-c")
	}},
}

// cfGoGzip compresses with compress/gzip and the given header.
func cfGoGzip(t testing.TB, b []byte, h gzip.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.DefaultCompression)
	if err != nil {
		t.Fatal(err)
	}
	zw.Header = h
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// cfMultiMember splits b at odd offsets (inside headers and file data),
// gzips each piece as its own member, adds an empty member after the
// first, and concatenates them.
func cfMultiMember(t testing.TB, b []byte) []byte {
	t.Helper()
	const first = 777
	if len(b) <= first {
		t.Fatalf("tar of %d bytes is too small to split", len(b))
	}
	out := cfGoGzip(t, b[:first], gzip.Header{})
	out = append(out, cfGoGzip(t, nil, gzip.Header{})...) // an empty member
	return append(out, cfRun(t, b[first:], nil, "split", "-b", "300001", "--filter=gzip -n -6", "-")...)
}

// cfRewriteGzipHeader replaces the bare 10-byte header of a single-member
// gzip stream by one with the given FEXTRA, FNAME, FCOMMENT and FHCRC.
func cfRewriteGzipHeader(t testing.TB, gz, extra []byte, name, comment string, hcrc bool) []byte {
	t.Helper()
	if len(gz) < 18 || gz[3] != 0 {
		t.Fatalf("not a bare gzip header: % x", gz[:min(len(gz), 10)])
	}
	h := bytes.Clone(gz[:10])
	h[4], h[5], h[6], h[7] = 0x12, 0x34, 0x56, 0x08 // MTIME
	if extra != nil {
		h[3] |= 0x04
		h = append(h, byte(len(extra)), byte(len(extra)>>8))
		h = append(h, extra...)
	}
	if name != "" {
		h[3] |= 0x08
		h = append(append(h, name...), 0)
	}
	if comment != "" {
		h[3] |= 0x10
		h = append(append(h, comment...), 0)
	}
	if hcrc {
		h[3] |= 0x02
		crc := crc32.ChecksumIEEE(h)
		h = append(h, byte(crc), byte(crc>>8))
	}
	return append(h, gz[10:]...)
}
