package fusefs

import (
	"bytes"
	"context"
	"errors"
	"io"
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

// mountRoot mounts root on a new directory until the test ends.
func mountRoot(t *testing.T, root *Root) (string, *Server) {
	t.Helper()
	mnt := t.TempDir()
	srv, err := Mount(context.Background(), mnt, root, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt, srv
}

func rootOf(t *testing.T, entries ...layertest.Entry) *Root {
	t.Helper()
	layer := layertest.Tar(t, entries...)
	files, _ := toctest.FromTar(t, layer)
	return newRoot(t, files, plainSource(layer), Options{})
}

// TestReplace swaps the tree of a mounted layer and checks what the kernel
// shows afterwards, through paths and through files opened before: new
// contents and sizes, names gone and names added, and ESTALE for a file
// whose path now names a directory.
func TestReplace(t *testing.T) {
	ctx := context.Background()
	mnt, srv := mountRoot(t, rootOf(t,
		layertest.Reg("f", 0o644, []byte("old content")), layertest.Dir("d/", 0o755), layertest.Reg("d/x", 0o644, []byte("x")),
		layertest.Reg("keep", 0o644, []byte("same")), layertest.Reg("typechange", 0o644, []byte("a file")),
		layertest.Dir("sub/", 0o755), layertest.Reg("sub/y", 0o644, []byte("y"))))
	// Let the kernel cache everything: names, absences, attributes, pages.
	open := func(p string) *os.File {
		f, err := os.Open(filepath.Join(mnt, p))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		return f
	}
	f, keep, typechange := open("f"), open("keep"), open("typechange")
	for _, p := range []string{"f", "d", "d/x", "keep", "sub/y"} {
		lstat(t, filepath.Join(mnt, p))
	}
	if _, err := os.Lstat(filepath.Join(mnt, "n")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("n exists before the replacement: %v", err)
	}
	dirtest.Names(t, mnt)
	subdir, err := os.Open(filepath.Join(mnt, "sub"))
	if err != nil {
		t.Fatal(err)
	}
	defer subdir.Close()

	next := rootOf(t,
		layertest.Reg("f", 0o644, []byte("new content, and longer")), layertest.Reg("keep", 0o644, []byte("same")),
		layertest.Reg("n", 0o600, []byte("a new file")), layertest.Dir("typechange/", 0o755),
		layertest.Dir("sub/", 0o755), layertest.Reg("sub/z", 0o644, []byte("z")))
	if err := srv.Replace(ctx, next); err != nil {
		t.Fatal(err)
	}
	if err := srv.Replace(ctx, next); err == nil {
		t.Error("a root was mounted twice by Replace")
	}

	if got, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(got) != "new content, and longer" {
		t.Errorf("f after Replace: %q, %v", got, err)
	}
	if st := lstat(t, filepath.Join(mnt, "f")); st.Size != int64(len("new content, and longer")) {
		t.Errorf("f has size %d after Replace", st.Size)
	}
	buf := make([]byte, 100)
	if n, _ := f.ReadAt(buf, 0); string(buf[:n]) != "new content, and longer" {
		t.Errorf("f opened before Replace reads %q", buf[:n])
	}
	if st, err := f.Stat(); err != nil || st.Size() != int64(len("new content, and longer")) {
		t.Errorf("f opened before Replace: stat %v, %v", st, err)
	}
	if n, _ := keep.ReadAt(buf, 0); string(buf[:n]) != "same" {
		t.Errorf("keep reads %q", buf[:n])
	}
	if _, err := typechange.ReadAt(buf, 0); !errors.Is(err, syscall.ESTALE) {
		t.Errorf("a file whose path is now a directory reads with %v, want ESTALE", err)
	}
	if st := lstat(t, filepath.Join(mnt, "typechange")); st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
		t.Errorf("typechange has mode %o, want a directory", st.Mode)
	}
	for _, p := range []string{"d", "d/x", "sub/y"} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s after Replace: %v, want it gone", p, err)
		}
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "n")); err != nil || string(got) != "a new file" {
		t.Errorf("n after Replace: %q, %v", got, err)
	}
	if got := strings.Join(dirtest.Names(t, mnt), ","); got != "f,keep,n,sub,typechange" {
		t.Errorf("root after Replace: %s", got)
	}
	if names, err := subdir.Readdirnames(-1); err != nil || strings.Join(names, ",") != "z" {
		t.Errorf("sub, opened before Replace, lists %v, %v", names, err)
	}

	// The handoff state now carries the IDs of the first tree.
	h, err := srv.Handoff()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	st, err := decodeState(h.State)
	if err != nil {
		t.Fatal(err)
	}
	if st.base != 1+8 || len(st.gens) != 1 || st.gens[0].base != 1 || st.sum != next.tree.sum {
		t.Errorf("state after Replace: base %d, %d generations", st.base, len(st.gens))
	}
}

// TestResumeRefuses checks what Resume refuses before it touches the
// connection: another tree, another mountpoint, a state it cannot read.
func TestResumeRefuses(t *testing.T) {
	ctx := context.Background()
	entries := []layertest.Entry{layertest.Reg("f", 0o644, []byte("f"))}
	mnt, srv := mountRoot(t, rootOf(t, entries...))
	h, err := srv.Handoff()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	other := rootOf(t, layertest.Reg("g", 0o644, []byte("g")))
	if _, err := Resume(ctx, mnt, h, other, MountOptions{}); !errors.Is(err, ErrTreeMismatch) {
		t.Errorf("Resume with another tree: %v, want ErrTreeMismatch", err)
	}
	if _, err := Resume(ctx, "/elsewhere", h, rootOf(t, entries...), MountOptions{}); err == nil {
		t.Error("Resume on another mountpoint succeeded")
	}
	for _, state := range [][]byte{nil, h.State[:len(h.State)-1], append([]byte{9}, h.State[1:]...)} {
		bad := &Handoff{FUSE: h.FUSE, Opens: h.Opens, State: state}
		if _, err := Resume(ctx, mnt, bad, rootOf(t, entries...), MountOptions{}); err == nil {
			t.Errorf("Resume with a state of %d bytes succeeded", len(state))
		}
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(got) != "f" {
		t.Errorf("the mount after refused Resumes: %q, %v", got, err)
	}
}

func TestHandoffStateRoundTrip(t *testing.T) {
	st := handoffState{dir: "/run/spanpull/snapshots/12/fs", maxWrite: 131072, base: 40,
		gens: []generation{{base: 1, to: []uint32{0, 3, 0, 7}}, {base: 5, to: []uint32{0, 1}}}}
	st.init.Major, st.init.Minor, st.init.Flags2 = 7, 45, 1<<5
	copy(st.sum[:], "0123456789abcdef0123456789abcdef")
	got, err := decodeState(st.encode())
	if err != nil {
		t.Fatal(err)
	}
	if got.dir != st.dir || got.init != st.init || got.maxWrite != st.maxWrite || got.base != st.base || got.sum != st.sum ||
		len(got.gens) != 2 || got.gens[1].base != 5 || !bytes.Equal(u32bytes(got.gens[0].to), u32bytes(st.gens[0].to)) {
		t.Errorf("round trip: %+v, want %+v", got, st)
	}
}

func u32bytes(v []uint32) []byte {
	var b []byte
	for _, x := range v {
		b = append(b, byte(x), byte(x>>8), byte(x>>16), byte(x>>24))
	}
	return b
}
