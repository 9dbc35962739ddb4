//go:build linux

// Package unmount removes the mounts that daemons (containerd, the
// snapshotter) leave below a directory, so that the directory can be
// deleted without deleting through a mount: the record run cleans up its
// private directory with it, and so can the test environment.
package unmount

import (
	"fmt"
	"path/filepath"
	"sort"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Under unmounts every mount at or below dir, deepest first (lazily if one
// is busy), and reports mounts it could not remove.
func Under(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, 0); err != nil && err != unix.EINVAL {
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
				return fmt.Errorf("unmount %s: %w", m.Mountpoint, err)
			}
		}
	}
	left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("read mount table: %w", err)
	}
	if len(left) > 0 {
		return fmt.Errorf("%d mounts left below %s, first %s", len(left), dir, left[0].Mountpoint)
	}
	return nil
}
