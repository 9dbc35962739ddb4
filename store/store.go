// Package store keeps the snapshotter's state on local disk: which
// snapshots are remote layers and the zTOCs needed to mount them again
// after a restart (MetaStore), and the uncompressed spans already fetched
// (SpanCache).
package store

import "errors"

// ErrNotFound is returned (wrapped) for a missing record, zTOC or span.
var ErrNotFound = errors.New("not found")
