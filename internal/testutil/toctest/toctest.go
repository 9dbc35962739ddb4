// Package toctest derives the TOC a zTOC must hold for a tar stream from
// archive/tar's own reading of it, independently of ztoc.Build: the
// expected value of builder tests and the TOC of file system tests that
// serve an in-memory tar.
package toctest

import (
	"archive/tar"
	"fmt"
	"io"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/ztoc"
)

// tocTypes maps archive/tar's type flags to the TOC's types.
var tocTypes = map[byte]string{
	tar.TypeReg:     ztoc.TypeReg,
	tar.TypeDir:     ztoc.TypeDir,
	tar.TypeSymlink: ztoc.TypeSymlink,
	tar.TypeLink:    ztoc.TypeHardlink,
	tar.TypeChar:    ztoc.TypeChar,
	tar.TypeBlock:   ztoc.TypeBlock,
	tar.TypeFifo:    ztoc.TypeFifo,
}

// FromTar reads tarball with archive/tar the way SOCI's builder does
// (SOCI-FORMAT.md §1.4: an entry's data offset is the stream position right
// after Next) and returns the TOC it must yield and the uncompressed
// archive size (the offset past the end-of-archive marker). Members of
// other types (PAX global headers, sparse files) fail the test: SOCI
// rejects them.
func FromTar(t testing.TB, tarball []byte) ([]ztoc.FileMetadata, int64) {
	t.Helper()
	var files []ztoc.FileMetadata
	size, err := layertest.Walk(tarball, func(h *tar.Header, offset int64, _ io.Reader) error {
		typ, ok := tocTypes[h.Typeflag]
		if !ok {
			return fmt.Errorf("tar entry %q: unexpected type %q", h.Name, h.Typeflag)
		}
		f := ztoc.FileMetadata{
			Name:               h.Name,
			Type:               typ,
			UncompressedOffset: offset,
			Linkname:           h.Linkname,
			Mode:               h.Mode,
			UID:                uint32(h.Uid),
			GID:                uint32(h.Gid),
			Uname:              h.Uname,
			Gname:              h.Gname,
			ModTime:            h.ModTime.UTC(),
			Devmajor:           h.Devmajor,
			Devminor:           h.Devminor,
		}
		if typ == ztoc.TypeReg {
			f.UncompressedSize = h.Size
		}
		if len(h.PAXRecords) > 0 {
			f.PAXRecords = h.PAXRecords
		}
		files = append(files, f)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files, size
}
