// Package selfexec starts the running test binary again as a helper
// process. Tests that need a peer in a process of its own (one they can
// kill with SIGKILL, or whose descriptors must outlive it) run their own
// binary with an environment variable set; the package's TestMain sees the
// variable and plays the helper instead of running the tests. The tests of
// fdstore and fusefs both start helpers this way, so the command line and
// the plumbing live here once.
package selfexec

import (
	"io"
	"os"
	"os/exec"
	"testing"
)

// Argv returns the command line that runs the test binary without running
// any test, for code that takes an argv rather than an *exec.Cmd.
func Argv() []string {
	return []string{os.Args[0], "-test.run=^$"}
}

// Start starts the test binary (Argv) with env added to the test's
// environment and its stderr on the test's stderr. It returns the started
// command and its stdout, on which the helper reports its progress. The
// caller waits for the command; Start fails the test if it cannot start.
func Start(t testing.TB, env ...string) (*exec.Cmd, io.ReadCloser) {
	t.Helper()
	argv := Argv()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, out
}
