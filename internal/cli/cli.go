// Package cli is what spanpull's two commands (cmd/indexer and
// cmd/snapshotter) share on top of cobra: how a main runs its root command
// and how a command that only groups subcommands behaves, so both binaries
// exit, print errors and answer unknown subcommands the same way.
package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// Main runs root with a context that SIGINT and SIGTERM cancel, so long work
// (an index build, the daemon) stops cleanly. An error goes to standard
// error as "name: error" and the process exits with status 1.
func Main(name string, root *cobra.Command) {
	os.Exit(run(name, root, os.Stderr))
}

// run is Main without the exit, so tests can see the status.
func run(name string, root *cobra.Command, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}

// Group makes cmd a command that only holds subs: without arguments it
// prints its help, and with an argument that names no subcommand it fails,
// where cobra alone would print the help and exit 0.
func Group(cmd *cobra.Command, subs ...*cobra.Command) *cobra.Command {
	cmd.Args = cobra.ArbitraryArgs
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unknown command %q for %q (see %s --help)", args[0], cmd.CommandPath(), cmd.CommandPath())
		}
		return cmd.Help()
	}
	cmd.AddCommand(subs...)
	return cmd
}
