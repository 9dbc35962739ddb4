package main

import (
	"errors"
	"fmt"
	"io"
	"regexp"
	"time"

	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/internal/cli"
	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/recordrun"
)

func newRecordCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "record",
		Short: "Access records: what a container start reads, for prefetching on every node",
		Long: `A daemon records, per lazily pulled layer, the spans and files a start reads
first, in order, for [record] window_seconds after the layer's mount. Export
a record from a node ("record export") or make one in CI without a node
("record run"), then publish it with "indexer prefetch attach".`,
	}
	return cli.Group(cmd, newRecordExportCommand(), newRecordRunCommand())
}

// writeRecord writes rec to the file out, or to w when out is empty.
func writeRecord(w io.Writer, out string, rec *record.Record) error {
	if out != "" {
		return record.WriteFile(out, rec)
	}
	b, err := rec.Marshal()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func newRecordExportCommand() *cobra.Command {
	var configPath, metricsAddress, out, name string
	cmd := &cobra.Command{
		Use:   "export [flags] IMAGE",
		Short: "Export the access record of an image from the running daemon",
		Long: `export asks the daemon for the record of IMAGE (the reference it was pulled
as, or its image manifest digest) over HTTP on the daemon's metrics address
(GET /record?image=IMAGE&name=NAME), and writes it to -o FILE or stdout. The
daemon logs "access record ready for IMAGE" once the record is complete
([record] window_seconds after the image's layers were mounted); an export
before that gets the record so far.`,
		Example: `  snapshotter record export registry.example.com/app:1.2 -o app.json
  indexer prefetch attach registry.example.com/app:1.2 app.json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			addr := metricsAddress
			if !cmd.Flags().Changed("metrics-address") {
				cfg, err := loadConfig(configPath, cmd.Flags().Changed("config"))
				if err != nil {
					return err
				}
				addr = cfg.MetricsAddress
			}
			if addr == "" {
				return errors.New("the daemon serves records on its metrics address: none is configured (metrics_address), give it with --metrics-address")
			}
			rec, err := record.Export(cmd.Context(), addr, args[0], name)
			if errors.Is(err, record.ErrNoRecord) {
				return fmt.Errorf("%w: the daemon records the layers it mounts lazily; pull and run %s with it first", err, args[0])
			}
			if err != nil {
				return err
			}
			return writeRecord(cmd.OutOrStdout(), out, rec)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", defaultConfigPath, "the daemon's TOML config file, for its metrics_address")
	f.StringVar(&metricsAddress, "metrics-address", "", "the daemon's metrics address, host:port (default: metrics_address of --config)")
	f.StringVarP(&out, "output", "o", "", "write the record to this file (default: stdout)")
	f.StringVar(&name, "name", record.DefaultName, "name of the record: the workload it is for")
	return cmd
}

// recordRunFlags are the flags of record run.
type recordRunFlags struct {
	cmd                 []string
	ready, out, name    string
	timeout, pullTO     time.Duration
	plainHTTP, hostNet  bool
	containerd, workDir string
	platform, hostsDir  string
}

func newRecordRunCommand() *cobra.Command {
	var o recordRunFlags
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [-- CMD [ARG...]]",
		Short: "Record an image's start without a node: private containerd and daemon, one run",
		Long: `run makes the access record of IMAGE in one command, for CI: it starts its own
containerd (--containerd, default the one in PATH, 1.6 or later; its root,
state and socket in a temporary directory, CRI disabled) and its own
snapshotter daemon (this binary's "serve", temporary root, no background
fill), pulls IMAGE lazily (it must be indexed: indexer create or convert), runs
it once with CMD (default: the image's entrypoint and command) until a line of
its output (stdout or stderr) matches --ready, exports the daemon's record,
then stops the container, containerd (and its shims) and the daemon by PID,
unmounts and removes the temporary directory, also when something fails. It
needs root. The container's output goes to stderr, progress too.`,
		Example: `  snapshotter record run --ready 'Listening on' -o app.json registry.example.com/app:1.2-soci
  snapshotter record run --ready '^ok$' -o py.json registry.example.com/py:3 -- python3 -c 'import json; print("ok")'
  indexer prefetch attach registry.example.com/app:1.2-soci app.json`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := o.options(cmd, args)
			if err != nil {
				return err
			}
			rec, err := recordrun.Run(cmd.Context(), opts)
			if err != nil {
				return err
			}
			return writeRecord(cmd.OutOrStdout(), o.out, rec)
		},
	}
	f := cmd.Flags()
	f.StringArrayVar(&o.cmd, "cmd", nil, "an argument of the command to run, repeated in order (or give the command after --)")
	f.StringVar(&o.ready, "ready", "", "regular expression (Go syntax) a line of the container's output matches once it has started (required)")
	f.DurationVar(&o.timeout, "timeout", recordrun.DefaultTimeout, "give up when the output has not matched --ready this long after the container started")
	f.DurationVar(&o.pullTO, "pull-timeout", recordrun.DefaultPullTimeout, "give up on a pull that takes longer")
	f.StringVarP(&o.out, "output", "o", "", "write the record to this file (default: stdout)")
	f.StringVar(&o.name, "name", record.DefaultName, "name of the record: the workload it is for")
	f.BoolVar(&o.plainHTTP, "plain-http", false, "talk plain HTTP to the registry (always for loopback registries)")
	f.StringVar(&o.platform, "platform", "", "platform to pull (default: this machine's)")
	f.StringVar(&o.hostsDir, "hosts-dir", defaultRegistryConfigPath, "containerd's registry host configuration (hosts.toml per registry); empty: none")
	f.BoolVar(&o.hostNet, "net-host", false, "run the container in the host's network namespace")
	f.StringVar(&o.containerd, "containerd", recordrun.DefaultContainerd, "containerd binary (path, or name looked up in PATH)")
	f.StringVar(&o.workDir, "work-dir", "", "where to make the temporary directory (default: the system's; keep the path short: it holds unix sockets)")
	return cmd
}

// options checks the flags and arguments of record run.
func (o recordRunFlags) options(cmd *cobra.Command, args []string) (recordrun.Options, error) {
	if o.ready == "" {
		return recordrun.Options{}, errors.New("--ready is required: the record ends when a line of the container's output matches it")
	}
	re, err := regexp.Compile(o.ready)
	if err != nil {
		return recordrun.Options{}, fmt.Errorf("--ready: %w", err)
	}
	// Progress lines and the container's output reach stderr from
	// different goroutines.
	stderr := syncio.NewWriter(cmd.ErrOrStderr())
	command := o.cmd
	if len(args) > 1 {
		if len(o.cmd) > 0 {
			return recordrun.Options{}, errors.New("give the command with --cmd or after --, not both")
		}
		command = args[1:]
	}
	return recordrun.Options{
		Image: args[0], Cmd: command, Ready: re, Timeout: o.timeout, PullTimeout: o.pullTO, Name: o.name,
		PlainHTTP: o.plainHTTP, Platform: o.platform, HostsDir: o.hostsDir, HostNetwork: o.hostNet,
		Containerd: o.containerd, WorkDir: o.workDir, Log: stderr, Output: stderr,
	}, nil
}
