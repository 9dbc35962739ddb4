package atomicfile

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/dirtest"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	for _, data := range []string{"first", "second, longer"} {
		if err := WriteFile(dir, "f", []byte(data)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dir, "f")); err != nil || string(b) != data {
			t.Fatalf("after writing %q the file holds %q (%v)", data, b, err)
		}
	}
	if got := dirtest.Names(t, dir); !slices.Equal(got, []string{"f"}) {
		t.Errorf("dir holds %v, want only f", got)
	}
	if st, err := os.Stat(filepath.Join(dir, "f")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v (%v), want 0600", st.Mode(), err)
	}
	// A write that cannot be renamed into place (a directory is in the
	// way) fails and leaves no temporary file.
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "d", "x"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(dir, "d", []byte("x")); err == nil {
		t.Error("WriteFile over a non-empty directory succeeded")
	}
	if got := dirtest.Names(t, dir); !slices.Equal(got, []string{"d", "f"}) {
		t.Errorf("after a failed write the dir holds %v", got)
	}
}

func TestRemoveTemp(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{TempPrefix + "f-123", TempPrefix + "g-4", "f", "tmp-f"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := RemoveTemp(dir); err != nil {
		t.Fatal(err)
	}
	if got := dirtest.Names(t, dir); !slices.Equal(got, []string{"f", "tmp-f"}) {
		t.Errorf("after RemoveTemp the dir holds %v", got)
	}
	if err := RemoveTemp(filepath.Join(dir, "missing")); err == nil {
		t.Error("RemoveTemp of a missing dir succeeded")
	}
}
