package main

import (
	"errors"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/fdstore"
)

// newFDHolderCommand is the hidden subcommand that the daemon starts (with
// fdstore.Ensure) to keep the FUSE connections of its lazy layers while no
// daemon runs. It must stay compatible with older daemons' and newer
// daemons' clients: it only runs fdstore.Serve.
func newFDHolderCommand() *cobra.Command {
	var (
		socket   string
		grace    time.Duration
		logLevel string
	)
	cmd := &cobra.Command{
		Use:    "fd-holder --socket PATH",
		Short:  "Hold the daemon's FUSE connections across its restarts (started by serve)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger, err := newLogger(os.Stderr, logLevel)
			if err != nil {
				return err
			}
			err = fdstore.Serve(cmd.Context(), socket, fdstore.ServeOptions{Grace: grace, Logger: logger.WithField("component", "fd-holder")})
			if errors.Is(err, fdstore.ErrRunning) {
				return nil
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&socket, "socket", "", "unix socket to serve (required)")
	f.DurationVar(&grace, "grace", fdstore.DefaultGrace, "how long to keep the connections while no daemon is connected")
	f.StringVar(&logLevel, "log-level", defaultLogLevel, "log level: trace, debug, info, warn or error")
	cmd.MarkFlagRequired("socket")
	return cmd
}
