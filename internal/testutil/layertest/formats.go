package layertest

import (
	"archive/tar"
	"bytes"
	"strings"
)

// FormatsTar returns what GNU tar cannot be asked for directly, written by
// archive/tar: a PAX global header, PAX xattrs with awkward values, GNU
// base-256 owners and times, GNU long names and link targets, an mtime
// past what an octal field holds, duplicate names and "./" prefixes, and
// an entry of every other type.
func FormatsTar() ([]byte, error) {
	mt := ModTime
	reg := func(name string, data []byte, f tar.Format) Entry {
		return Entry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: mt, Format: f}, data}
	}
	timed := func(name string, t tar.Header, data string) Entry {
		t.Typeflag, t.Name, t.Mode = tar.TypeReg, name, 0o644
		return Entry{t, []byte(data)}
	}
	e := []Entry{
		{Header: tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "pax_global_header", PAXRecords: map[string]string{"comment": "made by archive/tar"}}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: mt}},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "./dot/", Mode: 0o750, ModTime: mt}},
		{tar.Header{Typeflag: tar.TypeReg, Name: "./dot/xattr.txt", Mode: 0o644, ModTime: mt, Format: tar.FormatPAX,
			PAXRecords: map[string]string{
				"SCHILY.xattr.user.x":       "x-value",
				"SCHILY.xattr.user.newline": "a=b\nc d",
				"SCHILY.xattr.user.empty":   "",
			}}, Text(10, 3000)},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "go/", Mode: 0o755, ModTime: mt}},
		reg("go/ustar-plain", Random(11, 12345), tar.FormatUSTAR),
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/gnu-base256-owner", Mode: 0o600, Uid: 5000000, Gid: 6000000, ModTime: mt, Format: tar.FormatGNU}, []byte("base-256\n")},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/pax-owner", Mode: 0o600, Uid: 2147483647, Gid: 2147483646, ModTime: mt, Format: tar.FormatPAX}, []byte("pax uid\n")},
		{Header: tar.Header{Typeflag: tar.TypeDir, Name: "go/gnu-owned-dir/", Mode: 0o711, Uid: 2097152, Gid: 2097152, ModTime: mt, Format: tar.FormatGNU}},
		reg("go/gnu-long-"+strings.Repeat("n", 150), Text(12, 777), tar.FormatGNU),
		{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "go/gnu-long-link", Linkname: strings.Repeat("l", 200) + "/target", Mode: 0o777, ModTime: mt, Format: tar.FormatGNU}},
		timed("go/gnu-1960", tar.Header{ModTime: time1960, Format: tar.FormatGNU}, "1960\n"),
		timed("go/pax-1960", tar.Header{ModTime: time1960, Format: tar.FormatPAX}, "1960\n"),
		timed("go/ustar-2100", tar.Header{ModTime: time2100, Format: tar.FormatUSTAR}, "2100\n"),
		timed("go/pax-2300", tar.Header{ModTime: time2300, Format: tar.FormatPAX}, "2300\n"),
		timed("go/pax-nanos", tar.Header{ModTime: mt.Add(987654321), Format: tar.FormatPAX}, "nanos\n"),
		reg("go/dup", []byte("first version\n"), tar.FormatUSTAR),
		reg("go/exact-1536", Random(13, 1536), tar.FormatUSTAR),
		{Header: tar.Header{Typeflag: tar.TypeLink, Name: "go/hardlink", Linkname: "./dot/xattr.txt", ModTime: mt}},
		{Header: tar.Header{Typeflag: tar.TypeChar, Name: "go/char", Mode: 0o600, Devmajor: 4095, Devminor: 1048575, ModTime: mt}},
		{Header: tar.Header{Typeflag: tar.TypeBlock, Name: "go/block", Mode: 0o600, Devmajor: 8, Devminor: 1, ModTime: mt}},
		{Header: tar.Header{Typeflag: tar.TypeFifo, Name: "go/fifo", Mode: 0o644, ModTime: mt}},
		{tar.Header{Typeflag: tar.TypeReg, Name: "go/setuid", Mode: 0o4755, ModTime: mt}, []byte("#!/bin/true\n")},
		reg("go/empty", []byte{}, tar.FormatUSTAR),
		reg("go/dup", []byte("second version, the one that stays\n"), tar.FormatUSTAR),
		reg("go/after-dup", Random(14, 200000), tar.FormatUSTAR),
	}
	var buf bytes.Buffer
	err := WriteTar(&buf, e...)
	return buf.Bytes(), err
}

// Edge says where a file of EdgeTar(S) sits relative to the grid of
// multiples of S in the uncompressed stream (the span grid of a plain tar
// layer with span size S).
type Edge struct {
	Name             string
	StartsOn, EndsOn bool // data starts / ends exactly on a multiple of S
	Crossed          int  // multiples of S strictly inside the data
}

// EdgeFiles lists the files of EdgeTar(S) and where they sit: with
// 512-byte ustar headers, "a" holds [512, S), "b" [S+512, 2S-512), "c"
// [2S, 3S), "d" [3S+512, 4S+1512), "e" [4S+2048, 6S+2148).
var EdgeFiles = []Edge{
	{Name: "edge/a", EndsOn: true},
	{Name: "edge/b"},
	{Name: "edge/c", StartsOn: true, EndsOn: true},
	{Name: "edge/d", Crossed: 1},
	{Name: "edge/e", Crossed: 2},
}

// EdgeTar returns a ustar archive laid out on the grid of multiples of s
// (see EdgeFiles), s a multiple of 512 of at least 2048.
func EdgeTar(s int) ([]byte, error) {
	reg := func(name string, data []byte) Entry {
		return Entry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: ModTime, Format: tar.FormatUSTAR}, data}
	}
	var buf bytes.Buffer
	err := WriteTar(&buf,
		reg("edge/a", Random(20, s-512)),
		reg("edge/b", Text(21, s-1024)),
		reg("edge/c", Random(22, s)),
		reg("edge/d", Text(23, s+1000)),
		reg("edge/e", Random(24, 2*s+100)),
		reg("edge/empty", []byte{}),
	)
	return buf.Bytes(), err
}
