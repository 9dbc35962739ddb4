package ztoc

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
)

// Per-file binding. A zTOC comes from wherever the index was found, not
// from the image, so nothing in it is trusted until it is checked against
// the layer. A regular file's bytes are only as genuine as the TOC entry
// that says where they are: before serving them, a reader fetches the
// entry's header blocks (HeaderRange) through the same verified span path
// as file data and checks that they describe exactly this entry
// (CheckHeader). VerifyLayer does the same for every entry at once, plus
// the checkpoints and digests.

// MaxHeaderSize bounds the header range HeaderRange hands out: a PAX
// header, a GNU long name and a GNU long link target (archive/tar refuses
// each over 1 MiB), a GNU sparse map and the header block itself fit with
// room to spare. A genuine entry with larger headers (a pile of PAX global
// headers before it, say) can only be checked by VerifyLayer.
const MaxHeaderSize = 8 << 20

// HeaderRange returns where the header blocks of TOC entry i lie in the
// layer's uncompressed tar stream: from the end of the previous entry's
// data, rounded up to the 512-byte tar block (0 for the first entry), to
// the entry's data offset. PAX global headers, which the TOC leaves out,
// may come first; the entry's own header blocks (PAX, GNU long name and
// link, GNU sparse map) end exactly at its data.
//
// This relies on a zTOC listing every tar entry, in archive order, as
// SOCI's builder and ours do (entries that containerd skips included).
// The start is derived from entry i-1's offset and size, which are taken
// on trust here: a range that passes CheckHeader binds entry i to a
// genuine tar header with exactly its metadata ending where its data
// starts, and checking entry i-1 as well (VerifyLayer checks them all)
// proves that no entry lies between them.
func HeaderRange(z *Ztoc, i int) (start, end int64, err error) {
	if i < 0 || i >= len(z.Files) {
		return 0, 0, fmt.Errorf("header of toc entry %d: no such entry (the zTOC has %d)", i, len(z.Files))
	}
	if i > 0 {
		prev := &z.Files[i-1]
		stored, err := prev.StoredSize()
		if err != nil {
			return 0, 0, fmt.Errorf("header of toc entry %d: previous entry: %w", i, err)
		}
		if prev.UncompressedOffset < 0 || stored < 0 || prev.UncompressedOffset > math.MaxInt64-blockSize-stored {
			return 0, 0, fmt.Errorf("header of toc entry %d: previous entry's data [%d, +%d) overflows", i, prev.UncompressedOffset, stored)
		}
		start = (prev.UncompressedOffset + stored + blockSize - 1) / blockSize * blockSize
	}
	end = z.Files[i].UncompressedOffset
	if end-start < blockSize {
		return 0, 0, fmt.Errorf("header of toc entry %d: data offset %d leaves no room for a header after offset %d", i, end, start)
	}
	if end-start > MaxHeaderSize {
		return 0, 0, fmt.Errorf("header of toc entry %d: %d header bytes before data offset %d exceed %d", i, end-start, end, MaxHeaderSize)
	}
	return start, end, nil
}

// HeaderMismatchError reports that a TOC entry does not describe the tar
// header it claims: the zTOC disagrees with the layer.
type HeaderMismatchError struct {
	// Name is the entry's path in the layer, cleaned (see ConfinedPath).
	Name string
	// Field is the first field that differs, in this order: "header" (no
	// tar entry is found, or it is not one a zTOC can describe), "name",
	// "type", "offset" (the header does not end at the entry's data
	// offset), "size", "mode", "uid", "gid", "uname", "gname", "mtime",
	// "linkname", "devmajor", "devminor", "pax" (a PAX record, including
	// the sparse map).
	Field string
	// Header is the value in the layer's tar header, TOC the value in the
	// zTOC entry.
	Header, TOC string
}

func (e *HeaderMismatchError) Error() string {
	return fmt.Sprintf("%s: tar header and zTOC entry differ in %s: header has %s, zTOC has %s", e.Name, e.Field, e.Header, e.TOC)
}

// CheckHeader checks that hdrBytes, the stream bytes that HeaderRange
// gives for entry f, are exactly the tar header blocks of an entry that f
// describes: it parses them with archive/tar (skipping PAX global
// headers, as containerd does), converts the header into a TOC entry the
// way the builder does, and compares every field, including the data
// offset (the header must end exactly at the end of hdrBytes, which is
// f's data offset) and the sparse map of a GNU sparse file. A mismatch is
// a *HeaderMismatchError naming the first field that differs.
func CheckHeader(hdrBytes []byte, f *FileMetadata) error {
	name, _ := ConfinedPath(f.Name)
	mismatch := func(header string) error {
		return &HeaderMismatchError{Name: name, Field: "header", Header: header, TOC: fmt.Sprintf("a %s entry", f.Type)}
	}
	r := bytes.NewReader(hdrBytes)
	tr := tar.NewReader(r)
	var hdr *tar.Header
	var from int64 // where the entry's own header blocks start
	for hdr == nil {
		from = r.Size() - int64(r.Len())
		h, err := tr.Next()
		switch {
		case err == io.EOF:
			return mismatch("the end of the archive")
		case err != nil:
			return mismatch(fmt.Sprintf("no valid tar header (%v)", err))
		case h.Typeflag != tar.TypeXGlobalHeader:
			hdr = h
		}
	}
	end := r.Size() - int64(r.Len())
	got, _, err := tocEntry(hdr, hdrBytes[from:end], end-from > maxTap, f.UncompressedOffset-int64(len(hdrBytes))+end)
	if err != nil {
		return mismatch(err.Error())
	}
	return compareEntry(&got, f)
}

// tocEntry converts a tar header into its TOC entry, as the builder does.
// archive/tar read hdr from the stream bytes raw (the entry's header
// blocks; rawOverflow says they were too many to keep), which hold the map
// of a GNU sparse file; the entry's data starts at dataOffset. ok is false
// for entries that the TOC leaves out.
func tocEntry(hdr *tar.Header, raw []byte, rawOverflow bool, dataOffset int64) (FileMetadata, bool, error) {
	fm, ok, err := fileMetadata(hdr, dataOffset)
	if err != nil || !ok {
		return fm, ok, err
	}
	if !isSparse(hdr) {
		if _, forged := fm.PAXRecords[SparseMapRecord]; forged {
			// Only the builder writes this record: from the tar, it
			// would make readers serve holes where containerd writes
			// the file's data.
			fm.PAXRecords = maps.Clone(fm.PAXRecords)
			delete(fm.PAXRecords, SparseMapRecord)
			if len(fm.PAXRecords) == 0 {
				fm.PAXRecords = nil
			}
		}
		return fm, true, nil
	}
	if rawOverflow {
		return FileMetadata{}, false, fmt.Errorf("sparse file %q at uncompressed offset %d: header too large", hdr.Name, dataOffset)
	}
	nums, err := sparseMap(hdr, raw)
	if err != nil {
		return FileMetadata{}, false, fmt.Errorf("sparse file %q at uncompressed offset %d: %w", hdr.Name, dataOffset, err)
	}
	fm.PAXRecords = maps.Clone(fm.PAXRecords)
	if fm.PAXRecords == nil {
		fm.PAXRecords = make(map[string]string, 1)
	}
	fm.PAXRecords[SparseMapRecord] = formatSparseList(nums)
	if _, err := fm.Fragments(); err != nil {
		return FileMetadata{}, false, err
	}
	return fm, true, nil
}

// compareEntry compares got, the TOC entry converted from the layer's tar
// header, with f, the zTOC's, and returns a *HeaderMismatchError for the
// first field that differs, or nil.
func compareEntry(got, f *FileMetadata) error {
	quote := strconv.Quote
	num := func(n int64) string { return strconv.FormatInt(n, 10) }
	fields := []struct {
		name        string
		header, toc string
	}{
		{"name", quote(got.Name), quote(f.Name)},
		{"type", got.Type, f.Type},
		{"offset", num(got.UncompressedOffset), num(f.UncompressedOffset)},
		{"size", num(got.UncompressedSize), num(f.UncompressedSize)},
		{"mode", fmt.Sprintf("%#o", got.Mode), fmt.Sprintf("%#o", f.Mode)},
		{"uid", num(int64(got.UID)), num(int64(f.UID))},
		{"gid", num(int64(got.GID)), num(int64(f.GID))},
		{"uname", quote(got.Uname), quote(f.Uname)},
		{"gname", quote(got.Gname), quote(f.Gname)},
		{"mtime", modTimeString(got), modTimeString(f)},
		{"linkname", quote(got.Linkname), quote(f.Linkname)},
		{"devmajor", num(got.Devmajor), num(f.Devmajor)},
		{"devminor", num(got.Devminor), num(f.Devminor)},
	}
	for _, c := range fields {
		if c.header != c.toc {
			name, _ := ConfinedPath(f.Name)
			return &HeaderMismatchError{Name: name, Field: c.name, Header: c.header, TOC: c.toc}
		}
	}
	if h, t, ok := firstPAXDifference(got.PAXRecords, f.PAXRecords); ok {
		name, _ := ConfinedPath(f.Name)
		return &HeaderMismatchError{Name: name, Field: "pax", Header: h, TOC: t}
	}
	return nil
}

// modTimeString renders an entry's mtime as the zTOC stores it (two
// times render alike exactly when they are the same instant).
func modTimeString(f *FileMetadata) string {
	return strconv.Quote(formatModTime(f.ModTime))
}

// firstPAXDifference returns, for the first key (in sorted order) whose
// record differs between a and b, how each side renders it.
func firstPAXDifference(a, b map[string]string) (inA, inB string, differ bool) {
	keys := slices.Sorted(maps.Keys(a))
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	show := func(m map[string]string, k string) string {
		if v, ok := m[k]; ok {
			return fmt.Sprintf("%s=%q", k, v)
		}
		return k + " absent"
	}
	for _, k := range keys {
		va, okA := a[k]
		vb, okB := b[k]
		if okA != okB || va != vb {
			return show(a, k), show(b, k), true
		}
	}
	return "", "", false
}
