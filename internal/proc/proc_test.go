//go:build linux

package proc

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestStartLogsAndStops(t *testing.T) {
	dir := t.TempDir()
	p, err := Start(dir, "echo", exec.Command("sh", "-c", `echo hello; echo oops >&2; exec sleep 60`))
	if err != nil {
		t.Fatal(err)
	}
	if p.Log != filepath.Join(dir, "echo.log") {
		t.Errorf("log %s", p.Log)
	}
	waitForLog(t, p, "oops")
	if pgid, err := syscall.Getpgid(p.Pid()); err != nil || pgid != p.Pid() {
		t.Errorf("process group %d (%v), want its own (%d)", pgid, err, p.Pid())
	}
	err = p.Stop(5 * time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || errors.Is(err, ErrKilled) {
		t.Errorf("Stop of a process that dies on SIGTERM = %v, want its exit status", err)
	}
	if !p.Exited() {
		t.Error("not exited after Stop")
	}
	if got := p.LogTail(100); got != "hello\noops\n" {
		t.Errorf("log %q", got)
	}

	// A restart gets a log of its own.
	p2, err := Start(dir, "echo", exec.Command("true"))
	if err != nil {
		t.Fatal(err)
	}
	if p2.Log != filepath.Join(dir, "echo.2.log") {
		t.Errorf("second log %s", p2.Log)
	}
	err = WaitReady(context.Background(), nil, 10*time.Second, func() error {
		if !p2.Exited() {
			return errors.New("still running")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.Stop(time.Second); err != nil {
		t.Errorf("Stop of an exited process = %v", err)
	}
}

// waitForLog waits until p has logged s.
func waitForLog(t *testing.T, p *Process, s string) {
	t.Helper()
	err := WaitReady(context.Background(), p, 10*time.Second, func() error {
		if !strings.Contains(p.LogTail(100), s) {
			return errors.New("not logged yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestStopKillsAfterGrace(t *testing.T) {
	p, err := Start(t.TempDir(), "stubborn", exec.Command("sh", "-c", `trap "" TERM; echo ready; while :; do sleep 0.05; done`))
	if err != nil {
		t.Fatal(err)
	}
	waitForLog(t, p, "ready")
	start := time.Now()
	if err := p.Stop(200 * time.Millisecond); !errors.Is(err, ErrKilled) {
		t.Errorf("Stop = %v, want ErrKilled", err)
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > 10*time.Second {
		t.Errorf("Stop took %v", d)
	}
}

func TestWaitReadyReportsExit(t *testing.T) {
	p, err := Start(t.TempDir(), "quitter", exec.Command("sh", "-c", "echo bye; exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	err = WaitReady(context.Background(), p, time.Minute, func() error { return errors.New("never") })
	if err == nil || !strings.Contains(err.Error(), "quitter exited before it was ready") || !strings.Contains(err.Error(), "bye") {
		t.Errorf("WaitReady = %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := WaitReady(ctx, nil, time.Minute, func() error { return errors.New("never") }); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitReady with a canceled context = %v", err)
	}
	if err := WaitReady(context.Background(), nil, 10*time.Millisecond, func() error { return errors.New("never") }); err == nil || !strings.Contains(err.Error(), "not ready after") {
		t.Errorf("WaitReady past its timeout = %v", err)
	}
}

func TestOutput(t *testing.T) {
	out, err := Output(context.Background(), []byte("in"), []string{"PROC_TEST=x"}, "sh", "-c", `cat; echo " $PROC_TEST"`)
	if err != nil || string(out) != "in x\n" {
		t.Errorf("Output = %q, %v", out, err)
	}
	_, err = Output(context.Background(), nil, nil, "sh", "-c", "echo broken >&2; exit 1")
	if err == nil || !strings.Contains(err.Error(), "broken") {
		t.Errorf("failing Output = %v, want its stderr", err)
	}
	s, err := CombinedOutput(context.Background(), "sh", "-c", "echo a; echo b >&2; exit 2")
	if err == nil || s != "a\nb\n" || !strings.Contains(err.Error(), "a\nb") {
		t.Errorf("CombinedOutput = %q, %v", s, err)
	}
}

func TestKillWithArg(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "unique-marker")
	// sh keeps marker (its $0) among its arguments.
	cmd := exec.Command("sh", "-c", `while :; do sleep 0.05; done`, marker)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	go func() { ended <- cmd.Wait() }()
	if err := KillWithArg(marker); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("process with the argument ended with %v, want SIGKILL", err)
		}
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("process with the argument still runs")
	}
}

func TestEnvWithout(t *testing.T) {
	t.Setenv("PROC_DROP", "1")
	t.Setenv("PROC_KEEP", "1")
	env := strings.Join(EnvWithout("PROC_DROP"), "\n")
	if strings.Contains(env, "PROC_DROP=") || !strings.Contains(env, "PROC_KEEP=1") {
		t.Errorf("EnvWithout(PROC_DROP) = %q", env)
	}
}

func TestUnder(t *testing.T) {
	match := Under("/run/x")
	for arg, want := range map[string]bool{"/run/x": true, "/run/x/sock": true, "/run/xy": false, "/run": false, "": false} {
		if got := match(arg); got != want {
			t.Errorf("Under(/run/x)(%q) = %v, want %v", arg, got, want)
		}
	}
}
