package ztoc

import (
	"fmt"
	"path"
	"strings"
)

// CleanPath returns the canonical form of a tar entry name or a user's
// path: no leading "./" or "/", no trailing "/", "." for the root.
func CleanPath(name string) string {
	p := path.Clean("/" + name)
	if p == "/" {
		return "."
	}
	return strings.TrimPrefix(p, "/")
}

// Lookup returns the last entry named name (tar semantics: a later entry
// replaces an earlier one), comparing cleaned paths. For a hardlink it
// returns the entry holding the data: the target as it stood before the
// link in archive order, as tar extracts it. It returns an error naming the
// path when there is no such entry.
func (z *Ztoc) Lookup(name string) (*FileMetadata, error) {
	i := z.lastBefore(len(z.Files), CleanPath(name))
	if i < 0 {
		return nil, fmt.Errorf("%s: no such entry in the layer", name)
	}
	for z.Files[i].Type == TypeHardlink {
		j := z.lastBefore(i, CleanPath(z.Files[i].Linkname))
		if j < 0 {
			return nil, fmt.Errorf("%s: hardlink to %s, which no earlier entry has", name, z.Files[i].Linkname)
		}
		i = j
	}
	return &z.Files[i], nil
}

// lastBefore returns the index of the last entry before end whose cleaned
// name is want, or -1.
func (z *Ztoc) lastBefore(end int, want string) int {
	for i := end - 1; i >= 0; i-- {
		if CleanPath(z.Files[i].Name) == want {
			return i
		}
	}
	return -1
}
