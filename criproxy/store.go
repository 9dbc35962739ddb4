// Package criproxy is a CRI image service (runtime.v1.ImageService) that
// sits between the kubelet and containerd: it forwards every call to
// containerd's CRI socket and remembers the registry credentials each
// PullImage carries (the pod's imagePullSecrets, or what the kubelet's
// credential provider returned), so that the snapshotter can fetch the
// lazily pulled image with them. containerd never hands those
// credentials to a snapshotter; the kubelet is pointed at the proxy with
// --image-service-endpoint.
//
// Credentials live in memory only. They are kept while the image has
// snapshots (the layers being read lazily need them) and for a grace
// period after the pull, and are forgotten after that (Store.Expire).
package criproxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/distribution/reference"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// DefaultGrace is how long the credentials of a pull are kept even when
// no snapshot of the image exists (yet): containerd prepares the image's
// snapshots during the pull, which the grace must outlast.
const DefaultGrace = 10 * time.Minute

// Store keeps the credentials of CRI pulls, keyed by image reference
// (normalized as containerd's CRI plugin does, so "app:1" and
// "docker.io/library/app:1" are the same image); each credential is
// offered for the hosts its AuthConfig.ServerAddress allows. It is safe
// for concurrent use.
type Store struct {
	mu      sync.Mutex
	entries map[string]entry
	now     func() time.Time
}

type entry struct {
	auth   *runtime.AuthConfig
	pulled time.Time
}

// NewStore returns an empty Store.
func NewStore() *Store {
	return &Store{entries: make(map[string]entry), now: time.Now}
}

// normalize returns the canonical form of an image reference, as
// containerd's CRI plugin writes it into the snapshot labels.
func normalize(ref string) (string, error) {
	named, err := reference.ParseDockerRef(ref)
	if err != nil {
		return "", fmt.Errorf("image reference %q: %w", ref, err)
	}
	return named.String(), nil
}

// Remember records the credentials of a pull of image ref, replacing
// those of an earlier pull. A pull without credentials (nil, or an empty
// AuthConfig) changes nothing: the layers of the image that are being read
// lazily keep the credentials they were pulled with. It reports whether
// credentials were recorded.
func (s *Store) Remember(ref string, a *runtime.AuthConfig) (bool, error) {
	key, err := normalize(ref)
	if err != nil {
		return false, err
	}
	if a == nil || (a.Username == "" && a.Password == "" && a.Auth == "" && a.IdentityToken == "" && a.RegistryToken == "") {
		return false, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entries[key] = entry{auth: a, pulled: s.now()}
	return true, nil
}

// Len returns how many images have credentials.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}

// ImageCredentials returns the credential function for the registry
// requests made for image ref (index discovery, zTOC and span fetches).
// The store is consulted at each call, so a later pull of the image with
// new credentials is seen by a Repository created before it. Hosts the
// credentials do not apply to get auth.EmptyCredential (the caller then
// tries its other sources).
func (s *Store) ImageCredentials(ref string) auth.CredentialFunc {
	key, err := normalize(ref)
	if err != nil {
		key = ref
	}
	return func(_ context.Context, hostport string) (auth.Credential, error) {
		s.mu.Lock()
		e, ok := s.entries[key]
		s.mu.Unlock()
		if !ok {
			return auth.EmptyCredential, nil
		}
		return credential(e.auth, hostport)
	}
}

// Expire forgets the credentials of every image that no snapshot uses
// (inUse, given normalized references, reports false) and that was pulled
// longer than grace ago. It returns the references forgotten.
func (s *Store) Expire(inUse func(ref string) bool, grace time.Duration) []string {
	cutoff := s.now().Add(-grace)
	s.mu.Lock()
	defer s.mu.Unlock()
	var gone []string
	for ref, e := range s.entries {
		if e.pulled.Before(cutoff) && !inUse(ref) {
			delete(s.entries, ref)
			gone = append(gone, ref)
		}
	}
	return gone
}

// Normalize returns ref in the form the Store keys it by (ref itself if it
// does not parse), for callers building the set Expire asks about.
func Normalize(ref string) string {
	if key, err := normalize(ref); err == nil {
		return key
	}
	return ref
}

// credential turns a CRI AuthConfig into the credential for host, the way
// containerd's CRI plugin uses it (ParseAuth): nothing when ServerAddress
// names another host; otherwise username and password (also from the
// base64 "auth" field), or an identity token (a refresh token for the
// token service), or a registry token (a bearer token sent as is).
func credential(a *runtime.AuthConfig, host string) (auth.Credential, error) {
	if a.ServerAddress != "" && !sameRegistry(serverHost(a.ServerAddress), host) {
		return auth.EmptyCredential, nil
	}
	switch {
	case a.Username != "" || a.Password != "":
		return auth.Credential{Username: a.Username, Password: a.Password}, nil
	case a.IdentityToken != "":
		return auth.Credential{RefreshToken: a.IdentityToken}, nil
	case a.RegistryToken != "":
		return auth.Credential{AccessToken: a.RegistryToken}, nil
	case a.Auth != "":
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return auth.EmptyCredential, fmt.Errorf("CRI credentials for %s: auth field: %w", host, err)
		}
		user, pass, ok := strings.Cut(string(b), ":")
		if !ok {
			return auth.EmptyCredential, errors.New("CRI credentials for " + host + ": auth field is not user:password")
		}
		return auth.Credential{Username: user, Password: strings.Trim(pass, "\x00")}, nil
	}
	return auth.EmptyCredential, nil
}

// serverHost returns the host[:port] of an AuthConfig.ServerAddress, which
// the kubelet fills from Docker config keys: "https://host/v1/" or a bare
// "host[:port]".
func serverHost(addr string) string {
	if u, err := url.Parse(addr); err == nil && u.Host != "" {
		return u.Host
	}
	h, _, _ := strings.Cut(addr, "/")
	return h
}

// sameRegistry compares registry hosts, treating Docker Hub's names as one.
func sameRegistry(a, b string) bool {
	hub := func(h string) bool {
		return h == "docker.io" || h == "index.docker.io" || h == "registry-1.docker.io"
	}
	return a == b || hub(a) && hub(b)
}
