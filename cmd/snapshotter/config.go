package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"

	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/resolver"
)

// Defaults of the daemon; each can be changed in the config file and then
// by a flag.
const (
	defaultConfigPath = "/etc/spanpull/config.toml"
	defaultAddress    = "/run/spanpull/snapshotter.sock"
	defaultRoot       = "/var/lib/spanpull"
	defaultLogLevel   = "info"
	// defaultMemoryLimit is the Go runtime's soft memory limit: with the
	// ~30 MiB the daemon maps besides its heap (program text, TOC files),
	// its RSS stays near 100 MiB however much garbage the span loads
	// make (BENCHMARKS.md).
	defaultMemoryLimit = 64 << 20
	// defaultRegistryConfigPath is where containerd's own configs keep
	// registry host configuration (hosts.toml) by convention.
	defaultRegistryConfigPath = "/etc/containerd/certs.d"
	// defaultContainerdCRISocket is containerd's socket, which serves CRI.
	defaultContainerdCRISocket = "/run/containerd/containerd.sock"
)

// config is the daemon's configuration file (TOML). Unknown keys are an
// error, so a typo does not silently leave a default in place.
type config struct {
	// Address is the unix socket serving containerd's snapshots gRPC API.
	Address string `toml:"address"`
	// Root holds snapshot directories and metadata.
	Root string `toml:"root"`
	// MetricsAddress is a TCP host:port serving Prometheus /metrics; empty
	// means no metrics endpoint.
	MetricsAddress string `toml:"metrics_address"`
	// DebugAddress is a TCP host:port serving the Go runtime's profiles
	// (/debug/pprof/); empty (the default) means none. Keep it on
	// loopback: profiles show the daemon's memory.
	DebugAddress string `toml:"debug_address"`
	// LogLevel is one of trace, debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// AsyncRemove defers deleting removed snapshots to containerd's
	// garbage collection (Cleanup), like containerd's overlayfs plugin.
	AsyncRemove bool `toml:"async_remove"`
	// MemoryLimitBytes is the Go runtime's soft memory limit
	// (runtime/debug.SetMemoryLimit): the garbage collector works harder
	// as the daemon's heap nears it. Zero: defaultMemoryLimit; negative:
	// none. The GOMEMLIMIT environment variable, when set, wins.
	MemoryLimitBytes int64 `toml:"memory_limit_bytes"`
	// MountOptions are extra overlayfs mount options.
	MountOptions []string `toml:"mount_options"`
	// Remote tunes lazy pulling of SOCI-indexed layers.
	Remote remoteConfig `toml:"remote"`
	// CRI configures the CRI image service proxy.
	CRI criConfig `toml:"cri"`
	// Cache bounds what lazy layers keep on disk.
	Cache cacheConfig `toml:"cache"`
	// Record configures the access records of recorded prefetch.
	Record record.Config `toml:"record"`
}

// cacheConfig is the [cache] table.
type cacheConfig struct {
	// MaxBytes bounds the cached span bytes and the local files of
	// verified lazy layers, together (least recently used spans are
	// evicted first). Zero: 10% of the filesystem holding root.
	MaxBytes int64 `toml:"max_bytes"`
	// MemoryBytes bounds the inflated spans kept in memory across layers,
	// so that a run of small reads inflates a span once. Zero: the
	// default (span.DefaultMemoryBytes); negative: none.
	MemoryBytes int64 `toml:"memory_bytes"`
}

// criConfig is the [cri] table: the CRI image service proxy that gives the
// snapshotter the credentials the kubelet sends with each pull.
type criConfig struct {
	// ImageServiceProxy is the unix socket the proxy serves CRI's image
	// service on (the kubelet's --image-service-endpoint); empty: no
	// proxy.
	ImageServiceProxy string `toml:"image_service_proxy"`
	// ContainerdCRISocket is containerd's CRI socket, where the proxy
	// forwards every call.
	ContainerdCRISocket string `toml:"containerd_cri_socket"`
}

// remoteConfig is the [remote] table: lazy pulling of indexed layers.
type remoteConfig struct {
	// Disable turns lazy pulling off: every layer is pulled normally.
	Disable bool `toml:"disable"`
	// PlainHTTP lists registry hosts (host or host:port) reached over
	// plain HTTP; loopback registries always are.
	PlainHTTP []string `toml:"plain_http"`
	// Insecure skips TLS certificate verification for every registry
	// whose hosts.toml does not configure TLS.
	Insecure bool `toml:"insecure"`
	// ConfigPath is containerd's registry host directory (its
	// [plugins."io.containerd.grpc.v1.cri".registry] config_path): the
	// mirrors, TLS, headers and plain HTTP of each registry, in
	// containerd's hosts.toml format. Empty: registries are reached
	// directly.
	ConfigPath string `toml:"config_path"`
	// DockerConfig is the Docker config.json registry credentials are
	// read from (with its credential helpers), again whenever a registry
	// answers 401; empty: $DOCKER_CONFIG/config.json or
	// ~/.docker/config.json.
	DockerConfig string `toml:"docker_config"`
	// FetchTimeoutSeconds bounds one span fetch; a read waiting on a
	// registry that is down or slow fails with EIO after it. It is the
	// only bound on a span fetch (resolver.Config.FetchTimeout, enforced
	// by the span engine); within it the registry client retries stalled
	// connections on its own.
	FetchTimeoutSeconds int `toml:"fetch_timeout_seconds"`
	// FillDelaySeconds is how long after mounting a layer the rest of it
	// starts being fetched in the background.
	FillDelaySeconds int `toml:"fill_delay_seconds"`
	// FillRateBytes bounds the background fill of one layer, in
	// compressed bytes per second; negative disables background fill.
	FillRateBytes int64 `toml:"fill_rate_bytes"`
	// IndexSources lists the SOCI index kinds trusted to find an image's
	// index: "v2" (named by the image, pinned by its digest) and "v1"
	// (referrers, which anyone who can push to the repository can add).
	IndexSources []string `toml:"index_sources"`
	// Prefetch names the recorded prefetch to use when an image's index
	// has several; empty: the first.
	Prefetch string `toml:"prefetch"`
	// FDHolderSocket is the socket of the fd holder that keeps the FUSE
	// connections of lazy layers across restarts of the daemon; empty:
	// fd-holder.sock next to the daemon's socket.
	FDHolderSocket string `toml:"fd_holder_socket"`
	// StartFDHolder makes the daemon start the holder when none answers
	// (a process of its own session; under systemd, KillMode=process
	// keeps it across restarts). Off when the holder runs on its own (the
	// Kubernetes chart's holder DaemonSet): the daemon then waits for it.
	StartFDHolder bool `toml:"start_fd_holder"`
	// VerifyFiles checks each file's tar header against its TOC entry
	// before its first byte is served (the per-file binding). Turning it
	// off is a diagnostic setting.
	VerifyFiles bool `toml:"verify_files"`
}

// defaultConfig is the configuration before the config file and flags
// apply. The [remote] defaults are the resolver's own (DefaultConfig),
// not repeated here.
func defaultConfig() config {
	rd := resolver.DefaultConfig()
	return config{
		Address:          defaultAddress,
		Root:             defaultRoot,
		LogLevel:         defaultLogLevel,
		MemoryLimitBytes: defaultMemoryLimit,
		CRI:              criConfig{ContainerdCRISocket: defaultContainerdCRISocket},
		Remote: remoteConfig{
			ConfigPath:          defaultRegistryConfigPath,
			FetchTimeoutSeconds: int(rd.FetchTimeout / time.Second),
			FillDelaySeconds:    int(rd.FillDelay / time.Second),
			FillRateBytes:       rd.FillRate,
			IndexSources:        rd.IndexSources,
			VerifyFiles:         !rd.NoEntryBinding,
			StartFDHolder:       true,
		},
		Record: record.DefaultConfig(),
	}
}

// resolverConfig is the resolver's part of c, with its state under
// c.Root.
func (c config) resolverConfig() resolver.Config {
	rc := resolver.DefaultConfig()
	rc.Root = filepath.Join(c.Root, "remote")
	rc.PlainHTTP = c.Remote.PlainHTTP
	rc.Insecure = c.Remote.Insecure
	rc.RegistryConfigPath = c.Remote.ConfigPath
	rc.DockerConfig = c.Remote.DockerConfig
	rc.FetchTimeout = time.Duration(c.Remote.FetchTimeoutSeconds) * time.Second
	rc.FillDelay = time.Duration(c.Remote.FillDelaySeconds) * time.Second
	rc.FillRate = c.Remote.FillRateBytes
	rc.CacheMaxBytes = c.Cache.MaxBytes
	rc.MemoryBytes = c.Cache.MemoryBytes
	rc.IndexSources = c.Remote.IndexSources
	rc.PrefetchName = c.Remote.Prefetch
	rc.NoEntryBinding = !c.Remote.VerifyFiles
	rc.Holder = resolver.HolderConfig{Socket: c.Remote.FDHolderSocket}
	if rc.Holder.Socket == "" {
		rc.Holder.Socket = filepath.Join(filepath.Dir(c.Address), "fd-holder.sock")
	}
	if exe, err := os.Executable(); err == nil && c.Remote.StartFDHolder {
		rc.Holder.Argv = []string{exe, "fd-holder", "--socket", rc.Holder.Socket}
	}
	return rc
}

// loadConfig reads the config file at path over the defaults. A missing
// file is fine only when it is the default path (explicit is false).
func loadConfig(path string, explicit bool) (config, error) {
	c := defaultConfig()
	b, err := os.ReadFile(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return c, nil
		}
		return c, fmt.Errorf("read config: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return c, fmt.Errorf("config %s:%d:%d: %s", path, row, col, de.Error())
		}
		var se *toml.StrictMissingError
		if errors.As(err, &se) {
			return c, fmt.Errorf("config %s: %s", path, se.String())
		}
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// validate checks the values a daemon cannot start without.
func (c config) validate() error {
	if c.Address == "" {
		return errors.New("config: address is empty")
	}
	if c.Root == "" {
		return errors.New("config: root is empty")
	}
	if c.Remote.FetchTimeoutSeconds <= 0 {
		return fmt.Errorf("config: remote.fetch_timeout_seconds must be positive, got %d", c.Remote.FetchTimeoutSeconds)
	}
	if c.Remote.FillDelaySeconds < 0 {
		return fmt.Errorf("config: remote.fill_delay_seconds must not be negative")
	}
	if c.CRI.ImageServiceProxy != "" && c.CRI.ContainerdCRISocket == "" {
		return errors.New("config: cri.image_service_proxy needs cri.containerd_cri_socket")
	}
	if c.CRI.ImageServiceProxy != "" && c.CRI.ImageServiceProxy == c.Address {
		return errors.New("config: cri.image_service_proxy and address are the same socket")
	}
	for _, src := range c.Remote.IndexSources {
		if src != "v1" && src != "v2" {
			return fmt.Errorf("config: remote.index_sources: %q is not v1 or v2", src)
		}
	}
	if c.Cache.MaxBytes < 0 {
		return fmt.Errorf("config: cache.max_bytes must not be negative")
	}
	if err := c.Record.Validate(); err != nil {
		return fmt.Errorf("config: record: %w", err)
	}
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("config: log_level %q: %w", c.LogLevel, err)
	}
	return nil
}
