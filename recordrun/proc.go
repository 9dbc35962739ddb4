package recordrun

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// process is a daemon Run started: its own process group (a terminal's ^C
// reaches Run, which stops its daemons in order), killed if Run dies, its
// output in a log file.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string

	exited chan struct{}
	mu     sync.Mutex
	err    error
}

// startProcess starts cmd with its stdout and stderr in dir/NAME.log.
func startProcess(dir, name string, cmd *exec.Cmd) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() { // ends when the process does; stop waits for it
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.exited)
	}()
	return p, nil
}

// hasExited reports whether the process has exited.
func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process (by PID) and waits up to grace for it
// to exit, then kills it. It returns the process's exit error, if any.
func (p *process) stop(grace time.Duration) error {
	if !p.hasExited() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-p.exited:
		case <-t.C:
			_ = p.cmd.Process.Kill()
			<-p.exited
			return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v: killed", p.name, p.cmd.Process.Pid, grace)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var exit *exec.ExitError
	if errors.As(p.err, &exit) && !exit.Exited() {
		return nil // ended by our signal
	}
	return p.err
}

// logTail returns the last n bytes of the process's log.
func (p *process) logTail(n int) string {
	b, _ := os.ReadFile(p.log)
	if len(b) > n {
		return "...\n" + string(b[len(b)-n:])
	}
	return string(b)
}

// waitReady polls ready every 50 ms until it returns nil, p exits or
// timeout passes.
func waitReady(p *process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p.hasExited() {
			return fmt.Errorf("%s exited before it was ready (%v); its log ends:\n%s", p.name, err, p.logTail(4<<10))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %w; its log ends:\n%s", p.name, timeout, err, p.logTail(4<<10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// killWithArg sends SIGKILL to every process (but this one) with a
// command-line argument that match accepts: the daemons that outlive
// their parent by design and name Run's private directory (containerd's
// shims name its socket there).
func killWithArg(match func(arg string) bool) error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if match(a) {
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
					errs = append(errs, fmt.Errorf("kill %d: %w", pid, err))
				}
				break
			}
		}
	}
	return errors.Join(errs...)
}

// under returns a match for killWithArg: arguments naming dir or a path
// below it.
func under(dir string) func(string) bool {
	return func(a string) bool { return a == dir || strings.HasPrefix(a, dir+"/") }
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

// freeLoopbackAddr returns a loopback address with a port nobody listens
// on right now.
func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
