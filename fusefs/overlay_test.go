package fusefs

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/dirtest"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
)

// mountOverlay mounts overlayfs with lowers (top first), unmounted when
// the test ends (before the FUSE mounts it sits on).
func mountOverlay(t *testing.T, lowers ...string) (merged, upper string) {
	t.Helper()
	base := t.TempDir()
	upper, work, merged := filepath.Join(base, "upper"), filepath.Join(base, "work"), filepath.Join(base, "merged")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + strings.Join(lowers, ":") + ",upperdir=" + upper + ",workdir=" + work
	if err := syscall.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(merged, 0); err != nil {
			t.Errorf("unmount overlay: %v", err)
		}
	})
	return merged, upper
}

// TestOverlay stacks two FUSE layers under overlayfs, as the snapshotter
// does: the upper layer's whiteouts and opaque dirs hide lower files, and
// copy-up works.
func TestOverlay(t *testing.T) {
	lower := mountLayer(t,
		layertest.Reg("a", 0o644, []byte("lower a")),
		layertest.Reg("keep", 0o644, []byte("lower keep")),
		layertest.Dir("dir/", 0o755),
		layertest.Reg("dir/x", 0o644, []byte("x")),
		layertest.Reg("dir/y", 0o644, []byte("y")),
		layertest.Dir("merge/", 0o755),
		layertest.Reg("merge/lower", 0o644, []byte("l")),
		layertest.Dir("gonedir/", 0o755),
		layertest.Reg("gonedir/f", 0o644, []byte("f")),
	)
	upper := mountLayer(t,
		layertest.Reg(".wh.a", 0o600, nil),
		layertest.Reg(".wh.gonedir", 0o600, nil),
		layertest.Dir("dir/", 0o755),
		layertest.Reg("dir/.wh..wh..opq", 0o600, nil),
		layertest.Reg("dir/z", 0o644, []byte("z")),
		layertest.Reg("merge/upper", 0o644, []byte("u")),
	)
	merged, rw := mountOverlay(t, upper, lower)

	for _, p := range []string{"a", "gonedir", "dir/x", "dir/y"} {
		if _, err := os.Lstat(filepath.Join(merged, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s is visible: %v", p, err)
		}
	}
	if got := dirtest.Names(t, merged); strings.Join(got, ",") != "dir,keep,merge" {
		t.Errorf("merged root = %v", got)
	}
	if got := dirtest.Names(t, filepath.Join(merged, "dir")); strings.Join(got, ",") != "z" {
		t.Errorf("opaque dir = %v, want [z]", got)
	}
	if got := dirtest.Names(t, filepath.Join(merged, "merge")); strings.Join(got, ",") != "lower,upper" {
		t.Errorf("merged dir = %v", got)
	}

	// copy-up
	f, err := os.OpenFile(filepath.Join(merged, "keep"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(" + appended"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, _ := os.ReadFile(filepath.Join(merged, "keep")); string(b) != "lower keep + appended" {
		t.Errorf("merged keep = %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(rw, "keep")); string(b) != "lower keep + appended" {
		t.Errorf("upperdir keep = %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(lower, "keep")); string(b) != "lower keep" {
		t.Errorf("lower keep changed: %q", b)
	}
	// new file, and deleting a lower file leaves a whiteout in upperdir
	if err := os.WriteFile(filepath.Join(merged, "merge/new"), []byte("n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(merged, "merge/lower")); err != nil {
		t.Fatal(err)
	}
	st := lstat(t, filepath.Join(rw, "merge/lower"))
	if st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Rdev != 0 {
		t.Errorf("upperdir whiteout: mode %o rdev %d", st.Mode, st.Rdev)
	}
	if got := dirtest.Names(t, filepath.Join(merged, "merge")); strings.Join(got, ",") != "new,upper" {
		t.Errorf("merge after changes = %v", got)
	}
}

func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if fields := strings.Fields(line); len(fields) > 4 && fields[4] == dir {
			return true
		}
	}
	return false
}

func TestUnmount(t *testing.T) {
	layer := layertest.Tar(t, layertest.Reg("f", 0o644, []byte("data")))
	files, _ := toctest.FromTar(t, layer)
	newServer := func() *Server {
		root := newRoot(t, files, &memSource{b: layer, files: files}, Options{})
		srv, err := Mount(context.Background(), t.TempDir(), root, MountOptions{FsName: "sha256:abc"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Unmount() })
		return srv
	}

	srv := newServer()
	if !isMounted(t, srv.Dir()) {
		t.Fatal("not mounted")
	}
	// busy under overlayfs: fails, then works once overlayfs is gone
	merged := filepath.Join(t.TempDir(), "m")
	os.Mkdir(merged, 0o755)
	other := t.TempDir()
	if err := syscall.Mount("overlay", merged, "overlay", 0, "lowerdir="+srv.Dir()+":"+other); err != nil {
		t.Fatal(err)
	}
	// busy: a file is open on the mount
	f, err := os.Open(filepath.Join(srv.Dir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Unmount(); !errors.Is(err, syscall.EBUSY) {
		t.Errorf("Unmount with an open file = %v, want EBUSY", err)
	}
	f.Close()
	if !isMounted(t, srv.Dir()) {
		t.Fatal("failed Unmount unmounted")
	}
	// under overlayfs: the kernel keeps the filesystem, and the overlay
	// keeps working, until the overlay goes
	if err := srv.Unmount(); err == nil {
		t.Error("Unmount returned nil while overlayfs still uses the layer")
	}
	if b, err := os.ReadFile(filepath.Join(merged, "f")); err != nil || string(b) != "data" {
		t.Errorf("overlay read after the FUSE unmount = %q, %v", b, err)
	}
	if err := syscall.Unmount(merged, 0); err != nil {
		t.Fatal(err)
	}
	if err := srv.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	srv.Wait()
	if isMounted(t, srv.Dir()) {
		t.Error("still mounted after Unmount")
	}
	if err := srv.Unmount(); err != nil {
		t.Errorf("second Unmount: %v", err)
	}

	// unmounted by someone else
	srv = newServer()
	if err := syscall.Unmount(srv.Dir(), 0); err != nil {
		t.Fatal(err)
	}
	if err := srv.Unmount(); err != nil {
		t.Errorf("Unmount after an external unmount: %v", err)
	}
	srv.Wait()
}
