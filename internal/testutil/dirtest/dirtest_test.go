package dirtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFiles(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"b/2", "a", "b/1", "c/d/e"} {
		if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "empty"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(Files(t, dir), ","); got != "a,b/1,b/2,c/d/e" {
		t.Errorf("Files = %s", got)
	}
	if got := strings.Join(Names(t, dir), ","); got != "a,b,c,empty" {
		t.Errorf("Names = %s", got)
	}
	if err := os.WriteFile(filepath.Join(dir, "a"), []byte("text"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := ReadString(t, filepath.Join(dir, "a")); got != "text" {
		t.Errorf("ReadString = %q", got)
	}
}
