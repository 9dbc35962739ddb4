package ztoc

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

func TestConfinedPath(t *testing.T) {
	for _, c := range []struct {
		name, clean string
		skip        bool
	}{
		{"a/b", "a/b", false},
		{"./x", "x", false},
		{"/absolute/file.txt", "absolute/file.txt", false},
		{"a/../../b", "b", false},
		{"../../etc/passwd", "etc/passwd", false},
		{"//a//b/./c/", "a/b/c", false},
		{"dir/", "dir", false},
		{"a/..b/c..", "a/..b/c..", false},
		{".", ".", true},
		{"./", ".", true},
		{"", ".", true},
		{"..", ".", true},
		{"../", ".", true},
		{"/", ".", true},
		{"a/..", ".", true},
		{"/../..", ".", true},
	} {
		clean, skip := ConfinedPath(c.name)
		if clean != c.clean || skip != c.skip {
			t.Errorf("ConfinedPath(%q) = %q, %v; want %q, %v", c.name, clean, skip, c.clean, c.skip)
		}
	}
}

// nrNames are awkward names that containerd unpacks (or skips).
var nrNames = []string{
	"/absolute/file.txt", "./x", "a/../../b", "../../../escape", "//double//slash", "dir/./sub/../f",
	"./", ".", "..", "../", "/", "", "a/..", "plain", "x", // the last one replaces "./x"
}

// nrLayer is a tar of one regular file per name of nrNames (content: its
// index; a directory for names ending in "/") and a hardlink to each of
// two files by awkward targets.
func nrLayer(t testing.TB) []byte {
	t.Helper()
	var es []layertest.Entry
	for i, n := range nrNames {
		e := layertest.Reg(n, 0o644, []byte(fmt.Sprint("entry ", i)))
		if strings.HasSuffix(n, "/") { // archive/tar writes such names for directories only
			e = layertest.Dir(n, 0o755)
		}
		es = append(es, e)
	}
	es = append(es, layertest.Hardlink("link-abs", "/absolute/file.txt"), layertest.Hardlink("link-up", "../../plain"))
	return layertest.Tar(t, es...)
}

// nrApply unpacks a tar with containerd's archive.Apply into a new
// directory and returns its regular files by path, or Apply's error.
func nrApply(t *testing.T, tarball []byte) (map[string]string, error) {
	t.Helper()
	root := t.TempDir()
	if _, err := archive.Apply(context.Background(), root, bytes.NewReader(tarball)); err != nil {
		return nil, err
	}
	files := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		rel, _ := filepath.Rel(root, p)
		files[rel] = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files, nil
}

// TestNameRulesMatchContainerd unpacks a layer of awkward names with
// containerd and checks that the builder indexes it, the decoder accepts
// its zTOC, and ConfinedPath puts every file where containerd does.
func TestNameRulesMatchContainerd(t *testing.T) {
	tarball := nrLayer(t)
	got, err := nrApply(t, tarball)
	if err != nil {
		t.Fatalf("containerd refuses the layer: %v", err)
	}
	z, _, err := cfBuild(t, tarball, BuildOptions{SpanSize: 1 << 20, ChunkSize: -1})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	if _, z2 := roundTrip(t, z); !reflect.DeepEqual(z, z2) {
		t.Fatal("the zTOC changes through Marshal/Unmarshal")
	}
	if len(z.Files) != len(nrNames)+2 {
		t.Fatalf("TOC has %d entries, the tar %d", len(z.Files), len(nrNames)+2)
	}
	want := map[string]string{}
	for i, f := range z.Files {
		if i < len(nrNames) && f.Name != nrNames[i] {
			t.Errorf("entry %d is named %q, want the raw tar name %q", i, f.Name, nrNames[i])
		}
		clean, skip := ConfinedPath(f.Name)
		if skip || f.Type == TypeDir {
			continue
		}
		content := fmt.Sprint("entry ", i)
		if f.Type == TypeHardlink {
			target, _ := ConfinedPath(f.Linkname)
			content = want[target]
		}
		want[clean] = content
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("containerd unpacks\n%v\nConfinedPath says\n%v", got, want)
	}
	if i, err := hdFirstFailure(z, tarball); err != nil {
		t.Errorf("entry %d: %v", i, err)
	}
}

// TestNameRulesRefused: the layers containerd refuses for their names are
// the ones the builder and the decoder refuse.
func TestNameRulesRefused(t *testing.T) {
	ok := layertest.Reg("fine", 0o644, []byte("x"))
	for _, c := range []struct {
		name  string
		entry layertest.Entry
		re    string
	}{
		{"hardlink-to-root", layertest.Hardlink("l", "a/.."), "resolves to the layer root"},
		{"hardlink-to-slash", layertest.Hardlink("l", "/"), "resolves to the layer root"},
		{"hardlink-to-empty", layertest.Hardlink("l", ""), "resolves to the layer root"},
		{"whiteout-of-nothing", layertest.Reg("d/.wh.", 0o644, nil), "whiteout"},
		{"whiteout-of-dot", layertest.Reg(".wh..", 0o644, nil), "whiteout"},
		{"whiteout-of-dotdot", layertest.Reg("/d/.wh...", 0o644, nil), "whiteout"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tarball := layertest.Tar(t, layertest.Dir("d/", 0o755), ok, c.entry)
			if _, err := nrApply(t, tarball); err == nil {
				t.Fatal("containerd unpacks the layer")
			} else {
				t.Logf("containerd: %v", err)
			}
			err := cfBuildErr(t, tarball, c.re)
			if !strings.Contains(err.Error(), fmt.Sprintf("%q", c.entry.Header.Name)) {
				t.Errorf("error %q does not name the entry", err)
			}
			// The decoder refuses a zTOC holding the same entry.
			z, _, err := cfBuild(t, layertest.Tar(t, layertest.Dir("d/", 0o755), ok, ok), BuildOptions{SpanSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			h := c.entry.Header
			z.Files[2].Name, z.Files[2].Linkname = h.Name, h.Linkname
			if h.Typeflag == tar.TypeLink {
				z.Files[2].Type, z.Files[2].UncompressedSize = TypeHardlink, 0
			}
			b, err := encode(z)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Unmarshal(b); err == nil || !strings.Contains(err.Error(), c.re) {
				t.Errorf("Unmarshal: %v, want an error matching %q", err, c.re)
			}
		})
	}
}
