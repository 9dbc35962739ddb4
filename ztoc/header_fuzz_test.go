package ztoc

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// FuzzCheckHeader feeds CheckHeader arbitrary header bytes and an
// arbitrary TOC entry (the entry's data offset is the end of the bytes).
// Properties: it never panics; a mismatch is a *HeaderMismatchError whose
// two values differ; and it never accepts bytes that archive/tar reads as
// anything but one entry (after PAX global headers) ending exactly at the
// data offset with every field the entry has. Seeds: the header blocks and
// entries of tiny layers in every tar format (testdata/fuzz/FuzzCheckHeader).
func FuzzCheckHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, hdr []byte, name, typ, linkname, uname, gname, pax string,
		size, mode, sec, nsec, devmajor, devminor int64, uid, gid uint32) {
		e := FileMetadata{Name: name, Type: typ, UncompressedOffset: int64(len(hdr)), UncompressedSize: size,
			Linkname: linkname, Mode: mode, UID: uid, GID: gid, Uname: uname, Gname: gname,
			ModTime: time.Unix(sec, nsec).UTC(), Devmajor: devmajor, Devminor: devminor, PAXRecords: parsePAXSeed(pax)}
		err := CheckHeader(hdr, &e)
		if err != nil {
			var hm *HeaderMismatchError
			if !errors.As(err, &hm) {
				t.Fatalf("error %v is not a *HeaderMismatchError", err)
			}
			if hm.Header == hm.TOC {
				t.Fatalf("mismatch in %s shows the same value on both sides: %s", hm.Field, hm.Header)
			}
			return
		}
		if d := headerDifference(hdr, &e); d != "" {
			t.Fatalf("CheckHeader accepted a header that differs from the entry: %s", d)
		}
	})
}

// headerDifference reads hdr with archive/tar and says how it differs
// from entry e ("" when it does not).
func headerDifference(hdr []byte, e *FileMetadata) string {
	r := bytes.NewReader(hdr)
	tr := tar.NewReader(r)
	var h *tar.Header
	for h == nil {
		next, err := tr.Next()
		if err != nil {
			return fmt.Sprintf("archive/tar reads no entry: %v", err)
		}
		if next.Typeflag != tar.TypeXGlobalHeader {
			h = next
		}
	}
	if n := r.Size() - int64(r.Len()); n != int64(len(hdr)) {
		return fmt.Sprintf("the header ends at %d of %d bytes", n, len(hdr))
	}
	got := fmt.Sprint(h.Name, "|", cfTocType(h.Typeflag), "|", h.Size, "|", h.Mode, "|", uint32(h.Uid), "|", uint32(h.Gid), "|",
		h.Uname, "|", h.Gname, "|", h.Linkname, "|", h.Devmajor, "|", h.Devminor)
	want := fmt.Sprint(e.Name, "|", e.Type, "|", e.UncompressedSize, "|", e.Mode, "|", e.UID, "|", e.GID, "|",
		e.Uname, "|", e.Gname, "|", e.Linkname, "|", e.Devmajor, "|", e.Devminor)
	if got != want {
		return fmt.Sprintf("archive/tar reads %q, the entry is %q", got, want)
	}
	if mt := tocTime(h.ModTime); !mt.Equal(e.ModTime) {
		return fmt.Sprintf("mtime %s, the entry's %s", mt, e.ModTime)
	}
	for k, v := range h.PAXRecords {
		if ev, ok := e.PAXRecords[k]; !ok || ev != v {
			return fmt.Sprintf("PAX record %q=%q, the entry's %q", k, v, ev)
		}
	}
	for k := range e.PAXRecords {
		if _, ok := h.PAXRecords[k]; !ok && !(k == SparseMapRecord && isSparse(h)) {
			return fmt.Sprintf("the entry has PAX record %q, the header not", k)
		}
	}
	return ""
}

// formatPAXSeed renders PAX records as a fuzz argument: one quoted key and
// quoted value per line, in key order.
func formatPAXSeed(m map[string]string) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "%q %q\n", k, m[k])
	}
	return b.String()
}

// parsePAXSeed is the inverse of formatPAXSeed; it skips lines it cannot
// read (the fuzzer mutates them).
func parsePAXSeed(s string) map[string]string {
	var m map[string]string
	for _, line := range strings.Split(s, "\n") {
		k, rest, err := cutQuoted(line)
		if err != nil {
			continue
		}
		v, _, err := cutQuoted(strings.TrimPrefix(rest, " "))
		if err != nil {
			continue
		}
		if m == nil {
			m = map[string]string{}
		}
		m[k] = v
	}
	return m
}

// cutQuoted reads the Go-quoted string at the start of s.
func cutQuoted(s string) (string, string, error) {
	q, err := strconv.QuotedPrefix(s)
	if err != nil {
		return "", "", err
	}
	v, err := strconv.Unquote(q)
	return v, s[len(q):], err
}

// checkHeaderSeeds returns one seed per entry of tiny layers: the tiny
// layer of every entry type, archive/tar's corner cases (a PAX global
// header, base-256 owners, long links, times past 2262), and the GNU
// sparse layers of FuzzBuild's committed corpus.
func checkHeaderSeeds(t *testing.T) map[string][]any {
	t.Helper()
	formats, err := layertest.FormatsTar()
	if err != nil {
		t.Fatal(err)
	}
	tars := map[string][]byte{"tiny": fuzzTinyTar(t), "formats": formats}
	for _, name := range []string{"gzip-sparse-gnu", "gzip-sparse-posix"} {
		tars[name] = layertest.Gunzip(t, readCorpusBytes(t, filepath.Join("testdata", "fuzz", "FuzzBuild", name)))
	}
	seeds := map[string][]any{}
	for src, tarball := range tars {
		z := hdBuildTOC(t, tarball)
		for i := range z.Files {
			start, end, err := HeaderRange(z, i)
			if err != nil {
				t.Fatal(err)
			}
			e := &z.Files[i]
			if _, sparse := e.PAXRecords[SparseMapRecord]; strings.HasPrefix(src, "gzip-sparse") && !sparse {
				continue
			}
			seeds[fmt.Sprintf("%s-%02d", src, i)] = []any{tarball[start:end], e.Name, e.Type, e.Linkname, e.Uname, e.Gname,
				formatPAXSeed(e.PAXRecords), e.UncompressedSize, e.Mode, e.ModTime.Unix(), int64(e.ModTime.Nanosecond()),
				e.Devmajor, e.Devminor, e.UID, e.GID}
		}
	}
	return seeds
}

// readCorpusBytes returns the first argument, a []byte, of a committed
// fuzz corpus file.
func readCorpusBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	if len(lines) < 2 || !strings.HasPrefix(lines[1], "[]byte(") {
		t.Fatalf("%s: not a []byte corpus file", path)
	}
	s, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return []byte(s)
}
