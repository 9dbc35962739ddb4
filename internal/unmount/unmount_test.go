//go:build linux

package unmount

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// TestUnder: nested mounts below the directory, a busy one among them,
// all go; a mount next to the directory (same name prefix) stays.
func TestUnder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("mounting tmpfs needs root: run the tests as root")
	}
	root := t.TempDir()
	dir, sibling := filepath.Join(root, "d"), filepath.Join(root, "dx")
	mount := func(p string) {
		t.Helper()
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatalf("mount tmpfs at %s: %v", p, err)
		}
	}
	mount(filepath.Join(dir, "a"))
	mount(filepath.Join(dir, "a", "b"))
	mount(sibling)
	t.Cleanup(func() { _ = unix.Unmount(sibling, unix.MNT_DETACH) })
	busy, err := os.Create(filepath.Join(dir, "a", "b", "open"))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	if err := Under(dir); err != nil {
		t.Fatalf("Under: %v", err)
	}
	if left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir)); err != nil || len(left) != 0 {
		t.Errorf("mounts left below %s: %d (%v)", dir, len(left), err)
	}
	if m, err := mountinfo.Mounted(sibling); err != nil || !m {
		t.Errorf("sibling %s mounted: %v (%v), want it kept", sibling, m, err)
	}
	if err := Under(dir); err != nil {
		t.Errorf("Under with nothing mounted: %v", err)
	}
}
