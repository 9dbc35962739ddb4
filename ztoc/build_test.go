package ztoc

// Conformance tests of the builder: every generated layer, in every
// compression, at several span sizes, must yield a zTOC whose files read
// back equal to GNU tar's extraction, whose metadata equals what GNU tar
// reports, that round-trips through the flatbuffers codec, and whose spans
// cover the archive. Plus SOCI golden vectors and bad input.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// cfSpanSizes are the span sizes every generated layer is indexed with.
var cfSpanSizes = []int64{16 << 10, 64 << 10, DefaultSpanSize}

// cfBuild builds blob's zTOC with a deadline, so a hang fails the test.
func cfBuild(t testing.TB, blob []byte, opts BuildOptions) (*Ztoc, digest.Digest, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	z, d, err := Build(ctx, bytes.NewReader(blob), opts)
	if ctx.Err() != nil {
		t.Fatalf("Build did not finish within the deadline: %v", err)
	}
	return z, d, err
}

// cfWriteLayer stores blob in a temp file and returns its path.
func cfWriteLayer(t testing.TB, blob []byte) string {
	t.Helper()
	name := filepath.Join(t.TempDir(), "layer")
	if err := os.WriteFile(name, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	return name
}

// cfExtract extracts a layer with GNU tar (which detects gzip itself) into
// a new directory, keeping owners, modes, devices and xattrs.
func cfExtract(t testing.TB, layer string) string {
	t.Helper()
	dir := t.TempDir()
	cfRun(t, nil, nil, "tar", "-xpf", layer, "-C", dir, "--numeric-owner", "--xattrs", "--xattrs-include=*")
	return dir
}

// cfUncompressed returns the tar stream of a layer, decompressed by the
// gzip command (its own inflate, not zlib's).
func cfUncompressed(t testing.TB, blob []byte) []byte {
	t.Helper()
	if !bytes.HasPrefix(blob, gzipMagic) {
		return blob
	}
	return cfRun(t, blob, nil, "gzip", "-dc")
}

// cfListEntry is one line of GNU tar's verbose listing.
type cfListEntry struct {
	line                                 string
	mode, owner, size, date, clock, name string
	link                                 string
	// names is the owner as tar -tv shows it without --numeric-owner:
	// user and group names where the archive has them.
	names string
}

// cfList returns GNU tar's listing of a layer: numeric owners, full times
// in UTC, names unquoted.
func cfList(t testing.TB, layer string) []cfListEntry {
	t.Helper()
	env := []string{"TZ=UTC", "LC_ALL=C.UTF-8"}
	out := cfRun(t, nil, env, "tar", "--numeric-owner", "--full-time", "--quoting-style=literal", "-tvf", layer)
	named := strings.Split(string(cfRun(t, nil, env, "tar", "--full-time", "--quoting-style=literal", "-tvf", layer)), "\n")
	var list []cfListEntry
	for i, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("cannot parse tar -tv line %q", line)
		}
		e := cfListEntry{line: line, mode: f[0], owner: f[1], size: f[2], date: f[3], clock: f[4]}
		if i < len(named) {
			if nf := strings.Fields(named[i]); len(nf) > 1 {
				e.names = nf[1]
			}
		}
		at := strings.Index(line, " "+e.date+" "+e.clock+" ")
		// Fractional seconds are padded to a fixed width.
		e.name = strings.TrimLeft(line[at+len(e.date)+len(e.clock)+3:], " ")
		switch e.mode[0] {
		case 'l':
			e.name, e.link, _ = strings.Cut(e.name, " -> ")
		case 'h':
			e.name, e.link, _ = strings.Cut(e.name, " link to ")
		}
		list = append(list, e)
	}
	return list
}

// cfModeString renders a TOC entry's type and mode as tar -tv does.
func cfModeString(f *FileMetadata) string {
	kind := map[string]byte{TypeReg: '-', TypeDir: 'd', TypeSymlink: 'l', TypeHardlink: 'h', TypeChar: 'c', TypeBlock: 'b', TypeFifo: 'p'}[f.Type]
	b := []byte{kind}
	for i, c := range "rwxrwxrwx" {
		if f.Mode&(1<<(8-i)) != 0 {
			b = append(b, byte(c))
		} else {
			b = append(b, '-')
		}
	}
	for _, s := range []struct {
		bit           int64
		pos           int
		set, noTarget byte
	}{{0o4000, 3, 's', 'S'}, {0o2000, 6, 's', 'S'}, {0o1000, 9, 't', 'T'}} {
		if f.Mode&s.bit != 0 {
			if b[s.pos] == 'x' {
				b[s.pos] = s.set
			} else {
				b[s.pos] = s.noTarget
			}
		}
	}
	return string(b)
}

// cfTocType maps an archive/tar type flag to the TOC's type ("" for
// entries that the TOC leaves out).
func cfTocType(flag byte) string {
	switch flag {
	case tar.TypeReg, '\x00', tar.TypeCont, tar.TypeGNUSparse: // '\x00': pre-POSIX regular file
		return TypeReg
	case tar.TypeDir:
		return TypeDir
	case tar.TypeSymlink:
		return TypeSymlink
	case tar.TypeLink:
		return TypeHardlink
	case tar.TypeChar:
		return TypeChar
	case tar.TypeBlock:
		return TypeBlock
	case tar.TypeFifo:
		return TypeFifo
	}
	return ""
}

// cfGoEntry is one entry of archive/tar's reading of a tar stream.
type cfGoEntry struct {
	hdr  *tar.Header
	data []byte // regular files: contents (holes expanded)
}

// cfReadTar reads a tar stream with archive/tar, returning the entries the
// TOC must hold and the stream offset just past the end-of-archive marker.
func cfReadTar(t testing.TB, tarball []byte) ([]cfGoEntry, int64, error) {
	t.Helper()
	var entries []cfGoEntry
	end, err := layertest.Walk(tarball, func(h *tar.Header, _ int64, data io.Reader) error {
		if h.Typeflag == tar.TypeXGlobalHeader {
			return nil
		}
		e := cfGoEntry{hdr: h}
		if cfTocType(h.Typeflag) == TypeReg {
			var err error
			if e.data, err = io.ReadAll(data); err != nil {
				return err
			}
		}
		entries = append(entries, e)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return entries, end, nil
}

// cfTarEnd returns the offset just past a tar stream's end-of-archive
// marker, as archive/tar finds it.
func cfTarEnd(t testing.TB, tarball []byte) int64 {
	t.Helper()
	end, err := layertest.Walk(tarball, func(*tar.Header, int64, io.Reader) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	return end
}

// cfGzipHeaderLen returns the length of the gzip member header at the
// start of b.
func cfGzipHeaderLen(t testing.TB, b []byte) int64 {
	t.Helper()
	if len(b) < 10 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("not a gzip header: % x", b[:min(len(b), 10)])
	}
	flg, n := b[3], 10
	if flg&4 != 0 {
		n += 2 + int(b[n]) | int(b[n+1])<<8
	}
	for _, bit := range []byte{8, 16} {
		if flg&bit != 0 {
			n += bytes.IndexByte(b[n:], 0) + 1
		}
	}
	if flg&2 != 0 {
		n += 2
	}
	return int64(n)
}

// cfCheckSpans checks (d): the span table covers the compressed blob and
// the uncompressed archive contiguously, and every span digest is the
// SHA-256 of the span's bytes.
func cfCheckSpans(t *testing.T, z *Ztoc, blob []byte, spanSize int64) []Span {
	t.Helper()
	spans, err := z.Spans()
	if err != nil {
		t.Fatalf("Spans: %v", err)
	}
	if len(spans) != z.NumSpans() || len(spans) != len(z.SpanDigests) {
		t.Fatalf("%d spans, NumSpans %d, %d digests", len(spans), z.NumSpans(), len(z.SpanDigests))
	}
	if got, err := z.SpanSize(); err != nil || got != spanSize {
		t.Errorf("SpanSize() = %d, %v; want %d", got, err, spanSize)
	}
	for i, s := range spans {
		if s.ID != SpanID(i) {
			t.Errorf("span %d has id %d", i, s.ID)
		}
		sum := sha256.Sum256(blob[s.CompressedStart:s.CompressedEnd])
		if d := digest.NewDigestFromBytes(digest.SHA256, sum[:]); d != z.SpanDigests[i] {
			t.Errorf("span %d [%d, %d): digest %s, zTOC says %s", i, s.CompressedStart, s.CompressedEnd, d, z.SpanDigests[i])
		}
		if i == 0 {
			continue
		}
		prev := spans[i-1]
		wantStart := prev.CompressedEnd
		if s.Bits > 0 {
			wantStart-- // the byte shared with the previous block
		}
		if s.CompressedStart != wantStart || s.UncompressedStart != prev.UncompressedEnd {
			t.Errorf("span %d starts at %d/%d (bits %d), span %d ends at %d/%d", i, s.CompressedStart, s.UncompressedStart, s.Bits, i-1, prev.CompressedEnd, prev.UncompressedEnd)
		}
	}
	first, last := spans[0], spans[len(spans)-1]
	if first.UncompressedStart != 0 {
		t.Errorf("span 0 starts at uncompressed %d", first.UncompressedStart)
	}
	if last.CompressedEnd != int64(len(blob)) || last.UncompressedEnd < z.UncompressedArchiveSize {
		t.Errorf("last span ends at %d/%d; blob has %d bytes, archive %d", last.CompressedEnd, last.UncompressedEnd, len(blob), z.UncompressedArchiveSize)
	}
	switch z.Algorithm {
	case Uncompressed:
		for i, s := range spans {
			want := Span{ID: SpanID(i), CompressedStart: int64(i) * spanSize, UncompressedStart: int64(i) * spanSize}
			want.CompressedEnd = min(want.CompressedStart+spanSize, int64(len(blob)))
			want.UncompressedEnd = want.CompressedEnd
			if !reflect.DeepEqual(s, want) {
				t.Errorf("tar span %d = %+v, want %+v", i, s, want)
			}
		}
	case Gzip:
		if hl := cfGzipHeaderLen(t, blob); first.CompressedStart != hl || first.Bits != 0 {
			t.Errorf("span 0 starts at compressed %d (bits %d), want just past the %d-byte gzip header", first.CompressedStart, first.Bits, hl)
		}
		for i, s := range spans[:len(spans)-1] {
			if n := s.UncompressedEnd - s.UncompressedStart; n <= spanSize {
				t.Errorf("gzip span %d holds %d uncompressed bytes, not more than the span size %d", i, n, spanSize)
			}
			if len(s.Window) != WindowSize {
				t.Errorf("span %d window is %d bytes", i, len(s.Window))
			}
		}
	}
	return spans
}

// cfBuildChecked builds blob's zTOC at spanSize and checks the layer
// digest, the archive sizes (blob's length, and end, where the tar stream
// ends) and the spans. It returns the zTOC and a reader of blob through it.
func cfBuildChecked(t *testing.T, blob []byte, end, spanSize int64) (*Ztoc, *cfReader) {
	t.Helper()
	z, layerDigest, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if want := digest.FromBytes(blob); layerDigest != want {
		t.Errorf("layer digest %s, want %s", layerDigest, want)
	}
	if z.CompressedArchiveSize != int64(len(blob)) || z.UncompressedArchiveSize != end {
		t.Errorf("sizes %d/%d, want %d/%d", z.CompressedArchiveSize, z.UncompressedArchiveSize, len(blob), end)
	}
	cfCheckSpans(t, z, blob, spanSize)
	r, err := cfNewReader(z, blob)
	if err != nil {
		t.Fatal(err)
	}
	return z, r
}

// cfCheckLayer builds blob's zTOC at spanSize and checks it against the
// uncompressed stream (tarball), GNU tar's extraction (extracted) and GNU
// tar's listing. It returns the zTOC.
func cfCheckLayer(t *testing.T, blob, tarball []byte, extracted string, listing []cfListEntry, spanSize int64) *Ztoc {
	t.Helper()
	goEntries, end, err := cfReadTar(t, tarball)
	if err != nil {
		t.Fatalf("archive/tar cannot read the generated tar: %v", err)
	}
	// (d) spans, with the layer digest and sizes.
	z, r := cfBuildChecked(t, blob, end, spanSize)
	wantAlg := Uncompressed
	if bytes.HasPrefix(blob, gzipMagic) {
		wantAlg = Gzip
	}
	if z.Version != Version || z.BuildToolIdentifier != DefaultBuildToolIdentifier || z.Algorithm != wantAlg {
		t.Errorf("version %q, tool %q, algorithm %v; want %q, %q, %v", z.Version, z.BuildToolIdentifier, z.Algorithm, Version, DefaultBuildToolIdentifier, wantAlg)
	}

	// The whole uncompressed archive reads back through the zTOC.
	all := make([]byte, z.UncompressedArchiveSize)
	if n, err := r.ReadAt(all, 0); n != len(all) || err != nil {
		t.Fatalf("ReadAt(whole archive) = %d, %v", n, err)
	}
	if !bytes.Equal(all, tarball[:z.UncompressedArchiveSize]) {
		t.Errorf("the archive read through the zTOC differs from the uncompressed layer at byte %d", cfFirstDiff(all, tarball))
	}

	// The TOC is archive/tar's reading, entry by entry, and each regular
	// file reads back equal to archive/tar's contents.
	if len(z.Files) != len(goEntries) {
		t.Errorf("TOC has %d entries, archive/tar reads %d", len(z.Files), len(goEntries))
	}
	last := map[string]int{}
	for i := range z.Files {
		last[CleanPath(z.Files[i].Name)] = i
	}
	for i := range min(len(z.Files), len(goEntries)) {
		f, h := &z.Files[i], goEntries[i].hdr
		if f.Name != h.Name || f.Type != cfTocType(h.Typeflag) || f.Linkname != h.Linkname {
			t.Errorf("entry %d: %q %s -> %q, archive/tar: %q %q -> %q", i, f.Name, f.Type, f.Linkname, h.Name, h.Typeflag, h.Linkname)
			continue
		}
		// Every header field as archive/tar reads it: full-precision
		// mtime, 32-bit owners, names, and all raw PAX records.
		pax := map[string]string{}
		for k, v := range f.PAXRecords {
			if k != SparseMapRecord {
				pax[k] = v
			}
		}
		if len(h.PAXRecords) == 0 && len(pax) == 0 {
			pax = h.PAXRecords
		}
		if f.Mode != h.Mode || int64(f.UID) != int64(h.Uid) || int64(f.GID) != int64(h.Gid) || f.Uname != h.Uname || f.Gname != h.Gname ||
			!f.ModTime.Equal(h.ModTime) || f.ModTime.Location() != time.UTC || f.Devmajor != h.Devmajor || f.Devminor != h.Devminor ||
			!reflect.DeepEqual(pax, h.PAXRecords) {
			t.Errorf("entry %d %s: TOC mode %o owner %d:%d (%s:%s) mtime %s dev %d,%d pax %q;\narchive/tar: mode %o owner %d:%d (%s:%s) mtime %s dev %d,%d pax %q",
				i, f.Name, f.Mode, f.UID, f.GID, f.Uname, f.Gname, f.ModTime, f.Devmajor, f.Devminor, pax,
				h.Mode, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime, h.Devmajor, h.Devminor, h.PAXRecords)
		}
		// The last entry of each path is read below, against GNU tar.
		if f.Type == TypeReg && last[CleanPath(f.Name)] != i {
			var buf bytes.Buffer
			if n, err := r.WriteFile(&buf, f); err != nil || n != int64(buf.Len()) {
				t.Errorf("WriteFile(%s) = %d, %v", f.Name, n, err)
			} else if !bytes.Equal(buf.Bytes(), goEntries[i].data) {
				t.Errorf("entry %d %s: %d bytes through the zTOC differ from archive/tar's %d at byte %d", i, f.Name, buf.Len(), len(goEntries[i].data), cfFirstDiff(buf.Bytes(), goEntries[i].data))
			}
		}
	}

	// (a) and (b): GNU tar's extraction and listing.
	cfCompareExtraction(t, z, r, extracted)
	cfCompareListing(t, z, listing)

	// (c) codec round trip (everything but the chunk table, which SOCI's
	// encoding does not carry) and deterministic bytes.
	b1, z2 := roundTrip(t, z)
	if zc := withoutChunks(z); !reflect.DeepEqual(zc, z2) {
		cfDiffZtoc(t, zc, z2)
	}
	// (e) chunks.
	cfCheckChunks(t, z, blob, tarball)
	if spanSize == cfSpanSizes[0] {
		zAgain, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize})
		if err != nil {
			t.Fatalf("second Build: %v", err)
		}
		if b2, err := Marshal(zAgain); err != nil || !bytes.Equal(b1, b2) {
			t.Errorf("two builds of the same layer marshal differently (err %v)", err)
		}
	}
	return z
}

// cfDiffZtoc reports how two zTOCs differ.
func cfDiffZtoc(t *testing.T, a, b *Ztoc) {
	t.Helper()
	if a.Version != b.Version || a.BuildToolIdentifier != b.BuildToolIdentifier ||
		a.CompressedArchiveSize != b.CompressedArchiveSize || a.UncompressedArchiveSize != b.UncompressedArchiveSize {
		t.Errorf("round trip changed the header fields: %q %q %d %d -> %q %q %d %d", a.Version, a.BuildToolIdentifier,
			a.CompressedArchiveSize, a.UncompressedArchiveSize, b.Version, b.BuildToolIdentifier, b.CompressedArchiveSize, b.UncompressedArchiveSize)
	}
	if !reflect.DeepEqual(a.CompressionInfo, b.CompressionInfo) {
		t.Errorf("round trip changed the compression info")
	}
	if len(a.Files) != len(b.Files) {
		t.Errorf("round trip changed the number of files: %d -> %d", len(a.Files), len(b.Files))
		return
	}
	for i := range a.Files {
		if !reflect.DeepEqual(a.Files[i], b.Files[i]) {
			t.Errorf("round trip changed entry %d:\n%#v\n->\n%#v", i, a.Files[i], b.Files[i])
		}
	}
}

// cfFirstDiff returns the first offset where a and b differ.
func cfFirstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// cfUserXattrs returns the user.* extended attributes of a file or
// directory.
func cfUserXattrs(t testing.TB, path string) map[string]string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := syscall.Listxattr(path, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", path, err)
	}
	x := map[string]string{}
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if !strings.HasPrefix(name, "user.") {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := syscall.Getxattr(path, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", path, name, err)
		}
		x[name] = string(v[:m])
	}
	return x
}

// cfTOCUserXattrs returns an entry's user.* xattrs from the TOC.
func cfTOCUserXattrs(f *FileMetadata) map[string]string {
	x := map[string]string{}
	for k, v := range f.Xattrs() {
		if strings.HasPrefix(k, "user.") {
			x[k] = v
		}
	}
	return x
}

// cfCompareExtraction checks (a) and (b): the last TOC entry for each path
// (tar semantics) against os.Lstat of GNU tar's extraction, and every
// regular file's bytes through cfReader.WriteFile.
func cfCompareExtraction(t *testing.T, z *Ztoc, r *cfReader, dir string) {
	t.Helper()
	cfCompareExtractionWith(t, z, dir, func(f *FileMetadata) ([]byte, error) {
		var b bytes.Buffer
		n, err := r.WriteFile(&b, f)
		if err == nil && n != int64(b.Len()) {
			err = fmt.Errorf("WriteFile returned %d for %d bytes written", n, b.Len())
		}
		return b.Bytes(), err
	})
}

// cfCompareExtractionWith is cfCompareExtraction with the regular files'
// contents read by read.
func cfCompareExtractionWith(t *testing.T, z *Ztoc, dir string, read func(*FileMetadata) ([]byte, error)) {
	t.Helper()
	last := map[string]int{}
	for i := range z.Files {
		last[CleanPath(z.Files[i].Name)] = i
	}
	// Parent directories without an entry of their own are created by tar.
	implicit := map[string]bool{}
	for name := range last {
		for d := filepath.Dir(name); d != "." && d != "/"; d = filepath.Dir(d) {
			implicit[d] = true
		}
	}
	err := filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		if _, ok := last[rel]; !ok && rel != "." && !implicit[rel] {
			t.Errorf("GNU tar extracted %s, which the TOC does not list", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(last))
	for name := range last {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if name == "." {
			continue
		}
		f := &z.Files[last[name]]
		path := filepath.Join(dir, name)
		st, err := os.Lstat(path)
		if err != nil {
			t.Errorf("%s (%s in the TOC): %v", name, f.Type, err)
			continue
		}
		sys := st.Sys().(*syscall.Stat_t)
		fmtBits := sys.Mode & syscall.S_IFMT
		wantFmt := map[string]uint32{TypeReg: syscall.S_IFREG, TypeDir: syscall.S_IFDIR, TypeSymlink: syscall.S_IFLNK,
			TypeHardlink: syscall.S_IFREG, TypeChar: syscall.S_IFCHR, TypeBlock: syscall.S_IFBLK, TypeFifo: syscall.S_IFIFO}[f.Type]
		if fmtBits != wantFmt {
			t.Errorf("%s: TOC type %s, extracted file type %#o", name, f.Type, fmtBits)
			continue
		}
		if f.Type != TypeHardlink {
			if f.Type != TypeSymlink && int64(sys.Mode&0o7777) != f.Mode&0o7777 {
				t.Errorf("%s: TOC mode %#o, extracted %#o", name, f.Mode&0o7777, sys.Mode&0o7777)
			}
			if sys.Uid != f.UID || sys.Gid != f.GID {
				t.Errorf("%s: TOC owner %d:%d, extracted %d:%d", name, f.UID, f.GID, sys.Uid, sys.Gid)
			}
			if sec := f.ModTime.Unix(); sys.Mtim.Sec != sec {
				t.Errorf("%s: TOC mtime %s, extracted %s", name, f.ModTime, time.Unix(sys.Mtim.Sec, sys.Mtim.Nsec).UTC())
			}
		}
		switch f.Type {
		case TypeReg, TypeHardlink:
			data := f
			if f.Type == TypeHardlink {
				// The link shares the target's inode unless the target path
				// was written again after the link.
				target, err := os.Lstat(filepath.Join(dir, CleanPath(f.Linkname)))
				if ti, ok := last[CleanPath(f.Linkname)]; ok && ti < last[name] && (err != nil || !os.SameFile(st, target)) {
					t.Errorf("%s: hardlink to %s, but GNU tar's extraction is not the same file (%v)", name, f.Linkname, err)
				}
				if data, err = z.Lookup(f.Name); err != nil {
					t.Errorf("Lookup(%s): %v", f.Name, err)
					continue
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if data.UncompressedSize != int64(len(want)) {
				t.Errorf("%s: TOC size %d, extracted %d", name, data.UncompressedSize, len(want))
			}
			if got, err := read(data); err != nil {
				t.Errorf("read %s through the zTOC: %v", name, err)
			} else if !bytes.Equal(got, want) {
				t.Errorf("%s: %d bytes through the zTOC differ from GNU tar's %d at byte %d", name, len(got), len(want), cfFirstDiff(got, want))
			}
		case TypeSymlink:
			if target, err := os.Readlink(path); err != nil || target != f.Linkname {
				t.Errorf("%s: TOC symlink to %q, extracted %q (%v)", name, f.Linkname, target, err)
			}
		case TypeChar, TypeBlock:
			if maj, mnr := int64(unix.Major(sys.Rdev)), int64(unix.Minor(sys.Rdev)); maj != f.Devmajor || mnr != f.Devminor {
				t.Errorf("%s: TOC device %d,%d, extracted %d,%d", name, f.Devmajor, f.Devminor, maj, mnr)
			}
		}
		if f.Type == TypeReg || f.Type == TypeDir {
			if got, want := cfUserXattrs(t, path), cfTOCUserXattrs(f); !reflect.DeepEqual(got, want) {
				t.Errorf("%s: TOC xattrs %q, extracted %q", name, want, got)
			}
		}
	}
}

// cfCompareListing checks (b) against GNU tar's listing, entry by entry.
func cfCompareListing(t *testing.T, z *Ztoc, listing []cfListEntry) {
	t.Helper()
	if len(listing) != len(z.Files) {
		t.Errorf("TOC has %d entries, tar -tv lists %d", len(z.Files), len(listing))
	}
	for i := range min(len(listing), len(z.Files)) {
		f, l := &z.Files[i], listing[i]
		size := fmt.Sprint(f.UncompressedSize)
		if f.Type == TypeChar || f.Type == TypeBlock {
			size = fmt.Sprintf("%d,%d", f.Devmajor, f.Devminor)
		}
		uname, gname := f.Uname, f.Gname
		if uname == "" {
			uname = fmt.Sprint(f.UID)
		}
		if gname == "" {
			gname = fmt.Sprint(f.GID)
		}
		got := cfListEntry{line: l.line, mode: cfModeString(f), owner: fmt.Sprintf("%d/%d", f.UID, f.GID), size: size, names: uname + "/" + gname,
			date: f.ModTime.Format("2006-01-02"), clock: f.ModTime.Format("15:04:05"), name: f.Name, link: f.Linkname}
		want := l
		want.clock = want.clock[:min(len(want.clock), 8)] // drop fractional seconds
		if got != want {
			t.Errorf("entry %d:\n TOC %+v\n tar %+v", i, got, want)
		}
	}
}

// cfCheckEdges asserts where the edge tar's files sit on the span grid of
// an uncompressed layer with span size s, so the boundary cases are really
// exercised.
func cfCheckEdges(t *testing.T, z *Ztoc, s int64) {
	t.Helper()
	for _, e := range layertest.EdgeFiles {
		f, err := z.Lookup(e.Name)
		if err != nil {
			t.Fatal(err)
		}
		start, end := f.UncompressedOffset, f.UncompressedOffset+f.UncompressedSize
		crossed := int((end-1)/s - start/s)
		if (start%s == 0) != e.StartsOn || (end%s == 0) != e.EndsOn || crossed != e.Crossed {
			t.Errorf("%s holds [%d, %d): starts on a %d-byte span boundary %v (want %v), ends on one %v (want %v), crosses %d (want %d)",
				e.Name, start, end, s, start%s == 0, e.StartsOn, end%s == 0, e.EndsOn, crossed, e.Crossed)
		}
	}
}

// TestConformance checks every generated tar, in every compression, at
// every span size, against GNU tar.
func TestConformance(t *testing.T) {
	for _, tr := range cfGeneratedTars(t) {
		for _, c := range cfCompressions {
			t.Run(tr.name+"/"+c.name, func(t *testing.T) {
				t.Parallel()
				blob := c.compress(t, tr.tar)
				layer := cfWriteLayer(t, blob)
				tarball := cfUncompressed(t, blob)
				if !bytes.Equal(tarball, tr.tar) {
					t.Fatal("the compressed layer does not decompress to the tar")
				}
				extracted := cfExtract(t, layer)
				listing := cfList(t, layer)
				for _, s := range cfSpanSizes {
					t.Run(fmt.Sprint(s), func(t *testing.T) {
						z := cfCheckLayer(t, blob, tarball, extracted, listing, s)
						edge := map[string]int64{"edge16k": 16 << 10, "edge64k": 64 << 10}[tr.name]
						if edge == s && z.Algorithm == Uncompressed {
							cfCheckEdges(t, z, s)
						}
					})
				}
			})
		}
	}
}

// cfCheckSparse runs the conformance checks on GNU tar --sparse layers.
func cfCheckSparse(t *testing.T, tarball []byte) {
	t.Helper()
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6", "gzip-multi") {
		t.Run(c.name, func(t *testing.T) {
			blob := c.compress(t, tarball)
			layer := cfWriteLayer(t, blob)
			extracted := cfExtract(t, layer)
			listing := cfList(t, layer)
			for _, s := range []int64{16 << 10, DefaultSpanSize} {
				t.Run(fmt.Sprint(s), func(t *testing.T) {
					z := cfCheckLayer(t, blob, tarball, extracted, listing, s)
					for _, name := range []string{"s/holes", "s/all-hole", "s/tail-data", "s/many-holes"} {
						f, err := z.Lookup(name)
						if err != nil {
							t.Fatal(err)
						}
						if stored, err := f.StoredSize(); err != nil || stored >= f.UncompressedSize {
							t.Errorf("%s: stored size %d (%v) for a %d-byte sparse file: not recorded as sparse", name, stored, err, f.UncompressedSize)
						}
					}
				})
			}
		})
	}
}

// TestSparseOldGNU: old-GNU sparse entries (type 'S', tar --format=gnu
// --sparse) extract with their holes, equal to GNU tar.
func TestSparseOldGNU(t *testing.T) {
	t.Parallel()
	tarball := cfSparseTar(t, "--format=gnu")
	entries, _, err := cfReadTar(t, tarball)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if e.hdr.Typeflag == tar.TypeGNUSparse {
			n++
		}
	}
	if n == 0 {
		t.Fatal("GNU tar wrote no old-GNU sparse ('S') entries")
	}
	cfCheckSparse(t, tarball)
}

// TestSparsePAX: PAX sparse entries (tar --format=posix --sparse, GNU
// sparse versions 0.0, 0.1 and 1.0) extract with their holes.
func TestSparsePAX(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"1.0", "0.1", "0.0"} {
		t.Run(v, func(t *testing.T) {
			tarball := cfSparseTar(t, "--format=posix", "--sparse-version="+v)
			if !bytes.Contains(tarball, []byte("GNU.sparse.")) {
				t.Fatal("GNU tar wrote no GNU.sparse PAX records")
			}
			cfCheckSparse(t, tarball)
		})
	}
}

// TestBuildGolden: zTOCs built from SOCI's golden layers are byte-identical
// to SOCI's with SOCI's build tool identifier, and decode equal (but for
// the identifier) with ours.
func TestBuildGolden(t *testing.T) {
	tgz, tarball := goldenLayers(t)
	for _, g := range goldens {
		t.Run(g.File, func(t *testing.T) {
			want := readGolden(t, g.File)
			blob := g.layer(tgz, tarball)
			z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: g.SpanSize, BuildToolIdentifier: SOCIBuildToolIdentifier})
			if err != nil {
				t.Fatal(err)
			}
			got := mustMarshal(t, z)
			if !bytes.Equal(got, want) {
				t.Errorf("zTOC of %d bytes differs from SOCI's %d bytes at offset %d", len(got), len(want), cfFirstDiff(got, want))
				if gz, err := Unmarshal(want); err == nil {
					cfDiffZtoc(t, gz, z)
				}
			}

			ours, _, err := cfBuild(t, blob, BuildOptions{SpanSize: g.SpanSize})
			if err != nil {
				t.Fatal(err)
			}
			if ours.BuildToolIdentifier != DefaultBuildToolIdentifier {
				t.Errorf("default build tool identifier %q", ours.BuildToolIdentifier)
			}
			gz, err := Unmarshal(want)
			if err != nil {
				t.Fatal(err)
			}
			gz.BuildToolIdentifier = DefaultBuildToolIdentifier
			if !reflect.DeepEqual(ours, gz) {
				cfDiffZtoc(t, gz, ours)
			}
		})
	}
}

// TestReadGolden extracts every regular file through SOCI's own zTOCs and
// compares it with GNU tar's extraction.
func TestReadGolden(t *testing.T) {
	t.Parallel()
	tgz, tarball := goldenLayers(t)
	tgzPath := filepath.Join(goldenDir, "small.tar.gz")
	extracted := cfExtract(t, tgzPath)
	listing := cfList(t, tgzPath)
	for _, g := range goldens {
		t.Run(g.File, func(t *testing.T) {
			z, blob := g.decode(t), g.layer(tgz, tarball)
			cfCheckSpans(t, z, blob, g.SpanSize)
			r, err := cfNewReader(z, blob)
			if err != nil {
				t.Fatal(err)
			}
			cfCompareExtraction(t, z, r, extracted)
			cfCompareListing(t, z, listing)
		})
	}
}

// cfSmallTar is a small tar with a few files, for bad-input tests.
func cfSmallTar(t testing.TB) []byte {
	t.Helper()
	return layertest.Tar(t,
		layertest.Dir("dir/", 0o755),
		layertest.Reg("dir/random", 0o644, layertest.Random(50, 100000)),
		layertest.Reg("dir/text", 0o644, layertest.Text(51, 200000)),
		layertest.Symlink("dir/link", "text"),
	)
}

// cfBuildErr builds blob and returns the error, failing the test when
// Build succeeds, hangs, or fails without a message matching re.
func cfBuildErr(t *testing.T, blob []byte, re string) error {
	t.Helper()
	_, _, err := cfBuild(t, blob, BuildOptions{SpanSize: 16 << 10})
	if err == nil {
		t.Fatalf("Build accepted the layer; want an error matching %q", re)
	}
	t.Logf("Build error: %v", err)
	if !regexp.MustCompile(re).MatchString(err.Error()) {
		t.Errorf("Build error %q does not match %q", err, re)
	}
	return err
}

// TestBuildBadInput: malformed layers get a clear error, never a panic, a
// hang or a zTOC.
func TestBuildBadInput(t *testing.T) {
	small := cfSmallTar(t)
	tgz := layertest.GzipMember(t, small, gzip.DefaultCompression, gzip.Header{Name: "small.tar", Comment: "a comment"})
	hl := int(cfGzipHeaderLen(t, tgz))

	t.Run("truncated", func(t *testing.T) {
		cuts := map[string]int{
			"inside-header-3": 3, "inside-header-5": 5, "inside-header-name": 12, "after-header": hl, "one-deflate-byte": hl + 1,
			"middle": len(tgz) / 2, "before-trailer": len(tgz) - 8, "inside-crc": len(tgz) - 6,
			"inside-isize": len(tgz) - 2, "last-byte": len(tgz) - 1,
		}
		for name, n := range cuts {
			t.Run(name, func(t *testing.T) {
				err := cfBuildErr(t, tgz[:n], `(?i)truncat|unexpected EOF`)
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("error %q does not wrap io.ErrUnexpectedEOF", err)
				}
			})
		}
	})
	t.Run("truncated-tar", func(t *testing.T) {
		for _, n := range []int{1, 100, 513, 600, len(small) / 2} {
			cfBuildErr(t, small[:n], `(?i)tar.*(unexpected EOF|truncat|header)`)
		}
	})
	t.Run("corrupt-deflate", func(t *testing.T) {
		gz := layertest.GzipCommand(t, small, "-6")
		for _, at := range []int{len(gz) / 3, len(gz) / 2, 2 * len(gz) / 3} {
			bad := bytes.Clone(gz)
			for i := range 16 {
				bad[at+i] ^= 0x5a
			}
			cfBuildErr(t, bad, `(?i)gzip.*(invalid|incorrect|corrupt|check)`)
		}
	})
	t.Run("wrong-crc", func(t *testing.T) {
		bad := bytes.Clone(tgz)
		bad[len(bad)-6] ^= 1
		cfBuildErr(t, bad, `(?i)(crc|data check)`)
	})
	t.Run("wrong-isize", func(t *testing.T) {
		bad := bytes.Clone(tgz)
		bad[len(bad)-3] ^= 1
		cfBuildErr(t, bad, `(?i)(isize|length check|length)`)
	})
	t.Run("trailing-garbage", func(t *testing.T) {
		cfBuildErr(t, append(bytes.Clone(tgz), []byte("garbage after the last member")...), `(?i)(header|garbage|trailing)`)
	})
	t.Run("not-a-tar", func(t *testing.T) {
		text := layertest.Text(52, 10000)
		cfBuildErr(t, layertest.Gzip(t, text, gzip.DefaultCompression), `(?i)tar`)
		cfBuildErr(t, text, `(?i)tar`)
	})
	t.Run("empty", func(t *testing.T) {
		cfBuildErr(t, nil, `(?i)empty`)
	})
	t.Run("zstd", func(t *testing.T) {
		zst := cfRun(t, small, nil, "zstd", "-q", "-c")
		err := cfBuildErr(t, zst, `(?i)zstd`)
		if !errors.Is(err, ErrUnsupportedCompression) {
			t.Errorf("error %q does not wrap ErrUnsupportedCompression", err)
		}
	})
	t.Run("confined-paths", func(t *testing.T) {
		// containerd confines these to the layer root (see ConfinedPath):
		// they are indexed, with their raw names.
		for _, c := range []struct{ name, link string }{
			{"../x", ""},
			{"a/../../x", ""},
			{"/etc/x", ""},
			{"ok", "../../etc/passwd"},
			{"ok2", "/etc/passwd"},
		} {
			e := layertest.Reg(c.name, 0o644, nil)
			if c.link != "" {
				e = layertest.Hardlink(c.name, c.link)
			}
			tarball := layertest.Tar(t, layertest.Reg("fine", 0o644, []byte("x")), e)
			for _, blob := range [][]byte{tarball, layertest.Gzip(t, tarball, gzip.DefaultCompression)} {
				z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: 16 << 10})
				if err != nil {
					t.Fatalf("%q -> %q: %v", c.name, c.link, err)
				}
				if f := z.Files[1]; f.Name != c.name || f.Linkname != c.link {
					t.Errorf("entry %q -> %q, want %q -> %q", f.Name, f.Linkname, c.name, c.link)
				}
			}
		}
	})
	t.Run("read-error", func(t *testing.T) {
		boom := errors.New("disk on fire")
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _, err := Build(ctx, io.MultiReader(bytes.NewReader(tgz[:len(tgz)/2]), cfErrReader{boom}), BuildOptions{})
		if !errors.Is(err, boom) {
			t.Errorf("Build error %v does not wrap the read error", err)
		}
	})
	t.Run("endless-input", func(t *testing.T) {
		// An endless stream of zeros is a tar that never ends: Build must
		// give up when the context does.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		_, _, err := Build(ctx, cfZeros{}, BuildOptions{})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Build error %v, want the context's deadline", err)
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Errorf("Build took %s to notice the deadline", d)
		}
	})
}

type cfErrReader struct{ err error }

func (r cfErrReader) Read([]byte) (int, error) { return 0, r.err }

type cfZeros struct{}

func (cfZeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestDebianLayer compares a real Debian root filesystem layer with GNU
// tar: every regular file through the zTOC, and all metadata.
func TestDebianLayer(t *testing.T) {
	t.Parallel()
	layer := layertest.DebianLayer(t)
	blob, err := os.ReadFile(layer)
	if err != nil {
		t.Fatal(err)
	}
	tarball := cfUncompressed(t, blob)
	extracted := cfExtract(t, layer)
	listing := cfList(t, layer)
	end := cfTarEnd(t, tarball)
	for _, s := range []int64{DefaultSpanSize, 256 << 10} {
		t.Run(fmt.Sprint(s), func(t *testing.T) {
			z, r := cfBuildChecked(t, blob, end, s)
			// The whole stream, span by span, through ReadAt.
			stream := make([]byte, z.UncompressedArchiveSize)
			for off := int64(0); off < int64(len(stream)); off += s {
				end := min(off+s, int64(len(stream)))
				if n, err := r.ReadAt(stream[off:end], off); n != int(end-off) || err != nil {
					t.Fatalf("ReadAt(%d, %d bytes) = %d, %v", off, end-off, n, err)
				}
			}
			if !bytes.Equal(stream, tarball[:len(stream)]) {
				t.Fatalf("the stream read through the zTOC differs from the uncompressed layer at byte %d", cfFirstDiff(stream, tarball))
			}
			if s < DefaultSpanSize {
				cfCompareExtraction(t, z, r, extracted)
			} else {
				// Reading each of thousands of files from a 4 MiB span is
				// slow: read every multi-span file and every 25th file
				// through WriteFile, the others out of the verified stream.
				spans, err := z.Spans()
				if err != nil {
					t.Fatal(err)
				}
				i := 0
				cfCompareExtractionWith(t, z, extracted, func(f *FileMetadata) ([]byte, error) {
					i++
					first, _ := SpanForOffset(spans, f.UncompressedOffset)
					last, _ := SpanForOffset(spans, f.UncompressedOffset+max(f.UncompressedSize-1, 0))
					if _, sparse := f.PAXRecords[SparseMapRecord]; i%25 != 0 && first == last && !sparse {
						return stream[f.UncompressedOffset : f.UncompressedOffset+f.UncompressedSize], nil
					}
					var b bytes.Buffer
					_, err := r.WriteFile(&b, f)
					return b.Bytes(), err
				})
			}
			cfCompareListing(t, z, listing)
			if _, z2 := roundTrip(t, z); !reflect.DeepEqual(withoutChunks(z), z2) {
				t.Error("the zTOC changes through Marshal/Unmarshal")
			}
			cfCheckChunks(t, z, blob, tarball)
		})
	}
}

// cfBufferedGunzip decompresses gzip members like the builder accepts
// them: members back to back, zero padding between members allowed.
func cfBufferedGunzip(b []byte) ([]byte, error) {
	br := bufio.NewReader(bytes.NewReader(b))
	var out bytes.Buffer
	zr, err := gzip.NewReader(br)
	if err != nil {
		return nil, err
	}
	for {
		zr.Multistream(false)
		if _, err := io.Copy(&out, zr); err != nil {
			return nil, err
		}
		for {
			c, err := br.ReadByte()
			if err == io.EOF {
				return out.Bytes(), nil
			}
			if err != nil {
				return nil, err
			}
			if c != 0 {
				if err := br.UnreadByte(); err != nil {
					return nil, err
				}
				break
			}
		}
		if err := zr.Reset(br); err != nil {
			return nil, err
		}
	}
}
