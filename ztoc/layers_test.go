package ztoc

// The layers of the conformance tests: trees on disk archived by GNU tar
// (as root, so devices, owners and setuid bits are real), tars written
// with archive/tar for what GNU tar cannot produce, and the compressions a
// layer can arrive in. The builders live in internal/testutil/layertest;
// this file picks the set the conformance tests run on.

import (
	"archive/tar"
	"compress/gzip"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
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

// cfRun runs a command and returns its stdout; it fails the test with the
// command's stderr when the command fails.
var cfRun = layertest.Run

var (
	cfTarsOnce sync.Once
	cfTars     []cfTar
	cfTarsErr  error
)

// cfGeneratedTars returns the generated tars shared by the conformance
// tests: the full tree in GNU and PAX format, the simple tree in the old
// formats, archive/tar-made edge cases, and span-boundary tars for 16 KiB
// and 64 KiB spans.
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

// cfMakeTars builds the shared tars once, outside any one test.
func cfMakeTars() ([]cfTar, error) {
	root, err := os.MkdirTemp("", "ztoc-conformance-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	if err := layertest.WriteFullTree(root); err != nil {
		return nil, fmt.Errorf("generate test tars: %w", err)
	}
	if err := layertest.WriteSimpleTree(root); err != nil {
		return nil, fmt.Errorf("generate test tars: %w", err)
	}
	full, simple := layertest.FullTreeDir, layertest.SimpleTreeDir
	makers := []struct {
		name string
		make func() ([]byte, error)
	}{
		{"gnu", func() ([]byte, error) { return layertest.GNUTar(root, full, "--format=gnu") }},
		{"posix", func() ([]byte, error) {
			return layertest.GNUTar(root, full, "--format=posix", "--xattrs", "--xattrs-include=*",
				"--pax-option=globexthdr.name=pax_global_header,comment=spanpull-conformance")
		}},
		{"ustar", func() ([]byte, error) { return layertest.GNUTar(root, simple, "--format=ustar") }},
		{"oldgnu", func() ([]byte, error) { return layertest.GNUTar(root, simple, "--format=oldgnu") }},
		{"v7", func() ([]byte, error) {
			return layertest.GNUTar(root, simple, "--format=v7", "--exclude=u/null", "--exclude=u/fifo", "--exclude=u/sub")
		}},
		{"gotar", layertest.FormatsTar},
		{"edge16k", func() ([]byte, error) { return layertest.EdgeTar(16 << 10) }},
		{"edge64k", func() ([]byte, error) { return layertest.EdgeTar(64 << 10) }},
	}
	var tars []cfTar
	for _, m := range makers {
		b, err := m.make()
		if err != nil {
			return nil, fmt.Errorf("generate test tar %s: %w", m.name, err)
		}
		tars = append(tars, cfTar{m.name, b})
	}
	return tars, nil
}

// cfSparseTar archives a tree of sparse files with GNU tar --sparse and
// the given format arguments.
func cfSparseTar(t testing.TB, args ...string) []byte {
	t.Helper()
	root := t.TempDir()
	if err := layertest.WriteSparseTree(root); err != nil {
		t.Fatal(err)
	}
	b, err := layertest.GNUTar(root, layertest.SparseTreeDir, append([]string{"--sparse"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cfGzipCLI compresses with the gzip command at level.
func cfGzipCLI(level string) func(testing.TB, []byte) []byte {
	return func(t testing.TB, b []byte) []byte { return layertest.GzipCommand(t, b, level) }
}

// cfExtraField is the FEXTRA of the gzip-extra-comment layers.
var cfExtraField = []byte{'S', 'P', 6, 0, 'e', 'x', 't', 'r', 'a', '!'}

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
			return layertest.GzipMember(t, b, gzip.DefaultCompression, gzip.Header{Name: "layer.tar", Comment: "spanpull conformance layer",
				Extra: cfExtraField, ModTime: layertest.ModTime, OS: 3})
		}
		// compress/flate is slow under -race: big tars get the same header
		// fields on gzip's deflate stream.
		return layertest.RewriteGzipHeader(t, layertest.GzipCommand(t, b, "-6"),
			layertest.GzipFields{Extra: cfExtraField, Name: "layer.tar", Comment: "spanpull conformance layer"})
	}},
	{"gzip-multi", cfMultiMember},
	{"gzip-multi-tiny", func(t testing.TB, b []byte) []byte {
		// Many small members: checkpoints fall right after member headers.
		return layertest.GzipCommandMembers(t, b, 20011, "-6")
	}},
	{"gzip-stored", func(t testing.TB, b []byte) []byte { return layertest.Gzip(t, b, gzip.NoCompression) }},
	{"gzip-fhcrc", func(t testing.TB, b []byte) []byte {
		// compress/gzip never writes FHCRC.
		return layertest.RewriteGzipHeader(t, layertest.GzipCommand(t, b, "-6"),
			layertest.GzipFields{Name: "with-header-crc.tar", HeaderCRC: true})
	}},
	{"pigz", func(t testing.TB, b []byte) []byte {
		// pigz ends each 128 KiB block with an empty stored block.
		return cfRun(t, b, nil, "pigz", "-n", "-6", "-p", "2", "-c")
	}},
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
	out := layertest.GzipMembers(t, gzip.DefaultCompression, b[:first], nil)
	return append(out, layertest.GzipCommandMembers(t, b[first:], 300001, "-6")...)
}

// cfCompressionsNamed returns the named compressions.
func cfCompressionsNamed(t testing.TB, names ...string) []cfCompression {
	t.Helper()
	var cs []cfCompression
	for _, n := range names {
		i := slices.IndexFunc(cfCompressions, func(c cfCompression) bool { return c.name == n })
		if i < 0 {
			t.Fatalf("no compression %q", n)
		}
		cs = append(cs, cfCompressions[i])
	}
	return cs
}

// cfEntry, cfWriteTar and cfTimeBase keep reader_test.go, which
// is rewritten separately, compiling; new tests use layertest directly.
type cfEntry struct {
	hdr  tar.Header
	data []byte
}

func cfWriteTar(t testing.TB, entries []cfEntry) []byte {
	t.Helper()
	es := make([]layertest.Entry, len(entries))
	for i, e := range entries {
		es[i] = layertest.Entry{Header: e.hdr, Data: e.data}
	}
	return layertest.Tar(t, es...)
}

var cfTimeBase = layertest.ModTime
