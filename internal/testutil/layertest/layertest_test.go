package layertest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestTarAndWalk(t *testing.T) {
	tarball := Tar(t,
		Dir("d/", 0o755),
		Reg("d/f", 0o644, []byte("hello")),
		Symlink("d/l", "f"),
		Hardlink("d/h", "d/f"),
		Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: "d/" + strings.Repeat("n", 120), Mode: 0o600, Format: tar.FormatGNU}, Data: []byte("long")},
	)
	type got struct {
		name   string
		offset int64
		data   string
	}
	var members []got
	end, err := Walk(tarball, func(h *tar.Header, offset int64, data io.Reader) error {
		b, err := io.ReadAll(data)
		members = append(members, got{h.Name, offset, string(b)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []got{{"d/", 512, ""}, {"d/f", 1024, "hello"}, {"d/l", 2048, ""}, {"d/h", 2560, ""},
		{"d/" + strings.Repeat("n", 120), 4096, "long"}} // a GNU long-name header and its block precede it
	if len(members) != len(want) {
		t.Fatalf("members %+v", members)
	}
	for i := range want {
		if members[i] != want[i] {
			t.Errorf("member %d: %+v, want %+v", i, members[i], want[i])
		}
	}
	if end != 4096+512+1024 || int(end) != len(tarball) {
		t.Errorf("end of archive at %d, want past the two zero blocks at %d (archive of %d bytes)", end, 4096+512+1024, len(tarball))
	}
	if _, err := Walk(tarball[:700], func(*tar.Header, int64, io.Reader) error { return nil }); err == nil {
		t.Error("Walk of a truncated tar succeeded")
	}
}

func TestGzipForms(t *testing.T) {
	data := Text(1, 100000)
	if !bytes.Equal(Gunzip(t, Gzip(t, data, gzip.BestSpeed)), data) {
		t.Error("Gzip does not round-trip")
	}
	stored := Gzip(t, data, gzip.NoCompression)
	if len(stored) <= len(data) {
		t.Errorf("stored gzip of %d bytes is %d bytes", len(data), len(stored))
	}
	multi := GzipMembers(t, gzip.DefaultCompression, data[:777], nil, data[777:])
	if !bytes.Equal(Gunzip(t, multi), data) {
		t.Error("GzipMembers does not decompress to its parts")
	}
	cli := GzipCommandMembers(t, data, 20011, "-6")
	if !bytes.Equal(Gunzip(t, cli), data) || bytes.Count(cli, []byte{0x1f, 0x8b, 8}) < 5 {
		t.Error("GzipCommandMembers does not make several members of the data")
	}
	gz := RewriteGzipHeader(t, GzipCommand(t, data, "-9"), GzipFields{Extra: []byte("SP\x02\x00ab"), Name: "n.tar", Comment: "c", HeaderCRC: true})
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	if zr.Name != "n.tar" || zr.Comment != "c" || string(zr.Extra) != "SP\x02\x00ab" {
		t.Errorf("header %+v", zr.Header)
	}
	if b, err := io.ReadAll(zr); err != nil || !bytes.Equal(b, data) {
		t.Errorf("rewritten stream: %v", err)
	}
	named := GzipMember(t, data, gzip.BestCompression, gzip.Header{Name: "x"})
	if named[3]&0x08 == 0 {
		t.Error("GzipMember did not write FNAME")
	}
}

func TestDeterministic(t *testing.T) {
	if !bytes.Equal(Random(5, 1000), Random(5, 1000)) || bytes.Equal(Random(5, 1000), Random(6, 1000)) {
		t.Error("Random is not a function of its seed")
	}
	if len(Text(3, 12345)) != 12345 || !bytes.Equal(Text(3, 100), Text(3, 100)) {
		t.Error("Text")
	}
	a, err := FormatsTar()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := FormatsTar()
	if !bytes.Equal(a, b) {
		t.Error("FormatsTar differs between calls")
	}
	s1, s2 := SeededTar(t, 1), SeededTar(t, 2)
	if len(s1) != len(s2) || bytes.Equal(s1, s2) || !bytes.Equal(s1, SeededTar(t, 1)) {
		t.Error("SeededTar: seeds must change the contents, not the size")
	}
}

func TestEdgeTar(t *testing.T) {
	const s = 16 << 10
	tarball, err := EdgeTar(s)
	if err != nil {
		t.Fatal(err)
	}
	where := map[string][2]int64{}
	if _, err := Walk(tarball, func(h *tar.Header, off int64, _ io.Reader) error {
		where[h.Name] = [2]int64{off, off + h.Size}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, e := range EdgeFiles {
		r := where[e.Name]
		crossed := int((r[1]-1)/s - r[0]/s)
		if (r[0]%s == 0) != e.StartsOn || (r[1]%s == 0) != e.EndsOn || crossed != e.Crossed {
			t.Errorf("%s holds [%d, %d), not where EdgeFiles says", e.Name, r[0], r[1])
		}
	}
}

// TestTrees archives the trees with GNU tar (they need root: devices and
// owners) and checks that what makes them special is in the archives.
func TestTrees(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the trees need root (mknod, chown): run the tests as root")
	}
	root := t.TempDir()
	for _, write := range []func(string) error{WriteFullTree, WriteSimpleTree, WriteSparseTree} {
		if err := write(root); err != nil {
			t.Fatal(err)
		}
	}
	full, err := GNUTar(root, FullTreeDir, "--format=posix", "--xattrs", "--xattrs-include=*")
	if err != nil {
		t.Fatal(err)
	}
	types := map[byte]int{}
	if _, err := Walk(full, func(h *tar.Header, _ int64, _ io.Reader) error {
		types[h.Typeflag]++
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []byte{tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo} {
		if types[typ] == 0 {
			t.Errorf("the full tree has no member of type %q", typ)
		}
	}
	if !bytes.Contains(full, []byte("SCHILY.xattr.user.x")) {
		t.Error("the full tree's PAX archive has no xattr")
	}
	sparse, err := GNUTar(root, SparseTreeDir, "--sparse", "--format=posix")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(sparse, []byte("GNU.sparse.")) {
		t.Error("the sparse tree's archive has no sparse member")
	}
	if _, err := os.Stat(filepath.Join(root, SimpleTreeDir, "null")); err != nil {
		t.Error(err)
	}
}

// TestFindUp: the Debian layer's script is found from a package directory
// below the repository's root; a path that is nowhere is an error.
func TestFindUp(t *testing.T) {
	p, err := findUp(debianScript)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := filepath.Abs(filepath.Join("..", "..", "..", debianScript)); p != want {
		t.Errorf("findUp(%s) = %s, want %s", debianScript, p, want)
	}
	if p, err := findUp("no/such/file-anywhere"); err == nil {
		t.Errorf("findUp of a missing file = %s", p)
	}
}
