package ztoc

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// hdBuildTOC builds the zTOC of a plain tar stream: its TOC is the one
// any compression of the stream gets.
func hdBuildTOC(t testing.TB, tarball []byte) *Ztoc {
	t.Helper()
	z, _, err := cfBuild(t, tarball, BuildOptions{SpanSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// hdFirstFailure checks the header range of every entry of z against the
// tar stream, in order, and returns the first entry that fails and why
// (-1 and nil when all pass).
func hdFirstFailure(z *Ztoc, tarball []byte) (int, error) {
	for i := range z.Files {
		start, end, err := HeaderRange(z, i)
		if err == nil {
			if end > int64(len(tarball)) {
				err = fmt.Errorf("header range [%d, %d) is past the %d-byte stream", start, end, len(tarball))
			} else {
				err = CheckHeader(tarball[start:end], &z.Files[i])
			}
		}
		if err != nil {
			return i, err
		}
	}
	return -1, nil
}

// hdTars returns every tar the builder's conformance tests use, sparse
// ones included.
func hdTars(t *testing.T) []cfTar {
	t.Helper()
	tars := slices.Clone(cfGeneratedTars(t))
	for _, s := range []struct{ name, format string }{
		{"sparse-gnu", "--format=gnu"},
		{"sparse-pax-1.0", "--sparse-version=1.0"},
		{"sparse-pax-0.1", "--sparse-version=0.1"},
		{"sparse-pax-0.0", "--sparse-version=0.0"},
	} {
		args := []string{s.format}
		if strings.HasPrefix(s.format, "--sparse-version") {
			args = append(args, "--format=posix")
		}
		tars = append(tars, cfTar{s.name, cfSparseTar(t, args...)})
	}
	return tars
}

// TestCheckHeaderLayers: every entry of every generated layer (all tar
// formats, sparse files, GNU long names, PAX records and global headers)
// passes HeaderRange and CheckHeader with the zTOC the builder makes.
func TestCheckHeaderLayers(t *testing.T) {
	for _, tr := range hdTars(t) {
		t.Run(tr.name, func(t *testing.T) {
			z := hdBuildTOC(t, tr.tar)
			if len(z.Files) == 0 {
				t.Fatal("no entries")
			}
			if i, err := hdFirstFailure(z, tr.tar); err != nil {
				t.Fatalf("entry %d %q: %v", i, z.Files[i].Name, err)
			}
		})
	}
}

// TestCheckHeaderSOCIGolden: zTOCs built by SOCI pass for every entry.
func TestCheckHeaderSOCIGolden(t *testing.T) {
	_, tarball := goldenLayers(t)
	for _, g := range goldens {
		z := g.decode(t)
		if i, err := hdFirstFailure(z, tarball); err != nil {
			t.Errorf("%s: entry %d %q: %v", g.File, i, z.Files[i].Name, err)
		}
	}
}

// hdIndex returns the index of the entry with raw name name.
func hdIndex(t testing.TB, z *Ztoc, name string) int {
	t.Helper()
	i := slices.IndexFunc(z.Files, func(f FileMetadata) bool { return f.Name == name })
	if i < 0 {
		t.Fatalf("no entry %q", name)
	}
	return i
}

// forgery changes a zTOC the way an attacker might and says which entry
// is the first one affected, and the field a *HeaderMismatchError must
// name ("" when the header range itself is refused).
type forgery struct {
	name string
	// validates says the forged zTOC still passes Validate (VerifyLayer
	// refuses the others before reading the layer).
	validates bool
	forge     func(t testing.TB, z *Ztoc) (entry int, field string)
}

// forgeEntry is the forge of a single entry: it changes the entry with
// raw name name by set, and that entry must fail naming field.
func forgeEntry(name, field string, set func(f *FileMetadata)) func(testing.TB, *Ztoc) (int, string) {
	return func(t testing.TB, z *Ztoc) (int, string) {
		j := hdIndex(t, z, name)
		set(&z.Files[j])
		return j, field
	}
}

// forgeries of the posix full tree (layertest.WriteFullTree archived by
// GNU tar --format=posix --xattrs).
var forgeries = []forgery{
	{"name", true, forgeEntry("d/hard", "name", func(f *FileMetadata) { f.Name = "d/shadow" })},
	{"type", true, forgeEntry("d/empty", "type", func(f *FileMetadata) { f.Type = TypeFifo })},
	{"offset-to-later-file", true, func(t testing.TB, z *Ztoc) (int, string) {
		// Entry j takes the data of entry j+3; the entries between go.
		j := hdIndex(t, z, "d/exact-1024")
		z.Files[j].UncompressedOffset = z.Files[j+3].UncompressedOffset
		z.Files = slices.Delete(z.Files, j+1, j+4)
		return j, "offset"
	}},
	{"offset-into-previous-file", true, func(t testing.TB, z *Ztoc) (int, string) {
		// Like the measured attack: an offset inside another file's data.
		j := hdIndex(t, z, "d/text.txt") + 1
		z.Files[j].UncompressedOffset = z.Files[j-1].UncompressedOffset + 30209
		return j, ""
	}},
	{"offset-unaligned", true, forgeEntry("d/hard", "offset", func(f *FileMetadata) { f.UncompressedOffset++ })},
	{"size", true, forgeEntry("d/hard", "size", func(f *FileMetadata) { f.UncompressedSize += 100 })},
	{"setuid", true, forgeEntry("d/hard", "mode", func(f *FileMetadata) { f.Mode |= 0o4000 })},
	{"uid", true, forgeEntry("d/text.txt", "uid", func(f *FileMetadata) { f.UID = 0 })},
	{"gid", true, forgeEntry("d/text.txt", "gid", func(f *FileMetadata) { f.GID = 0 })},
	{"uname", true, forgeEntry("d/text.txt", "uname", func(f *FileMetadata) { f.Uname = "root" })},
	{"gname", true, forgeEntry("d/text.txt", "gname", func(f *FileMetadata) { f.Gname = "root" })},
	{"mtime", true, forgeEntry("d/text.txt", "mtime", func(f *FileMetadata) { f.ModTime = f.ModTime.Add(time.Nanosecond) })},
	{"symlink-target", true, forgeEntry("d/link", "linkname", func(f *FileMetadata) { f.Linkname = "/etc/shadow" })},
	{"hardlink-target", true, forgeEntry("d/small.txt", "linkname", func(f *FileMetadata) { f.Linkname = "d/text.txt" /* was d/hard */ })},
	{"devmajor", true, forgeEntry("d/null", "devmajor", func(f *FileMetadata) { f.Devmajor = 8 })},
	{"devminor", true, forgeEntry("d/null", "devminor", func(f *FileMetadata) { f.Devminor = 0 })},
	{"xattr", true, forgeEntry("d/hard", "pax", func(f *FileMetadata) { f.PAXRecords["SCHILY.xattr.security.capability"] = "\x01\x00\x00\x02" })},
	{"entry-added-inside-data", true, func(t testing.TB, z *Ztoc) (int, string) {
		j := hdIndex(t, z, "d/text.txt")
		fake := z.Files[j]
		fake.Name, fake.UncompressedOffset, fake.UncompressedSize = "d/evil", fake.UncompressedOffset+512, 100
		z.Files = slices.Insert(z.Files, j+1, fake)
		return j + 1, ""
	}},
	{"entry-added-at-end", true, func(t testing.TB, z *Ztoc) (int, string) {
		last := z.Files[len(z.Files)-1]
		stored, _ := last.StoredSize()
		fake := FileMetadata{Name: "evil", Type: TypeReg, UncompressedOffset: (last.UncompressedOffset+stored+511)/512*512 + 512}
		z.Files = append(z.Files, fake)
		return len(z.Files) - 1, "header"
	}},
	{"entry-dropped", true, func(t testing.TB, z *Ztoc) (int, string) {
		j := hdIndex(t, z, "d/hard")
		z.Files = slices.Delete(z.Files, j, j+1)
		return j, "name"
	}},
	{"entries-reordered", true, func(t testing.TB, z *Ztoc) (int, string) {
		j := hdIndex(t, z, "d/setgid")
		z.Files[j].Name, z.Files[j+1].Name = z.Files[j+1].Name, z.Files[j].Name
		return j, "name"
	}},
	{"entries-swapped-whole", false, func(t testing.TB, z *Ztoc) (int, string) {
		j := hdIndex(t, z, "d/setgid")
		z.Files[j], z.Files[j+1] = z.Files[j+1], z.Files[j]
		return j, "name"
	}},
}

// hdPosixTar returns the posix full-tree tar of the generated tars.
func hdPosixTar(t testing.TB) []byte {
	t.Helper()
	for _, tr := range cfGeneratedTars(t) {
		if tr.name == "posix" {
			return tr.tar
		}
	}
	t.Fatal("no posix tar")
	return nil
}

// cloneZtoc returns a deep copy of z's TOC (the rest is shared).
func cloneZtoc(z *Ztoc) *Ztoc {
	c := *z
	c.Files = slices.Clone(z.Files)
	for i := range c.Files {
		if c.Files[i].PAXRecords != nil {
			c.Files[i].PAXRecords = maps.Clone(c.Files[i].PAXRecords)
		}
	}
	return &c
}

// TestCheckHeaderForgeries: each kind of forged entry is caught at the
// first affected entry, with the field that was forged.
func TestCheckHeaderForgeries(t *testing.T) {
	tarball := hdPosixTar(t)
	base := hdBuildTOC(t, tarball)
	if i, err := hdFirstFailure(base, tarball); err != nil {
		t.Fatalf("genuine zTOC: entry %d: %v", i, err)
	}
	for _, f := range forgeries {
		t.Run(f.name, func(t *testing.T) {
			z := cloneZtoc(base)
			entry, field := f.forge(t, z)
			if err := z.Validate(); (err == nil) != f.validates {
				t.Fatalf("Validate of the forged zTOC: %v (want it to pass: %v)", err, f.validates)
			}
			i, err := hdFirstFailure(z, tarball)
			if err == nil {
				t.Fatal("the forged zTOC passes every header check")
			}
			t.Logf("entry %d: %v", i, err)
			if i != entry {
				t.Fatalf("first failure at entry %d, want %d", i, entry)
			}
			hdCheckField(t, err, field)
		})
	}
}

// hdCheckField checks that err is a *HeaderMismatchError naming field
// (any error when field is "").
func hdCheckField(t *testing.T, err error, field string) {
	t.Helper()
	if field == "" {
		return
	}
	var hm *HeaderMismatchError
	if !errors.As(err, &hm) {
		t.Fatalf("error %v is not a *HeaderMismatchError", err)
	}
	if hm.Field != field {
		t.Fatalf("mismatch in field %q, want %q", hm.Field, field)
	}
	if hm.Header == hm.TOC {
		t.Fatalf("both values are %s", hm.Header)
	}
}

// TestCheckHeaderSparseMap: a forged sparse map is caught, though the
// data it stores has the same size.
func TestCheckHeaderSparseMap(t *testing.T) {
	for _, args := range [][]string{{"--format=gnu"}, {"--format=posix", "--sparse-version=1.0"}} {
		t.Run(args[len(args)-1], func(t *testing.T) {
			tarball := cfSparseTar(t, args...)
			z := hdBuildTOC(t, tarball)
			j := hdIndex(t, z, "s/holes")
			m := z.Files[j].PAXRecords[SparseMapRecord]
			first, rest, _ := strings.Cut(m, ",")
			if first != "0" {
				t.Fatalf("sparse map %q does not start at 0", m)
			}
			z.Files[j].PAXRecords[SparseMapRecord] = "512," + rest
			if err := z.Validate(); err != nil {
				t.Fatal(err)
			}
			i, err := hdFirstFailure(z, tarball)
			if i != j {
				t.Fatalf("first failure at entry %d (%v), want %d", i, err, j)
			}
			hdCheckField(t, err, "pax")
		})
	}
}

// TestCompareEntryEveryField: a change to any field of FileMetadata is a
// mismatch, so a field added later cannot be forgotten by CheckHeader.
func TestCompareEntryEveryField(t *testing.T) {
	base := FileMetadata{Name: "a", Type: TypeReg, UncompressedOffset: 512, UncompressedSize: 10, Linkname: "l", Mode: 0o644,
		UID: 1, GID: 2, Uname: "u", Gname: "g", ModTime: time.Unix(5, 6).UTC(), Devmajor: 7, Devminor: 8,
		PAXRecords: map[string]string{"k": "v"}}
	if err := compareEntry(&base, &base); err != nil {
		t.Fatal(err)
	}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		f := base
		f.PAXRecords = map[string]string{"k": "v"}
		v := reflect.ValueOf(&f).Elem().Field(i)
		switch v.Kind() {
		case reflect.String:
			v.SetString(v.String() + "x")
		case reflect.Int64:
			v.SetInt(v.Int() + 1)
		case reflect.Uint32:
			v.SetUint(v.Uint() + 1)
		case reflect.Map:
			f.PAXRecords["k"] = "w"
		case reflect.Struct: // time.Time
			f.ModTime = f.ModTime.Add(time.Nanosecond)
		default:
			t.Fatalf("field %s of kind %s: teach this test to change it", typ.Field(i).Name, v.Kind())
		}
		if err := compareEntry(&f, &base); err == nil {
			t.Errorf("a change of field %s is not a mismatch", typ.Field(i).Name)
		}
	}
}

// TestSparseMapRecordFromTar: a PAX record named like the builder's
// sparse map, on a file that is not sparse, is left out of the TOC:
// readers would otherwise serve holes where containerd writes the data.
func TestSparseMapRecordFromTar(t *testing.T) {
	data := layertest.Text(3, 3000)
	tarball := layertest.Tar(t, layertest.Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: "f", Mode: 0o644, Format: tar.FormatPAX,
		PAXRecords: map[string]string{SparseMapRecord: "0,0", "SCHILY.xattr.user.a": "b"}}, Data: data})
	z := hdBuildTOC(t, tarball)
	f := &z.Files[0]
	if _, ok := f.PAXRecords[SparseMapRecord]; ok || f.PAXRecords["SCHILY.xattr.user.a"] != "b" {
		t.Fatalf("PAX records %v", f.PAXRecords)
	}
	r, err := cfNewReader(z, tarball)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := r.WriteFile(&got, f); err != nil || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("reads back %d bytes (%v), want the file's %d", got.Len(), err, len(data))
	}
	if i, err := hdFirstFailure(z, tarball); err != nil {
		t.Fatalf("entry %d: %v", i, err)
	}
	// A zTOC that keeps the record does not describe the layer.
	f.PAXRecords[SparseMapRecord] = "0,0"
	_, err = hdFirstFailure(z, tarball)
	hdCheckField(t, err, "pax")
}
