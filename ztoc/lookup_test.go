package ztoc

import (
	"archive/tar"
	"bytes"
	"strings"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// cfMustReader builds blob's zTOC and a cfReader over blob.
func cfMustReader(t testing.TB, blob []byte, spanSize int64) (*Ztoc, *cfReader) {
	t.Helper()
	z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: spanSize})
	if err != nil {
		t.Fatal(err)
	}
	r, err := cfNewReader(z, blob)
	if err != nil {
		t.Fatal(err)
	}
	return z, r
}

// TestLookup: Lookup names the missing path, and cleans the paths it is
// asked for.
func TestLookup(t *testing.T) {
	blob := layertest.SeededTar(t, 7)
	z, _, err := cfBuild(t, blob, BuildOptions{SpanSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := z.Lookup("r/missing"); err == nil || !strings.Contains(err.Error(), "r/missing") {
		t.Errorf("Lookup(missing) = %v", err)
	}
	for _, p := range []string{"/r/b", "./r/b", "r//b", "r/./b"} {
		if g, err := z.Lookup(p); err != nil || g.Name != "r/b" {
			t.Errorf("Lookup(%q) = %v, %v", p, g, err)
		}
	}
}

// TestLookupHardlinkToReplacedFile: a hardlink refers to the entry of its
// target that precedes it in the archive. When that path is written again
// later, the link keeps the earlier contents (GNU tar and containerd unlink
// and recreate the path), so Lookup must not follow the link to the later
// entry.
func TestLookupHardlinkToReplacedFile(t *testing.T) {
	reg := func(name, data string) cfEntry {
		return cfEntry{tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, ModTime: cfTimeBase}, []byte(data)}
	}
	tarball := cfWriteTar(t, []cfEntry{
		reg("a", "first version of a\n"),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "b", Linkname: "a", ModTime: cfTimeBase}},
		reg("a", "second version of a\n"),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "c", Linkname: "a", ModTime: cfTimeBase}},
	})
	for _, c := range cfCompressionsNamed(t, "tar", "gzip-6") {
		t.Run(c.name, func(t *testing.T) {
			blob := c.compress(t, tarball)
			z, r := cfMustReader(t, blob, 16<<10)
			for name, want := range map[string]string{"a": "second version of a\n", "b": "first version of a\n", "c": "second version of a\n"} {
				f, err := z.Lookup(name)
				if err != nil {
					t.Fatal(err)
				}
				var got bytes.Buffer
				if _, err := r.WriteFile(&got, f); err != nil || got.String() != want {
					t.Errorf("Lookup(%q) + WriteFile = %q, %v; GNU tar extracts %q", name, got.String(), err, want)
				}
			}
			cfCompareExtraction(t, z, r, cfExtract(t, cfWriteLayer(t, blob)))
		})
	}
}
