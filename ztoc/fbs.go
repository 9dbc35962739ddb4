package ztoc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sort"
	"time"

	flatbuffers "github.com/google/flatbuffers/go"
	"github.com/opencontainers/go-digest"
)

// Field ids (declaration order) of SOCI's ztoc.fbs schema, v0.9.
const (
	// table Ztoc
	fbZtocVersion                 = 0
	fbZtocBuildToolIdentifier     = 1
	fbZtocCompressedArchiveSize   = 2
	fbZtocUncompressedArchiveSize = 3
	fbZtocTOC                     = 4
	fbZtocCompressionInfo         = 5
	fbZtocNumFields               = 6

	// table TOC
	fbTOCMetadata  = 0
	fbTOCNumFields = 1

	// table FileMetadata
	fbFileName               = 0
	fbFileType               = 1
	fbFileUncompressedOffset = 2
	fbFileUncompressedSize   = 3
	fbFileLinkname           = 4
	fbFileMode               = 5
	fbFileUID                = 6
	fbFileGID                = 7
	fbFileUname              = 8
	fbFileGname              = 9
	fbFileModTime            = 10
	fbFileDevmajor           = 11
	fbFileDevminor           = 12
	fbFileXattrs             = 13
	fbFileNumFields          = 14

	// table Xattr
	fbXattrKey       = 0
	fbXattrValue     = 1
	fbXattrNumFields = 2

	// table CompressionInfo
	fbCIAlgorithm   = 0
	fbCIMaxSpanID   = 1
	fbCISpanDigests = 2
	fbCICheckpoints = 3
	fbCINumFields   = 4
)

// Marshal encodes z as a SOCI zTOC flatbuffer (schema v0.9). The output is
// byte-identical to what SOCI's Go encoder writes for the same zTOC, so a
// zTOC digest does not depend on which tool built it. z must pass Validate:
// a zTOC that readers would reject is never written.
func Marshal(z *Ztoc) (_ []byte, err error) {
	if z == nil {
		return nil, errors.New("encode zTOC: nil zTOC")
	}
	if z.windowless != nil {
		return nil, errors.New("encode zTOC: a zTOC read from a pack head has no checkpoint windows (PackHead.Restore rebuilds the zTOC)")
	}
	if err := z.Validate(); err != nil {
		return nil, fmt.Errorf("encode zTOC: %w", err)
	}
	return encode(z)
}

// encode is Marshal without validation; tests use it to forge bad zTOCs.
func encode(z *Ztoc) (_ []byte, err error) {
	if z.MaxSpanID > math.MaxInt32 || z.MaxSpanID < math.MinInt32 {
		return nil, fmt.Errorf("encode zTOC: max span id %d does not fit the int32 field", z.MaxSpanID)
	}
	// The builder panics only when the buffer would pass 2 GiB.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("encode zTOC: %v", r)
		}
	}()

	// The creation order below is SOCI's (SOCI-FORMAT.md §1.2); changing
	// it changes the bytes and therefore the zTOC digest.
	// SOCI starts from an empty builder; the initial capacity does not
	// change the bytes (alignment is relative to the end of the buffer),
	// so pre-sizing only saves the copies of repeated growth.
	b := flatbuffers.NewBuilder(encodedSizeHint(z))
	version := b.CreateString(z.Version)
	tool := b.CreateString(z.BuildToolIdentifier)

	files := make([]flatbuffers.UOffsetT, len(z.Files))
	for i := len(z.Files) - 1; i >= 0; i-- {
		files[i] = marshalFile(b, &z.Files[i])
	}
	metadata := marshalOffsetVector(b, files)
	b.StartObject(fbTOCNumFields)
	b.PrependUOffsetTSlot(fbTOCMetadata, metadata, 0)
	toc := b.EndObject()

	checkpoints := b.CreateByteVector(z.Checkpoints)
	digests := make([]flatbuffers.UOffsetT, len(z.SpanDigests))
	for i, d := range z.SpanDigests {
		digests[i] = b.CreateString(d.String())
	}
	spanDigests := marshalOffsetVector(b, digests)
	b.StartObject(fbCINumFields)
	b.PrependInt32Slot(fbCIMaxSpanID, int32(z.MaxSpanID), 0)
	b.PrependUOffsetTSlot(fbCISpanDigests, spanDigests, 0)
	b.PrependUOffsetTSlot(fbCICheckpoints, checkpoints, 0)
	// Gzip is the schema default, so it is omitted (no ForceDefaults).
	b.PrependInt8Slot(fbCIAlgorithm, int8(z.Algorithm), int8(Gzip))
	ci := b.EndObject()

	b.StartObject(fbZtocNumFields)
	b.PrependUOffsetTSlot(fbZtocVersion, version, 0)
	b.PrependUOffsetTSlot(fbZtocBuildToolIdentifier, tool, 0)
	b.PrependUOffsetTSlot(fbZtocTOC, toc, 0)
	b.PrependInt64Slot(fbZtocCompressedArchiveSize, z.CompressedArchiveSize, 0)
	b.PrependInt64Slot(fbZtocUncompressedArchiveSize, z.UncompressedArchiveSize, 0)
	b.PrependUOffsetTSlot(fbZtocCompressionInfo, ci, 0)
	b.Finish(b.EndObject())
	return b.FinishedBytes(), nil
}

// encodedSizeHint estimates the flatbuffer size of z, slightly high.
func encodedSizeHint(z *Ztoc) int {
	n := 256 + len(z.Version) + len(z.BuildToolIdentifier) + len(z.Checkpoints) + 80*len(z.SpanDigests)
	for i := range z.Files {
		f := &z.Files[i]
		n += 200 + len(f.Name) + len(f.Type) + len(f.Linkname) + len(f.Uname) + len(f.Gname)
		for k, v := range f.PAXRecords {
			n += 40 + len(k) + len(v)
		}
	}
	return n
}

// marshalFile writes one FileMetadata table (and the strings and xattrs it
// points to) in SOCI's order and returns its offset.
func marshalFile(b *flatbuffers.Builder, f *FileMetadata) flatbuffers.UOffsetT {
	name := b.CreateString(f.Name)
	typ := b.CreateString(f.Type)
	linkname := b.CreateString(f.Linkname)
	uname := b.CreateString(f.Uname)
	gname := b.CreateString(f.Gname)
	modTime := b.CreateString(formatModTime(f.ModTime))

	keys := make([]string, 0, len(f.PAXRecords))
	for k := range f.PAXRecords {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	xattrs := make([]flatbuffers.UOffsetT, len(keys))
	for i, k := range keys {
		key := b.CreateString(k)
		value := b.CreateString(f.PAXRecords[k])
		b.StartObject(fbXattrNumFields)
		b.PrependUOffsetTSlot(fbXattrKey, key, 0)
		b.PrependUOffsetTSlot(fbXattrValue, value, 0)
		xattrs[i] = b.EndObject()
	}
	xattrVec := marshalOffsetVector(b, xattrs)

	b.StartObject(fbFileNumFields)
	b.PrependUOffsetTSlot(fbFileName, name, 0)
	b.PrependUOffsetTSlot(fbFileType, typ, 0)
	b.PrependInt64Slot(fbFileUncompressedOffset, f.UncompressedOffset, 0)
	b.PrependInt64Slot(fbFileUncompressedSize, f.UncompressedSize, 0)
	b.PrependUOffsetTSlot(fbFileLinkname, linkname, 0)
	b.PrependInt64Slot(fbFileMode, f.Mode, 0)
	b.PrependUint32Slot(fbFileUID, f.UID, 0)
	b.PrependUint32Slot(fbFileGID, f.GID, 0)
	b.PrependUOffsetTSlot(fbFileUname, uname, 0)
	b.PrependUOffsetTSlot(fbFileGname, gname, 0)
	b.PrependUOffsetTSlot(fbFileModTime, modTime, 0)
	b.PrependInt64Slot(fbFileDevmajor, f.Devmajor, 0)
	b.PrependInt64Slot(fbFileDevminor, f.Devminor, 0)
	b.PrependUOffsetTSlot(fbFileXattrs, xattrVec, 0)
	return b.EndObject()
}

// marshalOffsetVector writes a vector of table or string offsets.
func marshalOffsetVector(b *flatbuffers.Builder, offs []flatbuffers.UOffsetT) flatbuffers.UOffsetT {
	b.StartVector(flatbuffers.SizeUOffsetT, len(offs), flatbuffers.SizeUOffsetT)
	for i := len(offs) - 1; i >= 0; i-- {
		b.PrependUOffsetT(offs[i])
	}
	return b.EndVector(len(offs))
}

// formatModTime renders a modification time the way SOCI stores it: Go's
// MarshalText (RFC 3339, nanoseconds with trailing zeros trimmed), or the
// empty string when the year is outside 0-9999.
func formatModTime(t time.Time) string {
	text, err := t.UTC().MarshalText()
	if err != nil {
		return ""
	}
	return string(text)
}

// parseModTime is the inverse of formatModTime. The empty string stands for
// an unrepresentable time and decodes to the zero Time.
func parseModTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, err
	}
	t = t.UTC()
	if y := t.Year(); y < 0 || y > 9999 {
		return time.Time{}, fmt.Errorf("time %q is outside years 0-9999 in UTC", s)
	}
	return t, nil
}

// Unmarshal decodes a SOCI zTOC flatbuffer and checks it with Validate. It
// treats b as hostile: every offset and length is bounds-checked before
// use, allocations stay proportional to len(b), and malformed input yields
// an error, never a panic. The result does not alias b. Mod times are in
// UTC (the zero Time for an empty mod_time); Files and PAXRecords are nil
// when empty, so Unmarshal(Marshal(z)) equals z for any z it returned.
func Unmarshal(b []byte) (*Ztoc, error) {
	d := &fbDecoder{buf: b, budget: int64(len(b))}
	z, err := d.ztoc()
	if err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	if err := z.Validate(); err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	return z, nil
}

// fbDecoder reads flatbuffers defensively. budget bounds what is decoded:
// every table, string, vector element and byte vector read is charged the
// buffer bytes it occupies. A flatbuffer written by SOCI never shares
// tables, strings or vectors (only vtables, which are not charged), so its
// charges add up to at most len(buf); a hostile one pointing many offsets
// at the same object runs out of budget instead of making the decoder
// allocate far more than its size.
type fbDecoder struct {
	buf    []byte
	budget int64
}

// need checks that n bytes at pos are inside the buffer.
func (d *fbDecoder) need(pos, n int64) error {
	if pos < 0 || n < 0 || pos > int64(len(d.buf)) || n > int64(len(d.buf))-pos {
		return fmt.Errorf("%d bytes at offset %d are outside the %d-byte buffer", n, pos, len(d.buf))
	}
	return nil
}

// spend charges n bytes of decoded output against the budget.
func (d *fbDecoder) spend(n int64) error {
	d.budget -= n
	if d.budget < 0 {
		return fmt.Errorf("objects are referenced more than once (decoded data exceeds the %d-byte buffer)", len(d.buf))
	}
	return nil
}

// fbTable is a bounds-checked flatbuffers table: its vtable and its inline
// data are known to lie inside the buffer.
type fbTable struct {
	d    *fbDecoder
	pos  int64 // start of the table (its vtable offset)
	vt   int64 // start of the vtable
	vlen int64 // vtable size in bytes
	tlen int64 // table size in bytes
}

// table opens the table that starts at pos.
func (d *fbDecoder) table(pos int64) (fbTable, error) {
	if err := d.need(pos, 4); err != nil {
		return fbTable{}, fmt.Errorf("table: %w", err)
	}
	vt := pos - int64(int32(binary.LittleEndian.Uint32(d.buf[pos:])))
	if err := d.need(vt, 4); err != nil {
		return fbTable{}, fmt.Errorf("vtable of table at %d: %w", pos, err)
	}
	vlen := int64(binary.LittleEndian.Uint16(d.buf[vt:]))
	tlen := int64(binary.LittleEndian.Uint16(d.buf[vt+2:]))
	if vlen < 4 || vlen%2 != 0 || d.need(vt, vlen) != nil {
		return fbTable{}, fmt.Errorf("vtable of table at %d: bad size %d", pos, vlen)
	}
	if tlen < 4 || d.need(pos, tlen) != nil {
		return fbTable{}, fmt.Errorf("table at %d: bad size %d", pos, tlen)
	}
	if err := d.spend(tlen); err != nil {
		return fbTable{}, err
	}
	return fbTable{d: d, pos: pos, vt: vt, vlen: vlen, tlen: tlen}, nil
}

// field returns the position of field id, which is size bytes wide, or -1
// when the field is absent (holds its default).
func (t fbTable) field(id int, size int64) (int64, error) {
	slot := 4 + 2*int64(id)
	if slot+2 > t.vlen {
		return -1, nil
	}
	o := int64(binary.LittleEndian.Uint16(t.d.buf[t.vt+slot:]))
	if o == 0 {
		return -1, nil
	}
	if o < 4 || o+size > t.tlen {
		return 0, fmt.Errorf("field %d at +%d overflows its %d-byte table", id, o, t.tlen)
	}
	return t.pos + o, nil
}

func (t fbTable) int64Field(id int) (int64, error) {
	p, err := t.field(id, 8)
	if err != nil || p < 0 {
		return 0, err
	}
	return int64(binary.LittleEndian.Uint64(t.d.buf[p:])), nil
}

func (t fbTable) uint32Field(id int) (uint32, error) {
	p, err := t.field(id, 4)
	if err != nil || p < 0 {
		return 0, err
	}
	return binary.LittleEndian.Uint32(t.d.buf[p:]), nil
}

func (t fbTable) int32Field(id int) (int32, error) {
	v, err := t.uint32Field(id)
	return int32(v), err
}

func (t fbTable) int8Field(id int, def int8) (int8, error) {
	p, err := t.field(id, 1)
	if err != nil || p < 0 {
		return def, err
	}
	return int8(t.d.buf[p]), nil
}

// ref follows the offset stored in field id. ok is false when the field is
// absent.
func (t fbTable) ref(id int) (pos int64, ok bool, err error) {
	p, err := t.field(id, 4)
	if err != nil || p < 0 {
		return 0, false, err
	}
	off := int64(binary.LittleEndian.Uint32(t.d.buf[p:]))
	if off == 0 {
		return 0, false, fmt.Errorf("field %d: zero offset", id)
	}
	if err := t.d.need(p+off, 4); err != nil {
		return 0, false, fmt.Errorf("field %d: %w", id, err)
	}
	return p + off, true, nil
}

// vector returns the start and length of the vector at pos whose elements
// are elem bytes wide, checking that all of it is inside the buffer.
func (d *fbDecoder) vector(pos, elem int64) (start, n int64, err error) {
	if err := d.need(pos, 4); err != nil {
		return 0, 0, fmt.Errorf("vector: %w", err)
	}
	n = int64(binary.LittleEndian.Uint32(d.buf[pos:]))
	start = pos + 4
	if n > (int64(len(d.buf))-start)/elem {
		return 0, 0, fmt.Errorf("vector at %d: %d elements of %d bytes overrun the %d-byte buffer", pos, n, elem, len(d.buf))
	}
	return start, n, nil
}

// vectorField returns the vector in field id; n is 0 when it is absent.
func (t fbTable) vectorField(id int, elem int64) (start, n int64, err error) {
	pos, ok, err := t.ref(id)
	if err != nil || !ok {
		return 0, 0, err
	}
	start, n, err = t.d.vector(pos, elem)
	if err != nil {
		return 0, 0, fmt.Errorf("field %d: %w", id, err)
	}
	return start, n, nil
}

// bytesField returns a copy of the byte vector (or string) in field id.
func (t fbTable) bytesField(id int) ([]byte, error) {
	start, n, err := t.vectorField(id, 1)
	if err != nil {
		return nil, err
	}
	if err := t.d.spend(4 + n); err != nil {
		return nil, err
	}
	return append([]byte(nil), t.d.buf[start:start+n]...), nil
}

// stringField returns a copy of the string in field id ("" when absent).
func (t fbTable) stringField(id int) (string, error) {
	pos, ok, err := t.ref(id)
	if err != nil || !ok {
		return "", err
	}
	s, err := t.d.stringAt(pos)
	if err != nil {
		return "", fmt.Errorf("field %d: %w", id, err)
	}
	return s, nil
}

// offsetVectorField returns the positions of the tables or strings listed
// by the offset vector in field id.
func (t fbTable) offsetVectorField(id int) ([]int64, error) {
	start, n, err := t.vectorField(id, 4)
	if err != nil || n == 0 {
		return nil, err
	}
	if err := t.d.spend(4 * n); err != nil {
		return nil, err
	}
	out := make([]int64, n)
	for i := range out {
		p := start + 4*int64(i)
		off := int64(binary.LittleEndian.Uint32(t.d.buf[p:]))
		if off == 0 {
			return nil, fmt.Errorf("field %d element %d: zero offset", id, i)
		}
		if err := t.d.need(p+off, 4); err != nil {
			return nil, fmt.Errorf("field %d element %d: %w", id, i, err)
		}
		out[i] = p + off
	}
	return out, nil
}

// tableField opens the table in field id.
func (t fbTable) tableField(id int) (fbTable, bool, error) {
	pos, ok, err := t.ref(id)
	if err != nil || !ok {
		return fbTable{}, false, err
	}
	sub, err := t.d.table(pos)
	if err != nil {
		return fbTable{}, false, fmt.Errorf("field %d: %w", id, err)
	}
	return sub, true, nil
}

// stringAt returns a copy of the string at pos, which must be
// NUL-terminated like every flatbuffers string.
func (d *fbDecoder) stringAt(pos int64) (string, error) {
	start, n, err := d.vector(pos, 1)
	if err != nil {
		return "", err
	}
	if d.need(start, n+1) != nil || d.buf[start+n] != 0 {
		return "", fmt.Errorf("string at %d is not NUL-terminated", pos)
	}
	if err := d.spend(4 + n + 1); err != nil {
		return "", err
	}
	return string(d.buf[start : start+n]), nil
}

// ztoc decodes the root Ztoc table.
func (d *fbDecoder) ztoc() (*Ztoc, error) {
	z, root, toc, err := d.rootAndTOC()
	if err != nil {
		return nil, err
	}
	files, err := toc.offsetVectorField(fbTOCMetadata)
	if err != nil {
		return nil, fmt.Errorf("toc: %w", err)
	}
	// Files are appended as they decode rather than allocated up front:
	// each costs far more memory than the 4-byte offset that announces it,
	// but no more than a small multiple of the buffer bytes it is charged.
	for i, pos := range files {
		var f FileMetadata
		if err := d.file(pos, &f); err != nil {
			return nil, fmt.Errorf("toc entry %d: %w", i, err)
		}
		z.Files = append(z.Files, f)
	}
	if err := d.compressionInfoOf(root, z); err != nil {
		return nil, err
	}
	return z, nil
}

// compressionInfoOf decodes the root table's CompressionInfo into z.
func (d *fbDecoder) compressionInfoOf(root fbTable, z *Ztoc) error {
	ci, ok, err := root.tableField(fbZtocCompressionInfo)
	if err != nil {
		return fmt.Errorf("compression info: %w", err)
	}
	if !ok {
		return errors.New("compression info is missing")
	}
	if err := d.compressionInfo(ci, &z.CompressionInfo); err != nil {
		return fmt.Errorf("compression info: %w", err)
	}
	return nil
}

// rootAndTOC decodes the root Ztoc table's scalar fields and opens its TOC
// table (whose entries the caller decodes).
func (d *fbDecoder) rootAndTOC() (*Ztoc, fbTable, fbTable, error) {
	if err := d.need(0, 8); err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("too short for a flatbuffer: %w", err)
	}
	root, err := d.table(int64(binary.LittleEndian.Uint32(d.buf)))
	if err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("root: %w", err)
	}
	z := &Ztoc{}
	if z.Version, err = root.stringField(fbZtocVersion); err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("version: %w", err)
	}
	if z.BuildToolIdentifier, err = root.stringField(fbZtocBuildToolIdentifier); err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("build tool identifier: %w", err)
	}
	if z.CompressedArchiveSize, err = root.int64Field(fbZtocCompressedArchiveSize); err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("compressed archive size: %w", err)
	}
	if z.UncompressedArchiveSize, err = root.int64Field(fbZtocUncompressedArchiveSize); err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("uncompressed archive size: %w", err)
	}

	toc, ok, err := root.tableField(fbZtocTOC)
	if err != nil {
		return nil, fbTable{}, fbTable{}, fmt.Errorf("toc: %w", err)
	}
	if !ok {
		return nil, fbTable{}, fbTable{}, errors.New("toc is missing")
	}
	return z, root, toc, nil
}

// file decodes the FileMetadata table at pos into f.
func (d *fbDecoder) file(pos int64, f *FileMetadata) error {
	t, err := d.table(pos)
	if err != nil {
		return err
	}
	strs := []struct {
		id  int
		dst *string
	}{
		{fbFileName, &f.Name},
		{fbFileType, &f.Type},
		{fbFileLinkname, &f.Linkname},
		{fbFileUname, &f.Uname},
		{fbFileGname, &f.Gname},
	}
	for _, s := range strs {
		if *s.dst, err = t.stringField(s.id); err != nil {
			return err
		}
	}
	// Validate rejects this too; failing early keeps entries that are
	// cheap to forge from piling up in memory. (An empty name is valid:
	// containerd skips such an entry, see ConfinedPath.)
	if f.Type == "" {
		return fmt.Errorf("%q: entry without type", f.Name)
	}
	ints := []struct {
		id  int
		dst *int64
	}{
		{fbFileUncompressedOffset, &f.UncompressedOffset},
		{fbFileUncompressedSize, &f.UncompressedSize},
		{fbFileMode, &f.Mode},
		{fbFileDevmajor, &f.Devmajor},
		{fbFileDevminor, &f.Devminor},
	}
	for _, n := range ints {
		if *n.dst, err = t.int64Field(n.id); err != nil {
			return err
		}
	}
	if f.UID, err = t.uint32Field(fbFileUID); err != nil {
		return err
	}
	if f.GID, err = t.uint32Field(fbFileGID); err != nil {
		return err
	}
	modTime, err := t.stringField(fbFileModTime)
	if err != nil {
		return err
	}
	if f.ModTime, err = parseModTime(modTime); err != nil {
		return fmt.Errorf("%q: mod_time: %w", f.Name, err)
	}

	return d.xattrs(t, f)
}

// xattrs decodes the xattrs of the FileMetadata table t into
// f.PAXRecords, refusing a key that appears twice.
func (d *fbDecoder) xattrs(t fbTable, f *FileMetadata) error {
	xattrs, err := t.offsetVectorField(fbFileXattrs)
	if err != nil {
		return fmt.Errorf("%q: xattrs: %w", f.Name, err)
	}
	for i, xpos := range xattrs {
		x, err := d.table(xpos)
		if err != nil {
			return fmt.Errorf("%q: xattr %d: %w", f.Name, i, err)
		}
		key, err := x.stringField(fbXattrKey)
		if err != nil {
			return fmt.Errorf("%q: xattr %d key: %w", f.Name, i, err)
		}
		value, err := x.stringField(fbXattrValue)
		if err != nil {
			return fmt.Errorf("%q: xattr %q: %w", f.Name, key, err)
		}
		if f.PAXRecords == nil {
			f.PAXRecords = make(map[string]string, len(xattrs))
		}
		if _, dup := f.PAXRecords[key]; dup {
			return fmt.Errorf("%q: xattr %q appears twice", f.Name, key)
		}
		f.PAXRecords[key] = value
	}
	return nil
}

// compressionInfo decodes the CompressionInfo table t into ci.
func (d *fbDecoder) compressionInfo(t fbTable, ci *CompressionInfo) error {
	alg, err := t.int8Field(fbCIAlgorithm, int8(Gzip))
	if err != nil {
		return fmt.Errorf("algorithm: %w", err)
	}
	ci.Algorithm = Compression(alg)
	maxSpan, err := t.int32Field(fbCIMaxSpanID)
	if err != nil {
		return fmt.Errorf("max span id: %w", err)
	}
	ci.MaxSpanID = SpanID(maxSpan)
	digests, err := t.offsetVectorField(fbCISpanDigests)
	if err != nil {
		return fmt.Errorf("span digests: %w", err)
	}
	if len(digests) > 0 {
		ci.SpanDigests = make([]digest.Digest, len(digests))
	}
	for i, pos := range digests {
		s, err := d.stringAt(pos)
		if err != nil {
			return fmt.Errorf("span digest %d: %w", i, err)
		}
		ci.SpanDigests[i] = digest.Digest(s)
	}
	if ci.Checkpoints, err = t.bytesField(fbCICheckpoints); err != nil {
		return fmt.Errorf("checkpoints: %w", err)
	}
	return nil
}

// Validate checks that z is consistent and safe to serve: the version is
// known, the checkpoints describe ordered spans covering the archive from
// offset 0, there is one SHA-256 digest per span, and every TOC entry has a
// known type, a name that containerd would unpack (see ConfinedPath:
// absolute names and ".." components are confined to the root, not
// refused), and data inside the archive, in archive order. Unmarshal and
// Marshal call it, so a zTOC that passes through either is safe to use.
// It does not prove the zTOC describes its layer: HeaderRange and
// CheckHeader bind entries to the layer's tar headers, and VerifyLayer
// checks a whole layer.
func (z *Ztoc) Validate() error {
	if z.Version != Version {
		return fmt.Errorf("unsupported zTOC version %q (want %q)", z.Version, Version)
	}
	if z.CompressedArchiveSize < 0 || z.UncompressedArchiveSize < 0 {
		return fmt.Errorf("negative archive size (compressed %d, uncompressed %d)", z.CompressedArchiveSize, z.UncompressedArchiveSize)
	}
	spans, err := z.Spans()
	if err != nil {
		return err
	}
	if spans[0].UncompressedStart != 0 {
		return fmt.Errorf("span 0 starts at uncompressed offset %d, not 0", spans[0].UncompressedStart)
	}
	if z.Algorithm == Uncompressed && z.UncompressedArchiveSize > z.CompressedArchiveSize {
		return fmt.Errorf("tar layer of %d bytes cannot hold a %d-byte archive", z.CompressedArchiveSize, z.UncompressedArchiveSize)
	}
	for i, d := range z.SpanDigests {
		if err := d.Validate(); err != nil {
			return fmt.Errorf("span digest %d %q: %w", i, d, err)
		}
		if d.Algorithm() != digest.SHA256 {
			return fmt.Errorf("span digest %d %q: algorithm is not sha256", i, d)
		}
	}
	prev := int64(-1)
	for i := range z.Files {
		f := &z.Files[i]
		if err := z.validateFile(f); err != nil {
			return fmt.Errorf("toc entry %d %q: %w", i, f.Name, err)
		}
		if f.UncompressedOffset <= prev {
			return fmt.Errorf("toc entry %d %q: data offset %d does not follow the previous entry's %d", i, f.Name, f.UncompressedOffset, prev)
		}
		prev = f.UncompressedOffset
	}
	return nil
}

// validateFile checks one TOC entry against the archive.
func (z *Ztoc) validateFile(f *FileMetadata) error {
	switch f.Type {
	case TypeReg, TypeDir, TypeSymlink, TypeHardlink, TypeChar, TypeBlock, TypeFifo:
	default:
		return fmt.Errorf("unknown entry type %q", f.Type)
	}
	if err := checkEntryNames(f.Name, f.Type, f.Linkname); err != nil {
		return err
	}
	if f.UncompressedOffset < 0 || f.UncompressedOffset > z.UncompressedArchiveSize {
		return fmt.Errorf("data offset %d is outside the %d-byte archive", f.UncompressedOffset, z.UncompressedArchiveSize)
	}
	if f.UncompressedSize < 0 {
		return fmt.Errorf("negative size %d", f.UncompressedSize)
	}
	stored, err := f.StoredSize()
	if err != nil {
		return err
	}
	if stored > z.UncompressedArchiveSize-f.UncompressedOffset {
		return fmt.Errorf("data [%d, +%d) runs past the end of the %d-byte archive", f.UncompressedOffset, stored, z.UncompressedArchiveSize)
	}
	return nil
}
