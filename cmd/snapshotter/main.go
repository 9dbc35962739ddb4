// Command snapshotter is spanpull's containerd remote snapshotter daemon. It
// serves containerd's snapshots gRPC API on a unix socket, for a
// [proxy_plugins.spanpull] entry of type "snapshot" in containerd's config.
package main

import (
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/internal/cli"
)

func main() {
	cli.Main("snapshotter", newRootCommand())
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "snapshotter",
		Short: "containerd snapshotter that lazily pulls SOCI-indexed gzip layers",
		Long: `snapshotter is a containerd proxy snapshotter. Layers it cannot serve lazily
behave exactly like containerd's overlayfs snapshotter; register it in
containerd's config with

  [proxy_plugins.spanpull]
    type = "snapshot"
    address = "/run/spanpull/snapshotter.sock"

and start it before containerd.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServeCommand(), newPullCommand(), newRecordCommand(), newFDHolderCommand())
	return root
}

func newServeCommand() *cobra.Command {
	var (
		configPath     string
		address        string
		rootDir        string
		metricsAddress string
		logLevel       string
		criProxy       string
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Serve the snapshots gRPC API on a unix socket until SIGINT or SIGTERM",
		Long: `serve opens the snapshotter's root directory and serves containerd's snapshots
gRPC API on a unix socket. Settings come from the defaults, then the TOML
config file, then the flags given on the command line. A stale socket left
by a previous run is removed; a socket some live process answers on is not.

Config file keys: address, root, metrics_address, log_level, async_remove
(bool), mount_options (list of extra overlayfs options); in a [remote]
table (lazy pulling): disable, plain_http, insecure, config_path
(containerd's registry hosts.toml directory, default /etc/containerd/certs.d),
docker_config, fetch_timeout_seconds, fill_delay_seconds, fill_rate_bytes,
index_sources (trusted SOCI index kinds, default ["v2", "v1"]), prefetch
(name of the recorded prefetch to use), verify_files (check each file's
tar header before its first read, default true); in a [cache] table:
max_bytes (disk budget of cached spans and local files, default 10% of the
filesystem); in a [record] table: disable, window_seconds, max_entries; in
a [cri] table: image_service_proxy (socket of the CRI image service proxy,
for the kubelet's --image-service-endpoint; empty: off) and
containerd_cri_socket (default /run/containerd/containerd.sock).

Restarts: lazy layers stay mounted when the daemon stops. Their FUSE
connections are kept by a small fd-holder process (started here, socket
fd-holder.sock next to the address), and the next daemon takes them over:
containers reading lazy layers see no error across a crash, kill or
upgrade of the daemon. Under systemd use KillMode=process (deploy/).

With --metrics-address, /healthz answers while the daemon runs and /readyz
once its sockets serve and every remote layer it remembers is mounted;
/record?image=REF serves access records (snapshotter record export).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			flags := cmd.Flags()
			if flags.Changed("address") {
				cfg.Address = address
			}
			if flags.Changed("root") {
				cfg.Root = rootDir
			}
			if flags.Changed("metrics-address") {
				cfg.MetricsAddress = metricsAddress
			}
			if flags.Changed("log-level") {
				cfg.LogLevel = logLevel
			}
			if flags.Changed("cri-image-service-proxy") {
				cfg.CRI.ImageServiceProxy = criProxy
			}
			if err := cfg.validate(); err != nil {
				return err
			}
			return serve(cmd.Context(), cfg, cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", defaultConfigPath, "TOML config file (a missing default file is fine)")
	f.StringVar(&address, "address", defaultAddress, "unix socket to serve the snapshots API on")
	f.StringVar(&rootDir, "root", defaultRoot, "directory for snapshots and metadata")
	f.StringVar(&metricsAddress, "metrics-address", "", "host:port to serve Prometheus /metrics on (empty: off)")
	f.StringVar(&logLevel, "log-level", defaultLogLevel, "log level: trace, debug, info, warn or error")
	f.StringVar(&criProxy, "cri-image-service-proxy", "", "unix socket to serve the CRI image service proxy on (the kubelet's --image-service-endpoint; empty: off)")
	return cmd
}
