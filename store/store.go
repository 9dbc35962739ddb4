// Package store keeps spanpull's state on local disk, in bbolt databases
// with the blobs they index as files:
//
//   - MetaStore is the snapshotter daemon's state: which snapshots are
//     remote layers, and the zTOCs needed to mount them again after a
//     restart.
//   - ZtocCache is the indexer's cache of the zTOCs it built, keyed by
//     layer digest and span size.
//
// The inflated spans of lazily pulled layers are not state but a cache of
// the layers' contents; they live in package span, with the engine that
// fetches them.
package store

import (
	"errors"
	"os"

	"github.com/spanpull/spanpull/internal/atomicfile"
)

// ErrNotFound is returned (wrapped) for a missing record or zTOC.
var ErrNotFound = errors.New("not found")

// makeBlobDir creates dir, where a store keeps its blobs, if needed, and
// removes the temporary files that writes cut short by a crash left in
// it. Call it when opening the store, before anything writes to dir.
func makeBlobDir(dir string, perm os.FileMode) error {
	if err := os.MkdirAll(dir, perm); err != nil {
		return err
	}
	return atomicfile.RemoveTemp(dir)
}
