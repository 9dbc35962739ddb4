package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/opencontainers/go-digest"
	orasreg "oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// HostsOptions configure ConfigureHosts.
type HostsOptions struct {
	// ConfigPath is containerd's registry host directory (its
	// `config_path`, usually /etc/containerd/certs.d): one directory per
	// registry host holding a hosts.toml. Empty: no host configuration,
	// every registry is reached directly.
	ConfigPath string
	// PlainHTTP reports the registry hosts reached over plain HTTP when no
	// hosts.toml names the registry's own scheme. Nil: none.
	PlainHTTP func(host string) bool
	// Insecure skips TLS verification for registries whose hosts.toml
	// does not configure TLS itself.
	Insecure bool
}

// ConfigureHosts returns the hosts that serve each registry, read from
// containerd's host configuration (hosts.toml: `server`, `[host."..."]`
// mirrors in order with their capabilities, `skip_verify`, `ca`, `client`,
// `header`, plain HTTP) by containerd's own parser
// (core/remotes/docker/config), so that the snapshotter sends its requests
// where containerd sends its own. The files are read each time a
// Repository is created.
func ConfigureHosts(ctx context.Context, o HostsOptions) docker.RegistryHosts {
	return func(host string) ([]docker.RegistryHost, error) {
		ho := config.HostOptions{}
		if o.ConfigPath != "" {
			ho.HostDir = config.HostDirFromRoot(o.ConfigPath)
		}
		if o.PlainHTTP != nil && o.PlainHTTP(host) {
			ho.DefaultScheme = "http"
		}
		if o.Insecure {
			ho.DefaultTLS = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // explicit user choice
		}
		hosts, err := config.ConfigureHosts(ctx, ho)(host)
		if err != nil {
			return nil, fmt.Errorf("registry host configuration of %s in %s: %w", host, o.ConfigPath, err)
		}
		return hosts, nil
	}
}

// hostDownInterval is how long a host that failed at the connection level
// (refused, reset, stalled, TLS) is skipped while a later host can serve
// the request: a dead mirror must not cost every span read a connection
// attempt (or a stall timeout).
const hostDownInterval = 30 * time.Second

// endpoint is one host serving the repository: a mirror, or the registry
// itself. Each has its own oras-go client, so its auth tokens, TLS
// settings and retry budget are its own.
type endpoint struct {
	host   string // host:port requests go to
	scheme string
	caps   docker.HostCapabilities
	repo   *remote.Repository
	client *auth.Client
	// downUntil is when the host may be tried again after a connection
	// failure (UnixNano; zero: up).
	downUntil atomic.Int64
}

// newEndpoint builds the oras-go client of host h for repository repo
// (path without host); ns is the registry the repository belongs to,
// sent to mirrors as the `ns` query parameter.
func newEndpoint(h docker.RegistryHost, repo, ns string, retry RetryPolicy, opts Options, cred auth.CredentialFunc) *endpoint {
	base := opts.Transport
	if base == nil && h.Client != nil && h.Client.Transport != nil {
		base = h.Client.Transport
	}
	if base == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		if opts.Insecure {
			t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // explicit user choice
		}
		base = t
	}
	stall := opts.StallTimeout
	if stall == 0 {
		stall = DefaultStallTimeout
	}
	var rt http.RoundTripper = &transport{base: base, policy: retry.withDefaults(), stall: stall}
	ht := &hostTransport{base: rt, host: h.Host, path: strings.TrimSuffix(h.Path, "/"), header: h.Header}
	if isMirror(h.Host, ns) {
		ht.ns = ns
	}
	if ht.path != "/v2" || ht.ns != "" || len(ht.header) > 0 {
		rt = ht
	}
	client := &auth.Client{
		Client:     &http.Client{Transport: rt},
		Cache:      auth.NewCache(),
		Credential: cred,
	}
	ua := opts.UserAgent
	if ua == "" {
		ua = DefaultUserAgent
	}
	client.SetUserAgent(ua)
	return &endpoint{
		host:   h.Host,
		scheme: h.Scheme,
		caps:   h.Capabilities,
		client: client,
		repo: &remote.Repository{
			Client:    client,
			Reference: orasreg.Reference{Registry: h.Host, Repository: repo},
			PlainHTTP: h.Scheme == "http",
		},
	}
}

// isMirror reports whether host serves registry ns as a mirror: any host
// but the registry itself (Docker Hub's API host counts as Docker Hub), as
// containerd decides when it adds the `ns` parameter.
func isMirror(host, ns string) bool {
	return host != ns && !(ns == "docker.io" && host == dockerHubHost)
}

// registryHosts returns the hosts serving registry (host[:port] as in the
// reference), in the order to try them.
func registryHosts(registry string, opts Options) ([]docker.RegistryHost, string, error) {
	ns := registry
	if registry == dockerHubHost {
		ns = "docker.io" // containerd's name for Docker Hub, and its hosts.toml directory
	}
	if opts.Hosts == nil {
		scheme := "https"
		if opts.PlainHTTP {
			scheme = "http"
		}
		return []docker.RegistryHost{{
			Host: registry, Scheme: scheme, Path: "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityPush | docker.HostCapabilityReferrers,
		}}, ns, nil
	}
	hosts, err := opts.Hosts(ns)
	if err != nil {
		return nil, "", err
	}
	if len(hosts) == 0 {
		return nil, "", fmt.Errorf("no hosts configured for registry %s", ns)
	}
	return hosts, ns, nil
}

// hostTransport adapts oras-go's requests to one host of a registry as
// containerd sends them: the host's path prefix instead of /v2 (a
// hosts.toml server URL may carry one), its configured headers, and on a
// mirror the `ns` query parameter naming the registry the repository
// belongs to. Requests to other hosts (token servers) pass unchanged.
type hostTransport struct {
	base   http.RoundTripper
	host   string
	path   string
	ns     string
	header http.Header
}

func (t *hostTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Host != t.host || !strings.HasPrefix(req.URL.Path, "/v2/") && req.URL.Path != "/v2" {
		return t.base.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	if t.path != "/v2" {
		r.URL.Path = t.path + strings.TrimPrefix(r.URL.Path, "/v2")
		r.URL.RawPath = ""
	}
	if t.ns != "" {
		q := r.URL.Query()
		q.Set("ns", t.ns)
		r.URL.RawQuery = q.Encode()
	}
	for k, vs := range t.header {
		if r.Header.Get(k) == "" {
			for _, v := range vs {
				r.Header.Add(k, v)
			}
		}
	}
	return t.base.RoundTrip(r)
}

// each runs op against the endpoints that have capability c, in order,
// until one succeeds: a mirror that fails (unreachable, 404, 401 after
// the credentials were read again, a range it would not serve) hands the
// request to the next host and finally to the registry itself, as
// containerd does. A host that failed at the connection level is skipped
// for hostDownInterval unless it is the last one left. The error returned
// is the last host's (the registry's answer is what classifies a
// failure), noting the hosts that failed before it.
func (r *Repository) each(ctx context.Context, c docker.HostCapabilities, op func(e *endpoint) error) error {
	var cands []*endpoint
	for _, e := range r.endpoints {
		if e.caps.Has(c) {
			cands = append(cands, e)
		}
	}
	if len(cands) == 0 {
		return fmt.Errorf("%s: no configured host of %s may %s", r.name, r.name, capName(c))
	}
	var earlier []string
	var err error
	for i, e := range cands {
		last := i == len(cands)-1
		if !last && time.Now().UnixNano() < e.downUntil.Load() {
			continue
		}
		if err = op(e); err == nil {
			e.downUntil.Store(0)
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		if isConnectionFailure(err) {
			e.downUntil.Store(time.Now().Add(hostDownInterval).UnixNano())
		}
		if !last {
			earlier = append(earlier, e.host+": "+err.Error())
		}
	}
	if len(earlier) > 0 {
		return fmt.Errorf("%w (after the mirrors failed: %s)", err, strings.Join(earlier, "; "))
	}
	return err
}

// pushEndpoint returns the first host that accepts pushes.
func (r *Repository) pushEndpoint() (*endpoint, error) {
	for _, e := range r.endpoints {
		if e.caps.Has(docker.HostCapabilityPush) {
			return e, nil
		}
	}
	return nil, fmt.Errorf("%s: no configured host accepts pushes", r.name)
}

// capName names a capability for errors.
func capName(c docker.HostCapabilities) string {
	switch c {
	case docker.HostCapabilityPull:
		return "pull"
	case docker.HostCapabilityResolve:
		return "resolve"
	case docker.HostCapabilityPush:
		return "push"
	case docker.HostCapabilityReferrers:
		return "list referrers"
	}
	return fmt.Sprintf("capability %d", c)
}

// isConnectionFailure reports errors of the connection rather than of an
// HTTP answer: refused or reset connections, DNS failures, stalls, TLS.
func isConnectionFailure(err error) bool {
	var ne net.Error
	var ue *url.Error
	return errors.Is(err, ErrStalled) || errors.As(err, &ne) || errors.As(err, &ue) || isPermanent(err)
}

// resolveCap is the capability a host needs to answer for reference: a
// digest can be pulled from any pull host, a tag only from hosts trusted
// to resolve tags.
func resolveCap(reference string) docker.HostCapabilities {
	if _, err := digest.Parse(reference); err == nil {
		return docker.HostCapabilityPull
	}
	return docker.HostCapabilityResolve
}
