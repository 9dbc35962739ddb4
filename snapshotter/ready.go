//go:build linux

package snapshotter

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// WithReadiness adds a check to Ready: for example a remote layer
// resolver's own view of whether every layer it remembers is served
// again. Checks must be cheap and safe for concurrent use; nil checks are
// ignored.
func WithReadiness(check func() error) Opt {
	return func(c *config) error {
		if check != nil {
			c.readiness = append(c.readiness, check)
		}
		return nil
	}
}

// Ready reports whether the snapshotter serves everything it remembers:
// every committed remote snapshot's layer was mounted again when it
// started (a layer that could not be is unreadable until its snapshot is
// removed), and every WithReadiness check passes. A node should not take
// new work while it is not ready.
func (s *Snapshotter) Ready() error {
	s.mu.Lock()
	var failed []string
	for _, name := range s.unrestored {
		failed = append(failed, name)
	}
	s.mu.Unlock()
	var errs []error
	if len(failed) > 0 {
		sort.Strings(failed)
		errs = append(errs, fmt.Errorf("%d remote layers were not mounted again: %s", len(failed), strings.Join(failed, ", ")))
	}
	for _, check := range s.readiness {
		if err := check(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
