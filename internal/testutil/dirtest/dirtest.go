// Package dirtest inspects what code under test left on disk, for the
// tests of the packages that keep state in a directory (span's cache,
// store's metadata).
package dirtest

import (
	"io/fs"
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
