package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"
)

// Defaults of the daemon; each can be changed in the config file and then
// by a flag.
const (
	defaultConfigPath = "/etc/spanpull/config.toml"
	defaultAddress    = "/run/spanpull/snapshotter.sock"
	defaultRoot       = "/var/lib/spanpull"
	defaultLogLevel   = "info"
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
	// LogLevel is one of trace, debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// AsyncRemove defers deleting removed snapshots to containerd's
	// garbage collection (Cleanup), like containerd's overlayfs plugin.
	AsyncRemove bool `toml:"async_remove"`
	// MountOptions are extra overlayfs mount options.
	MountOptions []string `toml:"mount_options"`
	// Remote tunes lazy pulling of SOCI-indexed layers.
	Remote remoteConfig `toml:"remote"`
}

// remoteConfig is the [remote] table: lazy pulling of indexed layers.
type remoteConfig struct {
	// Disable turns lazy pulling off: every layer is pulled normally.
	Disable bool `toml:"disable"`
	// PlainHTTP lists registry hosts (host or host:port) reached over
	// plain HTTP; loopback registries always are.
	PlainHTTP []string `toml:"plain_http"`
	// Insecure skips TLS certificate verification for every registry.
	Insecure bool `toml:"insecure"`
	// FetchTimeoutSeconds bounds one span fetch; a read waiting on a
	// registry that is down or slow fails with EIO after it.
	FetchTimeoutSeconds int `toml:"fetch_timeout_seconds"`
	// FillDelaySeconds is how long after mounting a layer the rest of it
	// starts being fetched in the background.
	FillDelaySeconds int `toml:"fill_delay_seconds"`
	// FillRateBytes bounds the background fill of one layer, in
	// compressed bytes per second; negative disables background fill.
	FillRateBytes int64 `toml:"fill_rate_bytes"`
}

func defaultConfig() config {
	return config{
		Address:  defaultAddress,
		Root:     defaultRoot,
		LogLevel: defaultLogLevel,
		Remote: remoteConfig{
			FetchTimeoutSeconds: 30,
			FillDelaySeconds:    5,
			FillRateBytes:       8 << 20,
		},
	}
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
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("config: log_level %q: %w", c.LogLevel, err)
	}
	return nil
}
