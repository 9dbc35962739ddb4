package ztoc

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// Name rules. A lazily mounted layer must show exactly the tree that
// containerd's archive.Apply (pkg/archive/tar.go, applyNaive) unpacks from
// the same layer, so tar names follow its rules rather than stricter ones:
//
//   - every name is cleaned (filepath.Clean) and resolved inside the root:
//     a leading "/" and ".." components that would climb above the root
//     stay at the root ("/etc/x" and "a/../../etc/x" land at etc/x);
//   - an entry that resolves to the root itself (".", "./", "..", "") is
//     skipped;
//   - a hardlink target is resolved the same way (hardlinkRootPath); a
//     target that resolves to the root makes containerd fail the layer
//     (it cannot link a directory);
//   - a whiteout that names no file (".wh.", ".wh..", ".wh...") makes
//     containerd fail the layer (validateWhiteout);
//   - PAX global headers carry no file and are skipped.
//
// Names containing NUL cannot come out of archive/tar (it refuses such PAX
// records, and NUL ends a ustar name), so a zTOC holding one is forged and
// rejected. Symlinks in parent directories, which containerd also resolves
// inside the root (fs.RootPath), are a property of the tree, not of a
// name: the filesystem that builds the tree resolves them.
//
// The TOC keeps every entry with its raw name, skipped ones included: a
// zTOC lists every tar entry in archive order, which is what lets
// HeaderRange find each entry's header blocks.

// ConfinedPath returns where a tar entry named name lands when containerd
// unpacks the layer, as a clean path relative to the layer root (no
// leading "/" or "./", no trailing "/", no ".." components), and whether
// containerd skips the entry because it resolves to the root itself.
// Hardlink targets resolve the same way.
func ConfinedPath(name string) (clean string, skip bool) {
	clean = CleanPath(name)
	return clean, clean == "."
}

// whiteoutPrefix marks an overlay whiteout entry in an OCI layer.
const whiteoutPrefix = ".wh."

// checkEntryNames applies the name rules above to an entry of type typ
// named name that links to linkname: it rejects what containerd refuses
// to unpack and what no tar stream can hold.
func checkEntryNames(name, typ, linkname string) error {
	if strings.IndexByte(name, 0) >= 0 {
		return errors.New("name contains NUL")
	}
	if strings.IndexByte(linkname, 0) >= 0 {
		return errors.New("link target contains NUL")
	}
	if clean, skip := ConfinedPath(name); !skip {
		if base := path.Base(clean); base == whiteoutPrefix || base == whiteoutPrefix+"." || base == whiteoutPrefix+".." {
			return fmt.Errorf("whiteout %q names no file", base)
		}
	}
	if typ == TypeHardlink {
		if _, root := ConfinedPath(linkname); root {
			return fmt.Errorf("hardlink target %q resolves to the layer root", linkname)
		}
	}
	return nil
}
