//go:build linux

package snapshotter

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// localize rewrites the mounts that overlayfs' snapshotter made for a new
// or existing active or view snapshot: every lower directory that is the
// remote mount of a layer with a local, verified tree (RemoteMount's
// LocalDir) becomes that tree. Containers started from then on read the
// layer from the local disk through overlayfs alone, as if it had been
// pulled; those started while it was lazy keep their FUSE mount, which
// stays until the snapshot is removed (passthrough makes their reads of
// local files cheap, but every open still asks the daemon).
//
// Why this is safe: a tree exists only once the whole layer was checked
// against the layer digest and diff_id of the image (the same bytes the
// FUSE mount serves), and it is deleted only with the last snapshot of
// the layer, which containerd removes only when no snapshot (and so no
// container) stacks on it.
func (s *Snapshotter) localize(mounts []mount.Mount, err error) ([]mount.Mount, error) {
	if err != nil || s.resolver == nil {
		return mounts, err
	}
	for i := range mounts {
		m := &mounts[i]
		switch m.Type {
		case "overlay":
			for k, o := range m.Options {
				if dirs, ok := strings.CutPrefix(o, "lowerdir="); ok {
					m.Options[k] = "lowerdir=" + s.localDirs(dirs)
				}
			}
		case "bind":
			m.Source = s.localDir(m.Source)
		}
	}
	return mounts, nil
}

// localDirs applies localDir to each directory of a lowerdir= list.
func (s *Snapshotter) localDirs(list string) string {
	dirs := strings.Split(list, ":")
	for i, d := range dirs {
		dirs[i] = s.localDir(d)
	}
	return strings.Join(dirs, ":")
}

// localDir returns the local tree of the remote layer mounted on dir, a
// snapshot's directory, or dir itself.
func (s *Snapshotter) localDir(dir string) string {
	rel, err := filepath.Rel(filepath.Join(s.root, "snapshots"), dir)
	if err != nil {
		return dir
	}
	id, rest, ok := strings.Cut(rel, string(filepath.Separator))
	if !ok || rest != "fs" {
		return dir
	}
	rm := s.remote(id)
	if rm == nil {
		return dir
	}
	if local := rm.LocalDir(); local != "" {
		return s.localLink(id, local)
	}
	return dir
}

// localLink returns a path of snapshot id's directory that links to
// local, the tree of its layer: overlayfs follows it when it mounts, and
// the lowerdir list keeps the short paths of snapshot directories
// (containerd shortens long lists to paths relative to their common
// directory, and mount options cannot exceed a page). When the link
// cannot be made, local itself.
func (s *Snapshotter) localLink(id, local string) string {
	link := filepath.Join(s.root, "snapshots", id, "local")
	err := os.Symlink(local, link)
	if errors.Is(err, fs.ErrExist) {
		if cur, rerr := os.Readlink(link); rerr == nil && cur == local {
			err = nil
		}
	}
	if err != nil {
		s.log.WithError(err).WithField("snapshot", id).Warn("spanpull: link to the layer's local tree")
		return local
	}
	return link
}
