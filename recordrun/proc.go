package recordrun

import (
	"errors"
	"os/exec"
	"time"

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
