// Package atomicfile writes files that readers see whole or not at all,
// and removes the temporary files a crash left behind. The daemon's state
// (package store) and the span cache (package span) both write this way;
// sharing the package keeps one naming of temporary files, so that the
// cleanup finds exactly what the writes leave.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// TempPrefix starts the names of files being written. A crash can leave
// them behind; RemoveTemp deletes them.
const TempPrefix = ".tmp-"

// WriteFile writes data to dir/name so that readers see either the whole
// file or none: a synced temporary file in dir is renamed into place,
// replacing any earlier file. A failed write leaves nothing behind. The
// file is readable by its owner only.
func WriteFile(dir, name string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, TempPrefix+name+"-*")
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

// RemoveTemp deletes the temporary files a crash left in dir. Call it when
// nothing is writing to dir, such as when opening a store.
func RemoveTemp(dir string) error {
	des, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, de := range des {
		if strings.HasPrefix(de.Name(), TempPrefix) {
			if err := os.Remove(filepath.Join(dir, de.Name())); err != nil {
				return fmt.Errorf("remove leftover temporary file: %w", err)
			}
		}
	}
	return nil
}
