package toctest

import (
	"archive/tar"
	"reflect"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

func TestFromTar(t *testing.T) {
	mt := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	tarball := layertest.Tar(t,
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeDir, Name: "d/", Mode: 0o755, ModTime: mt}},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeReg, Name: "d/f", Mode: 0o600, Uid: 7, Gid: 8, ModTime: mt,
			PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}}, Data: []byte("hello")},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeChar, Name: "d/null", Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mt}},
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeLink, Name: "d/h", Linkname: "d/f", ModTime: mt}},
	)
	files, size := FromTar(t, tarball)
	want := []ztoc.FileMetadata{
		{Name: "d/", Type: ztoc.TypeDir, UncompressedOffset: 512, Mode: 0o755, ModTime: mt},
		{Name: "d/f", Type: ztoc.TypeReg, UncompressedOffset: 2048, UncompressedSize: 5, Mode: 0o600, UID: 7, GID: 8, ModTime: mt,
			PAXRecords: map[string]string{"SCHILY.xattr.user.a": "b"}},
		{Name: "d/null", Type: ztoc.TypeChar, UncompressedOffset: 3072, Mode: 0o666, Devmajor: 1, Devminor: 3, ModTime: mt},
		{Name: "d/h", Type: ztoc.TypeHardlink, UncompressedOffset: 3584, Linkname: "d/f", ModTime: mt},
	}
	if len(files) != len(want) {
		t.Fatalf("%d entries: %+v", len(files), files)
	}
	for i := range want {
		if !reflect.DeepEqual(files[i], want[i]) {
			t.Errorf("entry %d:\n got %+v\nwant %+v", i, files[i], want[i])
		}
	}
	if size != 4608 {
		t.Errorf("archive size %d, want 4608 (past the two zero blocks)", size)
	}
}
