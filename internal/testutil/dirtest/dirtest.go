// Package dirtest inspects what code under test left on disk, for the
// tests of the packages that keep state in a directory (span's cache,
// store's metadata, atomicfile's temporary files) or serve one (fusefs).
package dirtest

import (
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// Files lists the regular files under dir, relative to it, in lexical
// order (filepath.WalkDir's).
func Files(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Names lists the entries of dir itself (files, directories, links), in
// os.ReadDir's order, which is by name.
func Names(t testing.TB, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, de := range des {
		out = append(out, de.Name())
	}
	return out
}

// ReadString returns the contents of the file at path, failing the test if
// it cannot be read.
func ReadString(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
