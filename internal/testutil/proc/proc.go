//go:build linux

// Package proc is the test helpers' old name for internal/proc, which now
// also serves production code (recordrun). It forwards to internal/proc so
// that its callers in integration/ build unchanged; they can import
// internal/proc directly and this package can then go.
package proc

import (
	"context"
	"os/exec"
	"time"

	iproc "github.com/spanpull/spanpull/internal/proc"
)

// ErrKilled is internal/proc.ErrKilled.
var ErrKilled = iproc.ErrKilled

// Process is internal/proc.Process.
type Process = iproc.Process

// Start is internal/proc.Start.
func Start(logDir, name string, cmd *exec.Cmd) (*Process, error) {
	return iproc.Start(logDir, name, cmd)
}

// Tail is internal/proc.Tail.
func Tail(s string, n int) string { return iproc.Tail(s, n) }

// WaitReady is internal/proc.WaitReady.
func WaitReady(ctx context.Context, p *Process, timeout time.Duration, ready func() error) error {
	return iproc.WaitReady(ctx, p, timeout, ready)
}

// Output is internal/proc.Output.
func Output(ctx context.Context, stdin []byte, env []string, name string, args ...string) ([]byte, error) {
	return iproc.Output(ctx, stdin, env, name, args...)
}

// CombinedOutput is internal/proc.CombinedOutput.
func CombinedOutput(ctx context.Context, name string, args ...string) (string, error) {
	return iproc.CombinedOutput(ctx, name, args...)
}

// EnvWithout is internal/proc.EnvWithout.
func EnvWithout(drop ...string) []string { return iproc.EnvWithout(drop...) }

// KillWithArg is internal/proc.KillWithArg.
func KillWithArg(arg string) error { return iproc.KillWithArg(arg) }
