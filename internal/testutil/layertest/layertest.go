// Package layertest makes the tar layers tests index, mount and push:
// tar streams written with archive/tar from a list of entries, trees on
// disk archived by GNU tar (for what only a real tar writes: sparse files,
// xattrs of a real file system, old formats), the gzip forms a layer
// arrives in, and archive/tar's own reading of a layer with the offset of
// every member's data. Everything is deterministic. DebianLayer gives the
// path of the real Debian layer scripts/debian-layer.sh builds.
//
// It must not import ztoc (ztoc's own tests use it); the TOC a tar should
// yield is in package toctest.
package layertest

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/proc"
)

// ModTime is the fixed modification time of generated entries and trees.
var ModTime = time.Date(2021, 2, 3, 4, 5, 6, 0, time.UTC)

// Entry is one tar member: its header and, for a regular file, its
// contents. WriteTar sets Header.Size from Data when Data is not nil.
type Entry struct {
	Header tar.Header
	Data   []byte
}

// Reg is a regular file.
func Reg(name string, mode int64, data []byte) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, Data: data}
}

// Dir is a directory.
func Dir(name string, mode int64) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
}

// Symlink is a symbolic link to target.
func Symlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777}}
}

// Hardlink is a hard link to the member named target.
func Hardlink(name, target string) Entry {
	return Entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target}}
}

// WriteTar writes entries to w as a tar stream with archive/tar, each in
// the format its header asks for (archive/tar picks one when it does not).
func WriteTar(w io.Writer, entries ...Entry) error {
	tw := tar.NewWriter(w)
	for _, e := range entries {
		h := e.Header
		if e.Data != nil {
			h.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			return fmt.Errorf("write tar header %q: %w", h.Name, err)
		}
		if _, err := tw.Write(e.Data); err != nil {
			return fmt.Errorf("write tar data %q: %w", h.Name, err)
		}
	}
	return tw.Close()
}

// Tar returns the tar stream of entries (see WriteTar).
func Tar(t testing.TB, entries ...Entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteTar(&buf, entries...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Walk reads tarball with archive/tar and calls fn for every member, PAX
// global headers included, with the stream offset where its data starts
// (the position right after Next, where SOCI's builder records it:
// SOCI-FORMAT.md §1.4) and a reader of its contents (holes of sparse files
// expanded). It returns the offset just past the end-of-archive marker.
func Walk(tarball []byte, fn func(h *tar.Header, offset int64, data io.Reader) error) (int64, error) {
	cr := &countingReader{r: bytes.NewReader(tarball)}
	tr := tar.NewReader(cr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return cr.n, nil
		}
		if err != nil {
			return cr.n, fmt.Errorf("read tar at offset %d: %w", cr.n, err)
		}
		if err := fn(h, cr.n, tr); err != nil {
			return cr.n, err
		}
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Random returns n deterministic pseudo-random (incompressible) bytes.
func Random(seed uint64, n int) []byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(s).Read(b)
	return b
}

// SeededTar is the read tests' layer: a directory of pseudo-random
// (incompressible) files, an empty one among them, whose contents all
// differ with seed but whose layout does not, so that two seeds give tars
// of the same size.
func SeededTar(t testing.TB, seed uint64) []byte {
	t.Helper()
	reg := func(name string, data []byte) Entry {
		return Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: ModTime, Format: tar.FormatUSTAR}, Data: data}
	}
	return Tar(t,
		Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: "r/", Mode: 0o755, ModTime: ModTime, Format: tar.FormatUSTAR}},
		reg("r/a", Random(seed*10+1, 100000)),
		reg("r/b", Random(seed*10+2, 300000)),
		reg("r/empty", []byte{}),
		reg("r/c", Random(seed*10+3, 50000)),
		reg("r/d", Random(seed*10+4, 200000)),
		reg("r/tiny", Random(seed*10+5, 10)),
	)
}

// Text returns n bytes of deterministic compressible text.
func Text(seed, n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %08d of text %d: the quick brown fox jumps over the lazy dog %x\n", i, seed, i*i)
	}
	return b.Bytes()[:n]
}

// Run runs one of the tools that write or read layers (GNU tar, gzip,
// pigz, zstd, split) with stdin (none when nil) and env added to the
// environment, and returns its stdout. It fails the test with the tool's
// stderr when the tool fails.
func Run(t testing.TB, stdin []byte, env []string, name string, args ...string) []byte {
	t.Helper()
	out, err := proc.Output(context.Background(), stdin, env, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
