package layertest

import (
	"bytes"
	"compress/gzip"
	"hash/crc32"
	"io"
	"strconv"
	"testing"
)

// Gzip compresses b as one gzip member with compress/gzip at level
// (gzip.NoCompression gives stored blocks, whose size depends only on b's).
func Gzip(t testing.TB, b []byte, level int) []byte {
	t.Helper()
	return GzipMember(t, b, level, gzip.Header{})
}

// GzipMember is Gzip with the member header h (name, comment, extra
// field, mtime, OS).
func GzipMember(t testing.TB, b []byte, level int, h gzip.Header) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, level)
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

// GzipMembers compresses every part as a gzip member of its own at level
// and concatenates the members: a multi-member stream (an empty part gives
// an empty member).
func GzipMembers(t testing.TB, level int, parts ...[]byte) []byte {
	t.Helper()
	var out []byte
	for _, p := range parts {
		out = append(out, GzipMember(t, p, level, gzip.Header{})...)
	}
	return out
}

// GzipCommand compresses b with the gzip command at level ("-1" to "-9"),
// whose deflate differs from Go's; -n leaves the name and mtime out.
func GzipCommand(t testing.TB, b []byte, level string) []byte {
	t.Helper()
	return Run(t, b, nil, "gzip", "-n", level, "-c")
}

// GzipCommandMembers cuts b into pieces of size bytes and compresses each
// with the gzip command at level as a member of its own: many members
// whose boundaries fall anywhere in the tar stream.
func GzipCommandMembers(t testing.TB, b []byte, size int, level string) []byte {
	t.Helper()
	return Run(t, b, nil, "split", "-b", strconv.Itoa(size), "--filter=gzip -n "+level, "-")
}

// GzipFields are the optional gzip header fields compress/gzip cannot
// write together with the gzip command's deflate stream (FHCRC it never
// writes).
type GzipFields struct {
	Extra         []byte
	Name, Comment string
	HeaderCRC     bool
}

// RewriteGzipHeader replaces the bare 10-byte header of a single-member
// gzip stream (as gzip -n writes it) by one with a fixed MTIME and the
// given fields.
func RewriteGzipHeader(t testing.TB, gz []byte, f GzipFields) []byte {
	t.Helper()
	if len(gz) < 18 || gz[3] != 0 {
		t.Fatalf("not a bare gzip header: % x", gz[:min(len(gz), 10)])
	}
	h := bytes.Clone(gz[:10])
	h[4], h[5], h[6], h[7] = 0x12, 0x34, 0x56, 0x08 // MTIME
	if f.Extra != nil {
		h[3] |= 0x04
		h = append(h, byte(len(f.Extra)), byte(len(f.Extra)>>8))
		h = append(h, f.Extra...)
	}
	if f.Name != "" {
		h[3] |= 0x08
		h = append(append(h, f.Name...), 0)
	}
	if f.Comment != "" {
		h[3] |= 0x10
		h = append(append(h, f.Comment...), 0)
	}
	if f.HeaderCRC {
		h[3] |= 0x02
		crc := crc32.ChecksumIEEE(h)
		h = append(h, byte(crc), byte(crc>>8))
	}
	return append(h, gz[10:]...)
}

// Gunzip decompresses every member of a gzip stream with compress/gzip.
func Gunzip(t testing.TB, gz []byte) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
