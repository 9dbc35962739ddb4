//go:build linux

package treediff

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// recorder is a testing.TB that keeps what Compare reports.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

// tree makes a small tree in a new directory, changed by edit.
func tree(t *testing.T, edit func(root string)) string {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "d"), 0o755))
	must(os.WriteFile(filepath.Join(root, "d/f"), []byte("content"), 0o644))
	must(os.Link(filepath.Join(root, "d/f"), filepath.Join(root, "h")))
	must(os.Symlink("d/f", filepath.Join(root, "l")))
	if edit != nil {
		edit(root)
	}
	mt := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	ts := []unix.Timespec{unix.NsecToTimespec(mt.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
	for _, p := range []string{"l", "d/f", "d", "."} {
		must(unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(root, p), ts, unix.AT_SYMLINK_NOFOLLOW))
	}
	return root
}

func TestCompare(t *testing.T) {
	want := tree(t, nil)
	for name, c := range map[string]struct {
		edit func(root string)
		diff string // how the first report starts; "" for none
		n    int    // reports expected
	}{
		"same":     {},
		"content":  {func(r string) { os.WriteFile(filepath.Join(r, "d/f"), []byte("contenT"), 0o644) }, "d/f: content differs", 2},
		"mode":     {func(r string) { os.Chmod(filepath.Join(r, "d"), 0o700) }, "d: mode", 1},
		"target":   {func(r string) { os.Remove(filepath.Join(r, "l")); os.Symlink("d/g", filepath.Join(r, "l")) }, "l: readlink", 1},
		"extra":    {func(r string) { os.WriteFile(filepath.Join(r, "d/x"), nil, 0o644) }, "d/x is in the tree under test", 1},
		"xattr":    {func(r string) { setxattr(t, filepath.Join(r, "d"), "user.x", "1") }, "d: xattrs", 1},
		"unlinked": {func(r string) { os.Remove(filepath.Join(r, "h")) }, "d/f: mode", 2}, // and h is missing
		"mtime":    {func(r string) { os.WriteFile(filepath.Join(r, "x"), nil, 0o644); os.Remove(filepath.Join(r, "x")) }, "", 0},
	} {
		t.Run(name, func(t *testing.T) {
			rec := &recorder{TB: t}
			if n := Compare(rec, want, tree(t, c.edit), Options{}); n != 4 {
				t.Errorf("%d entries compared, want 4", n)
			}
			switch {
			case c.diff == "" && len(rec.errs) != 0:
				t.Errorf("identical trees: %q", rec.errs)
			case c.diff != "" && (len(rec.errs) != c.n || !strings.HasPrefix(rec.errs[0], c.diff)):
				t.Errorf("reports %q, want %d, the first starting %q", rec.errs, c.n, c.diff)
			}
		})
	}
}

func setxattr(t *testing.T, p, name, value string) {
	t.Helper()
	if err := unix.Setxattr(p, name, []byte(value), 0); err != nil {
		t.Fatal(err)
	}
}
