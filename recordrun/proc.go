package recordrun

import (
	"errors"
	"fmt"
	"os/exec"
	"sort"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/proc"
)

// stop stops a daemon Run started (proc.Process.Stop), counting an end
// by our SIGTERM as a clean stop.
func stop(p *proc.Process, grace time.Duration) error {
	err := p.Stop(grace)
	var exit *exec.ExitError
	if errors.As(err, &exit) && !exit.Exited() {
		return nil // ended by our signal
	}
	return err
}

// unmountUnder unmounts every mount at or below dir, deepest first (lazily
// if one is busy), and reports mounts it could not remove.
func unmountUnder(dir string) error {
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
