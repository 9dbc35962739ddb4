// Package store keeps the snapshotter's state on local disk: which
// snapshots are remote layers and the zTOCs needed to mount them again
// after a restart (MetaStore), and the uncompressed spans already fetched
// (SpanCache).
package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrNotFound is returned (wrapped) for a missing record, zTOC or span.
var ErrNotFound = errors.New("not found")

// tempPrefix starts the names of files being written; a crash can leave
// them behind, and they are deleted when the store is opened again.
const tempPrefix = ".tmp-"

// writeFileAtomic writes data to dir/name so that readers see either the
// whole file or none: a synced temporary file is renamed into place.
func writeFileAtomic(dir, name string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, tempPrefix+name+"-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(dir, name))
}

// removeTemp deletes the temporary files a crash left in dir.
func removeTemp(dir string) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, de := range des {
		if strings.HasPrefix(de.Name(), tempPrefix) {
			if err := os.Remove(filepath.Join(dir, de.Name())); err != nil {
				return fmt.Errorf("remove leftover temporary file: %w", err)
			}
		}
	}
	return nil
}
