package fusefs

import (
	"bytes"
	"compress/gzip"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestMountZtocBuild mounts the TOC that ztoc.Build writes for a gzip
// layer, checking that fusefs reads the real builder's TOC the same way
// as the one the tests build themselves.
func TestMountZtocBuild(t *testing.T) {
	entries := layerEntries()
	layer := layertest.Tar(t, entries...)
	gz := layertest.Gzip(t, layer, gzip.DefaultCompression)
	z, _, err := ztoc.Build(context.Background(), bytes.NewReader(gz), ztoc.BuildOptions{SpanSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := toctest.FromTar(t, layer)
	if len(z.Files) != len(want) {
		t.Fatalf("ztoc.Build found %d entries, want %d", len(z.Files), len(want))
	}
	for i, f := range z.Files {
		w := want[i]
		if f.Name != w.Name || f.Type != w.Type || f.UncompressedOffset != w.UncompressedOffset ||
			f.UncompressedSize != w.UncompressedSize || f.Mode != w.Mode || !f.ModTime.Equal(w.ModTime) {
			t.Errorf("entry %d: ztoc.Build %+v, want %+v", i, f, w)
		}
	}
	src := &memSource{b: layer, files: z.Files}
	mnt := mountTOC(t, z.Files, src, Options{})
	for _, p := range []string{"dir/big", "dir/file.txt", "xattrs"} {
		b, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil {
			t.Fatal(err)
		}
		var wantData []byte
		for _, e := range entries {
			if filepath.Clean(e.Header.Name) == p {
				wantData = e.Data
			}
		}
		if !bytes.Equal(b, wantData) {
			t.Errorf("%s: %d bytes differ from the tar's %d", p, len(b), len(wantData))
		}
	}
	if v := getxattr(t, filepath.Join(mnt, "xattrs"), "user.foo"); v != "bar" {
		t.Errorf("user.foo = %q", v)
	}
	src.check(t)
}
