//go:build linux

// Package proc runs child processes: daemons started in their own process
// group with their output in a log file and stopped by PID with a grace
// period, and commands run to completion. Nothing here needs a testing.T,
// so the record run (recordrun, which starts containerd and the
// snapshotter for real), the benchmark harness and the test helpers
// (integration/testenv) share one runner.
package proc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrKilled is wrapped by Stop's error when the process ignored SIGTERM
// for the grace period and was killed.
var ErrKilled = errors.New("killed after the grace period")

// Process is a daemon started by Start.
type Process struct {
	// Name names the process in errors and its log file.
	Name string
	// Cmd is the started command.
	Cmd *exec.Cmd
	// Log is the file holding the process's stdout and stderr.
	Log string

	exited chan struct{}
	mu     sync.Mutex
	err    error
}

// Start starts cmd with its stdout and stderr in logDir/NAME.log (NAME.2.log
// and so on when a restarted daemon would overwrite an earlier log). The
// process gets its own process group, so a terminal's ^C reaches only the
// caller, which stops its daemons in order; and it is killed when the
// caller dies, whatever happens to it.
func Start(logDir, name string, cmd *exec.Cmd) (*Process, error) {
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	logPath := filepath.Join(logDir, name+".log")
	for i := 2; ; i++ {
		if _, err := os.Stat(logPath); errors.Is(err, os.ErrNotExist) {
			break
		}
		logPath = filepath.Join(logDir, fmt.Sprintf("%s.%d.log", name, i))
	}
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
	p := &Process{Name: name, Cmd: cmd, Log: logPath, exited: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(p.exited)
	}()
	return p, nil
}

// Pid is the process's ID.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM and waits up to grace for the process to exit, then
// kills it. It returns the process's exit error (nil when it exited cleanly
// on SIGTERM), or an error wrapping ErrKilled when it had to kill it.
func (p *Process) Stop(grace time.Duration) error {
	if !p.Exited() {
		_ = p.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(grace):
			_ = p.Cmd.Process.Kill()
			<-p.exited
			return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v: %w", p.Name, p.Pid(), grace, ErrKilled)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// LogTail returns the last n bytes of the process's log.
func (p *Process) LogTail(n int) string {
	b, _ := os.ReadFile(p.Log)
	return Tail(string(b), n)
}

// Tail returns the last n bytes of s, marked as cut when it is.
func Tail(s string, n int) string {
	if len(s) > n {
		return "...\n" + s[len(s)-n:]
	}
	return s
}

// WaitReady polls ready until it returns nil, p exits (p may be nil),
// timeout passes or ctx ends.
func WaitReady(ctx context.Context, p *Process, timeout time.Duration, ready func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		if p != nil && p.Exited() {
			return fmt.Errorf("%s exited before it was ready (%v); log:\n%s", p.Name, err, p.LogTail(8<<10))
		}
		if time.Now().After(deadline) {
			if p == nil {
				return fmt.Errorf("process not ready after %v: %w", timeout, err)
			}
			return fmt.Errorf("%s not ready after %v: %w; log:\n%s", p.Name, timeout, err, p.LogTail(8<<10))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Output runs a command to completion with stdin (none when nil) and env
// added to this process's environment, and returns its stdout. The error
// carries the command line and its stderr.
func Output(ctx context.Context, stdin []byte, env []string, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// CombinedOutput runs a command to completion and returns its stdout and
// stderr together; the error carries them.
func CombinedOutput(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// EnvWithout returns this process's environment without the named
// variables, for children that get their own values for them.
func EnvWithout(drop ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, d := range drop {
			if strings.HasPrefix(kv, d+"=") {
				continue next
			}
		}
		env = append(env, kv)
	}
	return env
}

// KillWithArg sends SIGKILL to every process (but this one) that has arg
// among its command-line arguments: the way to find daemons that outlive
// their parent by design, such as containerd's shims, which name their
// containerd's (unique) socket.
func KillWithArg(arg string) error {
	return KillMatching(func(a string) bool { return a == arg })
}

// KillMatching sends SIGKILL to every process (but this one) with a
// command-line argument that match accepts, such as one naming a private
// directory (Under) that a run's helper processes were given.
func KillMatching(match func(arg string) bool) error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
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

// Under returns a match for KillMatching: arguments naming dir or a path
// below it.
func Under(dir string) func(arg string) bool {
	return func(a string) bool { return a == dir || strings.HasPrefix(a, dir+"/") }
}
