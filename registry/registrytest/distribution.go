package registrytest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/spanpull/spanpull/internal/proc"
)

// DistributionBinary is where Debian installs docker-registry;
// $SPANPULL_DOCKER_REGISTRY names another.
const DistributionBinary = "/usr/bin/docker-registry"

// startTimeout bounds how long a registry may take to answer /v2/.
const startTimeout = 15 * time.Second

// stopGrace is how long docker-registry gets to exit on SIGTERM.
const stopGrace = 5 * time.Second

// DistributionOptions configures LaunchDistribution.
type DistributionOptions struct {
	// Dir holds the storage (registry-data), the config and the log.
	Dir string
	// Listen is the address in the config; empty: a free 127.0.0.1 port.
	Listen string
	// Addr is where the registry is reached when that is not Listen (a
	// registry in a network namespace listening on 0.0.0.0).
	Addr string
	// Wrapper runs docker-registry (for example "ip netns exec NAME").
	Wrapper []string
	// Htpasswd, if set, is an htpasswd file (bcrypt entries, see
	// HtpasswdEntry): every request needs HTTP basic auth of one of its
	// users. docker-registry reads it at start, so a change needs Restart.
	Htpasswd string
	// ProxyRemoteURL, if set, makes the registry a pull-through cache of
	// the registry at that URL (proxy mode): it fetches what it does not
	// hold from there, keeps it, and refuses pushes.
	ProxyRemoteURL string
	// AccessLog turns the access log on (in the registry's log, one
	// combined-format line per request; see AccessLogLines).
	AccessLog bool
}

// Distribution is a running docker-registry.
type Distribution struct {
	// Addr is "host:port".
	Addr string
	// Storage is the filesystem storage's root directory.
	Storage string
	// Process is the daemon.
	Process *proc.Process

	bin, cfg string
	opts     DistributionOptions
}

// LaunchDistribution starts Debian's docker-registry with filesystem
// storage in o.Dir and returns once GET /v2/ answers. A free port can be
// taken by someone else between probing and the registry binding it, so
// without o.Listen it tries a few ports before giving up. Stop it with
// Stop.
func LaunchDistribution(ctx context.Context, o DistributionOptions) (*Distribution, error) {
	bin := DistributionBinary
	if p := os.Getenv("SPANPULL_DOCKER_REGISTRY"); p != "" {
		bin = p
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("docker-registry not installed (%v): run scripts/install-deps.sh", err)
	}
	d := &Distribution{Storage: filepath.Join(o.Dir, "registry-data"), bin: bin, cfg: filepath.Join(o.Dir, "registry.yml"), opts: o}
	var errs []error
	for try := 0; try < 3; try++ {
		listen := o.Listen
		if listen == "" {
			var err error
			if listen, err = proc.FreeLoopbackAddr(); err != nil {
				return nil, err
			}
		}
		d.Addr = o.Addr
		if d.Addr == "" {
			d.Addr = listen
		}
		if err := os.WriteFile(d.cfg, []byte(o.config(d.Storage, listen)), 0o600); err != nil {
			return nil, err
		}
		err := d.Restart(ctx)
		if err == nil {
			return d, nil
		}
		errs = append(errs, err)
		if o.Listen != "" {
			break
		}
	}
	return nil, fmt.Errorf("start docker-registry: %w", errors.Join(errs...))
}

// Restart starts the stopped registry again on the same address and
// storage.
func (d *Distribution) Restart(ctx context.Context) error {
	args := append(append([]string{}, d.opts.Wrapper...), d.bin, "serve", d.cfg)
	p, err := proc.Start(d.opts.Dir, "registry", exec.Command(args[0], args[1:]...))
	if err != nil {
		return err
	}
	d.Process = p
	if err := waitReady(ctx, p, d.Addr); err != nil {
		_ = d.Stop()
		return err
	}
	return nil
}

// Stop stops the registry; its address refuses connections afterwards.
// Death by SIGTERM, docker-registry's way of exiting, is a clean stop.
func (d *Distribution) Stop() error {
	err := d.Process.Stop(stopGrace)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
			return nil
		}
	}
	return err
}

// StartDistribution starts Debian's docker-registry with filesystem storage
// in a temporary directory and returns its "127.0.0.1:port" address once
// GET /v2/ answers. It fails the test if the binary is missing (CI installs
// it) or the registry does not come up; the registry is stopped in Cleanup,
// and its log printed when the test failed.
func StartDistribution(t testing.TB) string {
	t.Helper()
	d, err := LaunchDistribution(context.Background(), DistributionOptions{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Stop(); err != nil {
			t.Logf("stop docker-registry: %v", err)
		}
		if t.Failed() {
			t.Logf("docker-registry %s log:\n%s", d.Addr, d.Process.LogTail(16<<10))
		}
	})
	return d.Addr
}

// DistributionConfig is the docker-registry configuration the tests use:
// filesystem storage in storageDir, listening on addr, deletes allowed,
// quiet logs.
func DistributionConfig(storageDir, addr string) string {
	return fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
  secret: spanpull-test-not-secret
`, storageDir, addr)
}

// config is DistributionConfig with the options' auth, proxy and access
// log settings.
func (o DistributionOptions) config(storageDir, addr string) string {
	c := DistributionConfig(storageDir, addr)
	if o.AccessLog {
		c = strings.Replace(c, "    disabled: true", "    disabled: false", 1)
	}
	if o.Htpasswd != "" {
		c += fmt.Sprintf("auth:\n  htpasswd:\n    realm: spanpull-test\n    path: %s\n", o.Htpasswd)
	}
	if o.ProxyRemoteURL != "" {
		c += fmt.Sprintf("proxy:\n  remoteurl: %s\n", o.ProxyRemoteURL)
	}
	return c
}

// HtpasswdEntry returns the htpasswd line for user with a bcrypt hash of
// password (the only hash docker-registry accepts).
func HtpasswdEntry(user, password string) (string, error) {
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		return "", err
	}
	return user + ":" + string(h) + "\n", nil
}

// AccessLogLines returns the access log lines (combined log format:
// `host - - [time] "METHOD URI PROTO" status bytes "referer" "agent"`) the
// registry wrote so far, for registries started with AccessLog.
func (d *Distribution) AccessLogLines() ([]string, error) {
	b, err := os.ReadFile(d.Process.Log)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "] \"") && !strings.HasPrefix(l, "time=") {
			out = append(out, l)
		}
	}
	return out, nil
}
