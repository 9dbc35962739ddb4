// Package registry talks to one OCI distribution repository: resolve
// references, fetch manifests and blobs (streaming, or by HTTP range for lazy
// reads), push blobs and manifests, and list referrers (OCI referrers API, or
// the `sha256-<hex>` fallback tag on registries without it).
//
// It is a thin layer over oras-go v2 that adds what spanpull needs on top:
// every byte handed out is verified against its descriptor; transient
// failures (HTTP 408/429/5xx, connection resets, stalls) are retried with
// bounded exponential backoff, and broken blob bodies are resumed with Range
// requests; errors name the reference and wrap ErrNotFound, ErrUnauthorized
// or ErrForbidden so callers can tell them apart.
//
// A registry may be served by mirrors: Options.Hosts (containerd's host
// configuration, hosts.toml, read by ConfigureHosts) lists them in order,
// each with its own oras-go client; reads fall back from one host to the
// next and finally to the registry itself, and requests to a mirror carry
// the `ns` query parameter as containerd's do.
//
// Credentials come from the Docker config (~/.docker/config.json or
// $DOCKER_CONFIG, including credential helpers), read again whenever a
// registry answers 401, unless Options.Credential is set; basic and token
// (bearer/OAuth2) auth are handled by oras-go's auth.Client.
package registry

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	orasreg "oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"
	"oras.land/oras-go/v2/registry/remote/errcode"
)

// Errors wrapped by the errors of Repository methods, to be tested with
// errors.Is.
var (
	// ErrNotFound: the repository, manifest or blob does not exist (404).
	ErrNotFound = errors.New("not found")
	// ErrUnauthorized: the registry wants credentials that were missing or
	// rejected (401).
	ErrUnauthorized = errors.New("unauthorized (missing or rejected credentials)")
	// ErrForbidden: the credentials do not grant the operation (403).
	ErrForbidden = errors.New("forbidden (access denied)")
	// ErrRangeUnsupported: the registry answered a range read with the
	// whole blob, so lazy reads cannot work against it.
	ErrRangeUnsupported = errors.New("registry ignored the Range header")
)

// DefaultUserAgent is sent when Options.UserAgent is empty.
const DefaultUserAgent = "spanpull"

// Options configure a Repository.
type Options struct {
	// PlainHTTP talks http instead of https (local test registries).
	PlainHTTP bool
	// Insecure skips TLS certificate verification.
	Insecure bool
	// UserAgent is sent with every request (default DefaultUserAgent).
	UserAgent string
	// Retry bounds retries of transient failures.
	Retry RetryPolicy
	// StallTimeout is the longest time a request may wait on the network
	// without progress: to connect and send the request (each chunk of an
	// upload counts as progress), for response headers, or inside one read
	// of the response body. A stalled attempt is retried on a new
	// connection (a body is resumed with a Range request). It detects dead
	// connections; it is not a limit on whole requests or transfers: a
	// caller that needs one (the span engine bounds each span fetch) sets
	// a context deadline, and a caller may pause between reads for as long
	// as it likes. Zero means DefaultStallTimeout; negative disables it.
	StallTimeout time.Duration
	// Credential supplies credentials per host (registry or mirror). It
	// is called when a host answers 401, and the request is then retried
	// once (oras-go's auth client). Nil means DockerCredentials
	// (DockerConfig or the default location), read at every call.
	Credential auth.CredentialFunc
	// DockerConfig is the path of a Docker config.json to read credentials
	// from; empty means $DOCKER_CONFIG/config.json or ~/.docker/config.json.
	DockerConfig string
	// Transport is the base HTTP transport of every host; nil means the
	// host's own (Hosts: its TLS settings) or a clone of
	// http.DefaultTransport (with Insecure applied).
	Transport http.RoundTripper
	// Hosts lists the hosts that serve a registry, in the order requests
	// try them: mirrors first, the registry itself last (containerd's
	// docker.RegistryHosts; ConfigureHosts reads containerd's hosts.toml).
	// Reads go to the hosts with the needed capability (pull, resolve for
	// tags), falling back to the next host on any failure; pushes go to
	// the first host that accepts them. Nil means the registry alone, with
	// PlainHTTP and Insecure, which are otherwise the hosts' business.
	Hosts docker.RegistryHosts
}

// Repository is one repository on one registry (e.g. "ghcr.io/org/app"),
// reached through the registry's hosts: its mirrors in order, then the
// registry itself (Options.Hosts). It is safe for concurrent use.
type Repository struct {
	name      string // host/repository of the registry itself
	ref       string // tag or digest given to New, may be empty
	endpoints []*endpoint
}

// New returns a Repository for ref, "host[:port]/name[:tag|@digest]". The
// tag or digest, if any, is available as Reference() for callers that took
// the whole reference from a user. Docker Hub's familiar forms are
// accepted ("alpine:3", "docker.io/library/alpine"). No network I/O
// happens here; Options.Hosts (host configuration files) is read here.
func New(ref string, opts Options) (*Repository, error) {
	parsed, err := orasreg.ParseReference(normalizeReference(ref))
	if err != nil {
		return nil, fmt.Errorf("parse reference %q: %w", ref, err)
	}
	cred := opts.Credential
	if cred == nil {
		// Read once here so that a broken config fails early; requests
		// read it again whenever a registry asks for credentials.
		if _, err := dockerStore(opts.DockerConfig); err != nil {
			return nil, err
		}
		cred = DockerCredentials(opts.DockerConfig)
	}
	hosts, ns, err := registryHosts(parsed.Registry, opts)
	if err != nil {
		return nil, fmt.Errorf("hosts of %s: %w", parsed.Registry, err)
	}
	r := &Repository{name: parsed.Registry + "/" + parsed.Repository, ref: parsed.Reference}
	for i, h := range hosts {
		retry := opts.Retry
		if i < len(hosts)-1 {
			// A mirror is not retried: the next host is its retry.
			retry = RetryPolicy{MaxRetries: -1}
		}
		r.endpoints = append(r.endpoints, newEndpoint(h, parsed.Repository, ns, retry, opts, cred))
	}
	return r, nil
}

// DockerCredentials returns credentials from a Docker config file
// (configPath; empty: $DOCKER_CONFIG/config.json or ~/.docker/config.json)
// and the credential helpers it names, read again on every call. oras-go's
// auth client calls it only when a registry answers 401 (a first request,
// or a cached token or password that stopped working) and then retries the
// request once, so a rotated password or a rewritten config file is picked
// up at the next 401, without a restart.
func DockerCredentials(configPath string) auth.CredentialFunc {
	return func(ctx context.Context, hostport string) (auth.Credential, error) {
		store, err := dockerStore(configPath)
		if err != nil {
			return auth.EmptyCredential, err
		}
		return credentials.Credential(store)(ctx, hostport)
	}
}

// dockerStore opens the Docker config (see DockerCredentials).
func dockerStore(configPath string) (credentials.Store, error) {
	var store credentials.Store
	var err error
	if configPath != "" {
		store, err = credentials.NewStore(configPath, credentials.StoreOptions{})
	} else {
		store, err = credentials.NewStoreFromDocker(credentials.StoreOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("load registry credentials: %w", err)
	}
	return store, nil
}

// ChainCredentials asks each source in turn (nil ones are skipped) and
// returns the first credential that is not empty; an error stops the
// chain.
func ChainCredentials(sources ...auth.CredentialFunc) auth.CredentialFunc {
	return func(ctx context.Context, hostport string) (auth.Credential, error) {
		for _, src := range sources {
			if src == nil {
				continue
			}
			c, err := src(ctx, hostport)
			if err != nil {
				return auth.EmptyCredential, err
			}
			if c != auth.EmptyCredential {
				return c, nil
			}
		}
		return auth.EmptyCredential, nil
	}
}

// normalizeReference expands Docker Hub's short forms the way docker does:
// a first component without '.' or ':' (and not "localhost") is a Docker
// Hub repository, one-component Hub names live under "library/", and the
// Hub's API host is registry-1.docker.io. Other references are returned
// unchanged.
func normalizeReference(ref string) string {
	first, rest, ok := strings.Cut(ref, "/")
	if !ok || (!strings.ContainsAny(first, ".:") && first != "localhost") {
		first, rest = "docker.io", ref
	}
	if first != "docker.io" && first != "index.docker.io" && first != dockerHubHost {
		return ref
	}
	name := rest
	if i := strings.IndexAny(name, ":@"); i >= 0 {
		name = name[:i]
	}
	if name != "" && !strings.Contains(name, "/") {
		rest = "library/" + rest
	}
	return dockerHubHost + "/" + rest
}

// dockerHubHost serves Docker Hub's registry API.
const dockerHubHost = "registry-1.docker.io"

// Name returns "host/repository".
func (r *Repository) Name() string { return r.name }

// Reference returns the tag or digest part of the reference given to New
// ("" if there was none).
func (r *Repository) Reference() string { return r.ref }

// at formats name:tag or name@digest for error messages.
func (r *Repository) at(reference string) string {
	if reference == "" {
		return r.name
	}
	if _, err := digest.Parse(reference); err == nil {
		return r.name + "@" + reference
	}
	return r.name + ":" + reference
}

// wrap adds the operation and reference to err and classifies it.
func (r *Repository) wrap(op, reference string, err error) error {
	if err == nil {
		return nil
	}
	var kind error
	var er *errcode.ErrorResponse
	switch {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrUnauthorized), errors.Is(err, ErrForbidden):
	case errors.Is(err, errdef.ErrNotFound):
		kind = ErrNotFound
	case errors.Is(err, auth.ErrBasicCredentialNotFound):
		kind = ErrUnauthorized
	case errors.As(err, &er):
		switch er.StatusCode {
		case http.StatusNotFound:
			kind = ErrNotFound
		case http.StatusUnauthorized:
			kind = ErrUnauthorized
		case http.StatusForbidden:
			kind = ErrForbidden
		}
	}
	if kind != nil {
		return fmt.Errorf("%s %s: %w: %w", op, r.at(reference), kind, err)
	}
	return fmt.Errorf("%s %s: %w", op, r.at(reference), err)
}

// Resolve returns the manifest descriptor a tag or digest points to
// (HEAD request: media type, digest, size).
func (r *Repository) Resolve(ctx context.Context, reference string) (ocispec.Descriptor, error) {
	var d ocispec.Descriptor
	err := r.each(ctx, resolveCap(reference), func(e *endpoint) error {
		var err error
		d, err = e.repo.Resolve(ctx, reference)
		return r.wrap("resolve", reference, err)
	})
	return d, err
}

// FetchManifest fetches a manifest (or image index) by tag or digest and
// returns its bytes, verified against the digest (the requested one, or the
// registry's Docker-Content-Digest for a tag), and its descriptor.
func (r *Repository) FetchManifest(ctx context.Context, reference string) ([]byte, ocispec.Descriptor, error) {
	var b []byte
	var desc ocispec.Descriptor
	err := r.each(ctx, resolveCap(reference), func(e *endpoint) error {
		d, rc, err := e.repo.Manifests().FetchReference(ctx, reference)
		if err != nil {
			return r.wrap("fetch manifest", reference, err)
		}
		defer rc.Close()
		if b, err = content.ReadAll(rc, d); err != nil {
			return r.wrap("fetch manifest", reference, err)
		}
		desc = d
		return nil
	})
	if err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	return b, desc, nil
}

// FetchManifestDescriptor fetches the manifest a descriptor names and
// verifies it against the descriptor's digest and size.
func (r *Repository) FetchManifestDescriptor(ctx context.Context, desc ocispec.Descriptor) ([]byte, error) {
	var b []byte
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		rc, err := e.repo.Manifests().Fetch(ctx, desc)
		if err != nil {
			return r.wrap("fetch manifest", desc.Digest.String(), err)
		}
		defer rc.Close()
		b, err = content.ReadAll(rc, desc)
		return r.wrap("fetch manifest", desc.Digest.String(), err)
	})
	return b, err
}

// FetchBlob streams a blob. The reader returns an error instead of io.EOF
// if the content does not match desc (size or digest), so a caller that
// reads to EOF has verified bytes. Broken connections are resumed with
// Range requests within the retry policy.
func (r *Repository) FetchBlob(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("fetch blob %s: bad digest %q: %w", r.name, desc.Digest, err)
	}
	var rc io.ReadCloser
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		var err error
		rc, err = e.repo.Blobs().Fetch(ctx, desc)
		return r.wrap("fetch blob", desc.Digest.String(), err)
	})
	if err != nil {
		return nil, err
	}
	return &verifyReader{rc: rc, desc: desc, h: desc.Digest.Algorithm().Hash(), what: r.at(desc.Digest.String())}, nil
}

// verifyReader checks size and digest of a stream at EOF.
type verifyReader struct {
	rc   io.ReadCloser
	desc ocispec.Descriptor
	h    interface {
		io.Writer
		Sum([]byte) []byte
	}
	n    int64
	what string
	err  error
}

func (v *verifyReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.rc.Read(p)
	v.n += int64(n)
	v.h.Write(p[:n])
	if v.n > v.desc.Size {
		v.err = fmt.Errorf("blob %s: more than %d bytes", v.what, v.desc.Size)
		return n, v.err
	}
	if err == io.EOF {
		if v.n != v.desc.Size {
			v.err = fmt.Errorf("blob %s: got %d bytes, want %d: %w", v.what, v.n, v.desc.Size, io.ErrUnexpectedEOF)
			return n, v.err
		}
		if got := digest.NewDigestFromBytes(v.desc.Digest.Algorithm(), v.h.Sum(nil)); got != v.desc.Digest {
			v.err = fmt.Errorf("blob %s: content digest is %s", v.what, got)
			return n, v.err
		}
		v.err = io.EOF
	} else if err != nil {
		v.err = fmt.Errorf("read blob %s: %w", v.what, err)
		return n, v.err
	}
	return n, err
}

func (v *verifyReader) Close() error { return v.rc.Close() }

// Exists reports whether a blob or manifest (chosen by desc.MediaType)
// exists in the repository.
func (r *Repository) Exists(ctx context.Context, desc ocispec.Descriptor) (bool, error) {
	var ok bool
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		var err error
		ok, err = e.repo.Exists(ctx, desc)
		return r.wrap("check", desc.Digest.String(), err)
	})
	return ok, err
}

// PushBlob uploads a blob unless it already exists. The content must match
// desc (oras-go verifies size and digest). Passing a *bytes.Reader (or
// another body net/http can rewind) lets transient failures be retried.
func (r *Repository) PushBlob(ctx context.Context, desc ocispec.Descriptor, rd io.Reader) error {
	e, err := r.pushEndpoint()
	if err != nil {
		return err
	}
	ok, err := e.repo.Blobs().Exists(ctx, desc)
	if err != nil {
		return r.wrap("push blob", desc.Digest.String(), err)
	}
	if ok {
		return nil
	}
	err = e.repo.Blobs().Push(ctx, desc, rd)
	if errors.Is(err, errdef.ErrAlreadyExists) {
		return nil
	}
	return r.wrap("push blob", desc.Digest.String(), err)
}

// PushBlobBytes is PushBlob for content held in memory; it builds the
// descriptor (digest, size, mediaType) and returns it.
func (r *Repository) PushBlobBytes(ctx context.Context, mediaType string, b []byte) (ocispec.Descriptor, error) {
	desc := content.NewDescriptorFromBytes(mediaType, b)
	return desc, r.PushBlob(ctx, desc, bytes.NewReader(b))
}

// MountBlob makes a blob of repository fromRepo (a name on the same
// registry, without host) available in this repository through a
// cross-repository mount, falling back to fetching and pushing it when the
// registry does not mount. It does nothing if the blob already exists.
func (r *Repository) MountBlob(ctx context.Context, desc ocispec.Descriptor, fromRepo string) error {
	e, err := r.pushEndpoint()
	if err != nil {
		return err
	}
	if ok, err := e.repo.Blobs().Exists(ctx, desc); err == nil && ok {
		return nil
	}
	m, ok := e.repo.Blobs().(orasreg.Mounter)
	if !ok {
		return fmt.Errorf("mount blob %s: oras blob store cannot mount", r.at(desc.Digest.String()))
	}
	err = m.Mount(ctx, desc, fromRepo, nil)
	return r.wrap("mount blob (from "+fromRepo+")", desc.Digest.String(), err)
}

// PushManifest uploads a manifest (or index) whose descriptor is desc, and
// tags it when tag is not empty. If the manifest has a subject (a SOCI v1
// index), it becomes discoverable through Referrers: registries with the
// OCI referrers API index it themselves; otherwise the `sha256-<hex>`
// fallback tag index of the subject is updated (read-modify-write, so
// concurrent pushers can lose each other's entries, as the distribution
// spec warns).
func (r *Repository) PushManifest(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error {
	reference := tag
	if reference == "" {
		reference = desc.Digest.String()
	}
	if desc.Size != int64(len(b)) || digest.FromBytes(b) != desc.Digest {
		return fmt.Errorf("push manifest %s: content does not match descriptor %s (%d bytes)", r.at(reference), desc.Digest, desc.Size)
	}
	e, err := r.pushEndpoint()
	if err != nil {
		return err
	}
	if hasSubject(b) {
		// Learn whether the registry has the referrers API before pushing:
		// oras-go otherwise decides from the OCI-Subject response header,
		// which some referrers-capable registries do not send, and would
		// maintain a redundant fallback tag.
		// A failed probe leaves the capability unknown, which oras-go
		// handles; only cancellation stops the push here.
		if err := probeReferrers(ctx, e); err != nil && ctx.Err() != nil {
			return r.wrap("push manifest", reference, ctx.Err())
		}
	}
	if tag != "" {
		err = e.repo.Manifests().PushReference(ctx, desc, bytes.NewReader(b), tag)
	} else {
		err = e.repo.Manifests().Push(ctx, desc, bytes.NewReader(b))
	}
	return r.wrap("push manifest", reference, err)
}

// Tag points tag at an existing manifest.
func (r *Repository) Tag(ctx context.Context, desc ocispec.Descriptor, tag string) error {
	e, err := r.pushEndpoint()
	if err != nil {
		return err
	}
	return r.wrap("tag", tag, e.repo.Tag(ctx, desc, tag))
}

// Referrers lists the manifests whose subject is the given manifest,
// filtered by artifactType (empty: all). It uses the OCI referrers API
// where the registry has it and the `sha256-<hex>` fallback tag otherwise.
// For manifests without a top-level artifactType (such as SOCI indexes),
// registries and the fallback index report the config media type.
func (r *Repository) Referrers(ctx context.Context, subject ocispec.Descriptor, artifactType string) ([]ocispec.Descriptor, error) {
	var out []ocispec.Descriptor
	err := r.each(ctx, docker.HostCapabilityReferrers, func(e *endpoint) error {
		out = nil
		err := e.repo.Referrers(ctx, subject, artifactType, func(refs []ocispec.Descriptor) error {
			out = append(out, refs...)
			return nil
		})
		return r.wrap("list referrers of", subject.Digest.String(), err)
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ReferrersAPI reports whether the registry serves the OCI referrers API
// (probing it once if still unknown).
func (r *Repository) ReferrersAPI(ctx context.Context) (bool, error) {
	e, err := r.pushEndpoint()
	if err != nil {
		return false, err
	}
	if err := probeReferrers(ctx, e); err != nil {
		return false, r.wrap("probe referrers API", "", err)
	}
	// After probing, SetReferrersCapability(true) fails only if the state
	// is "unsupported".
	return e.repo.SetReferrersCapability(true) == nil, nil
}

// probeReferrers settles the referrers capability of the repository on
// host e by listing the referrers of an arbitrary digest, which is what
// oras-go does when the capability is unknown.
func probeReferrers(ctx context.Context, e *endpoint) error {
	probe := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromString("spanpull referrers probe"), Size: 1}
	err := e.repo.Referrers(ctx, probe, "", func([]ocispec.Descriptor) error { return nil })
	if err != nil && (errors.Is(err, errdef.ErrNotFound) || isNameUnknown(err)) {
		// A repository that does not exist yet tells nothing; let the push
		// decide from the response header.
		return nil
	}
	return err
}

func isNameUnknown(err error) bool {
	var er *errcode.ErrorResponse
	if !errors.As(err, &er) {
		return false
	}
	for _, e := range er.Errors {
		if e.Code == errcode.ErrorCodeNameUnknown {
			return true
		}
	}
	return false
}

// hasSubject reports whether manifest JSON carries a subject.
func hasSubject(b []byte) bool {
	var m struct {
		Subject *json.RawMessage `json:"subject"`
	}
	return json.Unmarshal(b, &m) == nil && m.Subject != nil
}

// isPermanent reports transport errors that retrying cannot fix: TLS
// verification failures and protocol mismatches (an https client talking
// to a plain-HTTP registry, or the reverse).
func isPermanent(err error) bool {
	var cv *tls.CertificateVerificationError
	var rh tls.RecordHeaderError
	return errors.As(err, &cv) || errors.As(err, &rh) ||
		strings.Contains(err.Error(), "server gave HTTP response to HTTPS client")
}
