// Package resolver is the snapshotter's SOCI resolver: it mounts the layers
// of SOCI-indexed images lazily. It finds an image's SOCI index, fetches the
// zTOC of each layer and serves the layer as a read-only FUSE filesystem
// whose reads fetch only the spans they cover. Layers of an indexed image
// that have no zTOC are downloaded, verified and unpacked locally, so that
// containerd never has to fetch anything for the image.
package resolver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/fusefs"
	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/store"
	"github.com/spanpull/spanpull/ztoc"
)

// LabelIndexDigest names an image's SOCI index explicitly (SOCI's own
// label, which containerd does not define). The other labels the resolver
// reads are containerd's, set by snapshotters.AppendInfoHandlerWrapper:
// snapshotters.TargetRefLabel (the image reference),
// TargetManifestDigestLabel and TargetLayerDigestLabel.
const LabelIndexDigest = "containerd.io/snapshot/remote/soci.index.digest"

// Config tunes a Resolver. DefaultConfig holds the defaults of its tunable
// fields; New applies the zero value rules documented on each field.
type Config struct {
	// Root holds the resolver's state: zTOCs and remote layer records
	// (bbolt) and the span cache.
	Root string
	// PlainHTTP lists registry hosts (host or host:port) spoken to over
	// plain HTTP. Loopback addresses always are.
	PlainHTTP []string
	// Insecure skips TLS verification for every registry whose host
	// configuration does not set TLS itself.
	Insecure bool
	// RegistryConfigPath is containerd's registry host directory
	// (config_path: a hosts.toml per registry naming its mirrors, TLS,
	// headers, plain HTTP); index lookups, zTOC and span fetches go where
	// containerd's own pulls go. Empty: registries are reached directly.
	RegistryConfigPath string
	// ImageCredentials, if set, returns the credentials for the registry
	// requests of one image (criproxy.Store.ImageCredentials: those the
	// kubelet sent with the image's pull). They are tried before the
	// Docker config, and consulted again whenever a registry answers 401.
	ImageCredentials func(imageRef string) auth.CredentialFunc
	// DockerConfig is the Docker config.json (with its credential
	// helpers) registry credentials are read from, again at every 401;
	// empty: $DOCKER_CONFIG/config.json or ~/.docker/config.json.
	DockerConfig string
	// FetchTimeout bounds one span fetch (its range request and body);
	// reads waiting on the span then fail with EIO. The span engine
	// (span.Layer) owns this bound; the registry client under it only
	// abandons and retries connections that stall (registryStallTimeout).
	// Zero means span.DefaultFetchTimeout.
	FetchTimeout time.Duration
	// FillDelay is how long after mounting a layer its background fill
	// starts (zero: at once; the daemon's default is DefaultFillDelay);
	// FillRate bounds the fill in compressed bytes per second per layer
	// (zero: DefaultFillRate). A negative FillRate disables background
	// fill.
	FillDelay time.Duration
	FillRate  int64
	// CacheMaxBytes bounds the span cache (compressed span bytes on disk,
	// LRU across layers). Zero means span.DefaultMaxBytes: 10% of the
	// filesystem holding Root.
	CacheMaxBytes int64
	// IndexCacheTTL is how long an image's index (or its absence) is
	// remembered. Zero means DefaultIndexCacheTTL.
	IndexCacheTTL time.Duration
	// Metrics records the read path; nil means none.
	Metrics *Metrics
	// Logger receives one line per image and every fallback, and is
	// passed to the FUSE filesystems of lazy layers. Nil means a logger of
	// its own on stderr at info level; the daemon passes its one logger.
	Logger *log.Entry
}

// Defaults of Config (see DefaultConfig). They are defined here only: the
// daemon's config file starts from DefaultConfig.
const (
	// DefaultFillDelay lets the reads a container starts with go first,
	// before the background fill competes with them for bandwidth. It is
	// not applied to a zero Config.FillDelay, which means "at once".
	DefaultFillDelay = 5 * time.Second
	// DefaultFillRate bounds the background fill of one layer, in
	// compressed bytes per second.
	DefaultFillRate = 8 << 20
	// DefaultIndexCacheTTL is how long an image's index lookup is reused.
	DefaultIndexCacheTTL = 5 * time.Minute
	// maxZtocSize bounds a zTOC fetched from a registry.
	maxZtocSize = 1 << 30
)

// DefaultConfig returns the defaults of every tunable field of Config (Root
// is left empty): what the daemon runs with when its config file sets
// nothing.
func DefaultConfig() Config {
	return Config{
		FetchTimeout:  span.DefaultFetchTimeout,
		FillDelay:     DefaultFillDelay,
		FillRate:      DefaultFillRate,
		IndexCacheTTL: DefaultIndexCacheTTL,
	}
}

// registryStallTimeout is how long a registry request may make no progress
// (no connection, no response headers, no body bytes) before the registry
// client drops the connection and retries the request
// (registry.Options.StallTimeout). It is not a bound on a span fetch:
// Config.FetchTimeout is. It is a third of the default FetchTimeout, so
// that a span fetch whose connection dies is retried on a new one before
// the fetch's own deadline, rather than both firing together.
const registryStallTimeout = 10 * time.Second

// Resolver implements snapshotter.RemoteLayerResolver for SOCI indexes.
type Resolver struct {
	cfg   Config
	log   *log.Entry
	meta  *store.MetaStore
	spans *span.Cache
	// sched orders the span fetches of every lazy layer; mem holds their
	// recently inflated spans.
	sched *span.Scheduler
	mem   *span.MemoryCache

	mu sync.Mutex
	// images is keyed by repository and image manifest digest: the same
	// manifest pushed to two repositories may be indexed in only one of
	// them, and an index's blobs are fetched from the image's repository.
	images map[string]*imageIndex
	repos  map[string]cachedRepo
}

var _ snapshotter.RemoteLayerResolver = (*Resolver)(nil)

// New opens the resolver's state under cfg.Root.
func New(cfg Config) (*Resolver, error) {
	if cfg.IndexCacheTTL <= 0 {
		cfg.IndexCacheTTL = DefaultIndexCacheTTL
	}
	if cfg.FillRate == 0 {
		cfg.FillRate = DefaultFillRate
	}
	logger := cfg.Logger
	if logger == nil {
		logger = logrus.NewEntry(logrus.New())
	}
	meta, err := store.OpenMetaStore(filepath.Join(cfg.Root, "meta"))
	if err != nil {
		return nil, err
	}
	maxBytes := cfg.CacheMaxBytes
	if maxBytes == 0 {
		if maxBytes, err = span.DefaultMaxBytes(cfg.Root); err != nil {
			meta.Close()
			return nil, err
		}
	}
	spans, err := span.OpenCache(filepath.Join(cfg.Root, "cache"), span.CacheOptions{MaxBytes: maxBytes})
	if err != nil {
		meta.Close()
		return nil, err
	}
	sched := span.NewScheduler(span.SchedulerOptions{FillDelay: cfg.FillDelay, FillRate: max(cfg.FillRate, 0)})
	return &Resolver{cfg: cfg, log: logger, meta: meta, spans: spans, sched: sched, mem: span.NewMemoryCache(span.DefaultMemoryBytes),
		images: make(map[string]*imageIndex), repos: make(map[string]cachedRepo)}, nil
}

// Close releases the resolver's state. Mounts must be released first.
func (r *Resolver) Close() error { return r.meta.Close() }

// errNoIndex says that an image has no SOCI index at all.
var errNoIndex = errors.New("no SOCI index (no index label, no v2 annotation, no v1 referrer)")

// imageIndex is what the resolver learned about one image: its manifest
// and its SOCI index, or why it has none.
type imageIndex struct {
	once sync.Once
	// expires is when the entry must be looked up again (zero while the
	// lookup runs); guarded by Resolver.mu.
	expires  time.Time
	manifest *ocispec.Manifest
	index    *index.Index
	indexDig digest.Digest
	err      error
}

// Mount implements snapshotter.RemoteLayerResolver.
func (r *Resolver) Mount(ctx context.Context, dir string, labels map[string]string) (snapshotter.RemoteMount, error) {
	layerDigest, err := digest.Parse(labels[snapshotters.TargetLayerDigestLabel])
	if err != nil {
		return nil, fmt.Errorf("no valid layer digest label: %w", snapshotter.ErrNoRemote)
	}
	// A snapshot mounted before (daemon restart): its zTOC is on disk, so
	// no registry round trip is needed until a span is missing.
	if rec, err := r.meta.GetLayer(ctx, dir); err == nil && rec.LayerDigest == layerDigest {
		zb, err := r.meta.Ztoc(ctx, rec.ZtocDigest)
		if err != nil {
			return nil, err
		}
		z, err := ztoc.Unmarshal(zb)
		if err != nil {
			return nil, fmt.Errorf("stored zTOC %s: %w", rec.ZtocDigest, err)
		}
		desc := ocispec.Descriptor{Digest: layerDigest, Size: z.CompressedArchiveSize}
		return r.mountLazy(ctx, dir, rec.ImageRef, desc, z)
	}
	if names, err := readDirNames(dir); err == nil && len(names) > 0 {
		// Unpacked locally before a restart: the files are all there.
		return localMount{}, nil
	}

	imageRef := labels[snapshotters.TargetRefLabel]
	if imageRef == "" {
		return nil, fmt.Errorf("no image reference label: %w", snapshotter.ErrNoRemote)
	}
	img := r.image(ctx, imageRef, labels)
	if img.err != nil {
		r.cfg.Metrics.fallback(fallbackReason(img.err))
		return nil, fmt.Errorf("%s: %w: %w", imageRef, img.err, snapshotter.ErrNoRemote)
	}
	var desc ocispec.Descriptor
	for _, l := range img.manifest.Layers {
		if l.Digest == layerDigest {
			desc = l
		}
	}
	if desc.Digest == "" {
		r.cfg.Metrics.fallback("layer_not_in_manifest")
		return nil, fmt.Errorf("layer %s is not in the manifest of %s: %w", layerDigest, imageRef, snapshotter.ErrNoRemote)
	}
	zdesc, ok := img.index.Ztoc(layerDigest)
	if !ok {
		if err := r.unpack(ctx, dir, imageRef, desc); err != nil {
			r.cfg.Metrics.fallback("unpack_failed")
			return nil, err
		}
		r.cfg.Metrics.layerMounted("unpacked")
		return localMount{}, nil
	}
	z, zb, err := r.fetchZtoc(ctx, imageRef, zdesc)
	if err != nil {
		r.cfg.Metrics.fallback("ztoc_unavailable")
		return nil, err
	}
	if z.CompressedArchiveSize != desc.Size {
		r.cfg.Metrics.fallback("ztoc_mismatch")
		return nil, fmt.Errorf("zTOC %s describes a %d-byte layer, layer %s has %d bytes: %w", zdesc.Digest, z.CompressedArchiveSize, layerDigest, desc.Size, snapshotter.ErrNoRemote)
	}
	rec := store.RemoteLayer{Key: dir, LayerDigest: layerDigest, ZtocDigest: zdesc.Digest, IndexDigest: img.indexDig, ImageRef: imageRef, Mountpoint: dir}
	if err := r.meta.PutLayer(ctx, rec, zb); err != nil {
		return nil, err
	}
	m, err := r.mountLazy(ctx, dir, imageRef, desc, z)
	if err != nil {
		r.meta.DeleteLayer(context.WithoutCancel(ctx), dir)
		r.cfg.Metrics.fallback("mount_failed")
		return nil, err
	}
	r.cfg.Metrics.layerMounted("lazy")
	return m, nil
}

// image returns what is known of the image, finding its index once per
// IndexCacheTTL: the explicit index label first, then the v2 annotation
// on the image manifest, then v1 referrers.
func (r *Resolver) image(ctx context.Context, ref string, labels map[string]string) *imageIndex {
	md, err := digest.Parse(labels[snapshotters.TargetManifestDigestLabel])
	if err != nil {
		return &imageIndex{err: errors.New("no image manifest digest label")}
	}
	key := repoName(ref) + "@" + md.String()
	r.mu.Lock()
	img := r.images[key]
	if img == nil || !img.expires.IsZero() && time.Now().After(img.expires) {
		img = &imageIndex{}
		r.images[key] = img
	}
	r.mu.Unlock()
	img.once.Do(func() {
		img.manifest, img.index, img.indexDig, img.err = r.findIndex(ctx, ref, md, labels[LabelIndexDigest])
		// An index, or the certainty that there is none, is kept for the
		// TTL; a failure to find out (registry down, canceled request) is
		// not: the next layer asks again.
		ttl := r.cfg.IndexCacheTTL
		if img.err != nil && !errors.Is(img.err, errNoIndex) {
			ttl = 0
		}
		r.mu.Lock()
		img.expires = time.Now().Add(ttl)
		r.mu.Unlock()
		if img.err != nil {
			r.log.WithFields(log.Fields{"image": ref, "manifest": md, "fallback": fallbackReason(img.err), "reason": img.err}).
				Info("spanpull: image is not lazy: pulled normally")
			return
		}
		n := 0
		for _, l := range img.manifest.Layers {
			if _, ok := img.index.Ztoc(l.Digest); ok {
				n++
			}
		}
		r.log.WithFields(log.Fields{"image": ref, "manifest": md, "index": img.indexDig,
			"index_version": img.index.Version.String(), "lazy_layers": n, "layers": len(img.manifest.Layers)}).
			Info("spanpull: image is lazy")
	})
	return img
}

// findIndex finds the SOCI index of image manifest md through soci's
// discovery: the explicit index label, then the v2 annotation, then the v1
// referrers; the first usable index whose subject matches wins.
func (r *Resolver) findIndex(ctx context.Context, ref string, md digest.Digest, explicit string) (*ocispec.Manifest, *index.Index, digest.Digest, error) {
	repo, err := r.repo(ref)
	if err != nil {
		return nil, nil, "", err
	}
	mb, mdesc, err := repo.FetchManifest(ctx, md.String())
	if err != nil {
		return nil, nil, "", err
	}
	m, err := index.ParseImageManifest(mb)
	if err != nil {
		return nil, nil, "", fmt.Errorf("image manifest %s: %w", md, err)
	}
	var opts soci.DiscoverOptions
	if d, err := digest.Parse(explicit); err == nil {
		opts.Explicit = d
	}
	found, ix, err := soci.FindIndex(ctx, repo, soci.Image{Descriptor: mdesc, Bytes: mb}, opts)
	if errors.Is(err, soci.ErrNoIndex) {
		return nil, nil, "", errNoIndex
	}
	if err != nil {
		return nil, nil, "", err
	}
	return m, ix, found.Index.Digest, nil
}

// repoName returns the repository part (host/path) of an image reference.
func repoName(ref string) string {
	name, _, _ := strings.Cut(ref, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	return name
}

// cachedRepo is the registry client of one image, reused for repoTTL.
type cachedRepo struct {
	repo    *registry.Repository
	created time.Time
}

// repoTTL bounds how long one registry client, with the tokens it cached,
// serves an image's lookups and new mounts: a new one reads the host
// configuration (hosts.toml) again. Mounted layers keep theirs.
const repoTTL = 10 * time.Minute

// repo returns the registry client for image reference ref: its
// repository on the hosts containerd's host configuration names (mirrors
// first), with the image's own credentials (Config.ImageCredentials) tried
// before the Docker config. Clients are per image because credentials are.
func (r *Resolver) repo(ref string) (*registry.Repository, error) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.repos[ref]; ok && now.Sub(c.created) < repoTTL {
		return c.repo, nil
	}
	for k, c := range r.repos {
		if now.Sub(c.created) >= repoTTL {
			delete(r.repos, k)
		}
	}
	var imageCreds auth.CredentialFunc
	if r.cfg.ImageCredentials != nil {
		imageCreds = r.cfg.ImageCredentials(ref)
	}
	repo, err := registry.New(repoName(ref), registry.Options{
		Hosts: registry.ConfigureHosts(context.Background(), registry.HostsOptions{
			ConfigPath: r.cfg.RegistryConfigPath,
			PlainHTTP:  r.plainHTTP,
			Insecure:   r.cfg.Insecure,
		}),
		Credential:   registry.ChainCredentials(imageCreds, registry.DockerCredentials(r.cfg.DockerConfig)),
		StallTimeout: registryStallTimeout,
	})
	if err != nil {
		return nil, err
	}
	r.repos[ref] = cachedRepo{repo: repo, created: now}
	return repo, nil
}

// fallbackReason names why an image is pulled normally, for the fallbacks
// metric and the daemon's log line: "unauthorized" when the registry
// refused the credentials the daemon has for the image (README:
// "Registry credentials"), else "no_index".
func fallbackReason(err error) string {
	if errors.Is(err, registry.ErrUnauthorized) || errors.Is(err, registry.ErrForbidden) {
		return "unauthorized"
	}
	return "no_index"
}

func (r *Resolver) plainHTTP(host string) bool {
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		h = host
	}
	if h == "localhost" {
		return true
	}
	if ip := net.ParseIP(h); ip != nil && ip.IsLoopback() {
		return true
	}
	for _, p := range r.cfg.PlainHTTP {
		if p == host || p == h {
			return true
		}
	}
	return false
}

func (r *Resolver) fetchZtoc(ctx context.Context, ref string, d ocispec.Descriptor) (*ztoc.Ztoc, []byte, error) {
	repo, err := r.repo(ref)
	if err != nil {
		return nil, nil, err
	}
	b, err := repo.FetchBlobBytes(ctx, d, maxZtocSize)
	r.cfg.Metrics.fetched("ztoc", int64(len(b)))
	if err != nil {
		return nil, nil, fmt.Errorf("fetch zTOC %s: %w", d.Digest, err)
	}
	z, err := ztoc.Unmarshal(b)
	if err != nil {
		return nil, nil, fmt.Errorf("zTOC %s: %w", d.Digest, err)
	}
	return z, b, nil
}

// mountLazy serves layer desc from its zTOC on dir and starts its
// background fill.
func (r *Resolver) mountLazy(ctx context.Context, dir, ref string, desc ocispec.Descriptor, z *ztoc.Ztoc) (*lazyMount, error) {
	repo, err := r.repo(ref)
	if err != nil {
		return nil, err
	}
	blob, err := repo.BlobReader(desc)
	if err != nil {
		return nil, err
	}
	var lm span.Metrics
	if r.cfg.Metrics != nil {
		lm = r.cfg.Metrics
	}
	layer, err := span.NewLayer(desc.Digest, z, blob, span.Options{
		Cache:        r.spans,
		Memory:       r.mem,
		Scheduler:    r.sched,
		FetchTimeout: r.cfg.FetchTimeout,
		Metrics:      lm,
	})
	if err != nil {
		return nil, err
	}
	tree, err := fusefs.NewTree(fusefs.Files(z.Files), r.log)
	if err != nil {
		layer.Close()
		return nil, err
	}
	root, err := fusefs.NewRoot(tree, layer, fusefs.Options{Logger: r.log})
	if err != nil {
		layer.Close()
		return nil, err
	}
	srv, err := fusefs.Mount(ctx, dir, root, fusefs.MountOptions{})
	if err != nil {
		layer.Close()
		return nil, err
	}
	fillCtx, stopFill := context.WithCancel(context.Background())
	m := &lazyMount{r: r, dir: dir, layer: desc.Digest, srv: srv, l: layer, stopFill: stopFill, fillDone: make(chan struct{})}
	go func() {
		defer close(m.fillDone)
		if r.cfg.FillRate < 0 {
			return
		}
		// The scheduler holds the fill back (FillDelay, demand reads).
		if err := layer.Fill(fillCtx); err != nil && fillCtx.Err() == nil {
			r.log.WithField("layer", desc.Digest).WithError(err).Warn("spanpull: background fill stopped")
		}
	}()
	return m, nil
}

// lazyMount is a layer served over FUSE from its zTOC.
type lazyMount struct {
	r        *Resolver
	dir      string
	layer    digest.Digest
	srv      *fusefs.Server
	l        *span.Layer
	stopFill context.CancelFunc
	fillDone chan struct{}
	once     sync.Once
	err      error
}

// Unmount stops the layer's background fill and unmounts it, keeping its
// zTOC and cached spans for the next start of the daemon.
func (m *lazyMount) Unmount() error {
	m.once.Do(func() {
		m.stopFill()
		<-m.fillDone
		m.err = m.srv.Unmount()
		m.l.Close()
	})
	return m.err
}

// Remove unmounts the layer and deletes what only it needed: its record,
// its zTOC (unless shared) and its cached spans (unless another snapshot
// serves the same layer).
func (m *lazyMount) Remove() error {
	err := m.Unmount()
	ctx := context.Background()
	if derr := m.r.meta.DeleteLayer(ctx, m.dir); derr != nil && !errors.Is(derr, store.ErrNotFound) {
		err = errors.Join(err, derr)
	}
	layers, lerr := m.r.meta.ListLayers(ctx)
	if lerr != nil {
		return errors.Join(err, lerr)
	}
	for _, l := range layers {
		if l.LayerDigest == m.layer {
			return err
		}
	}
	return errors.Join(err, m.r.spans.RemoveLayer(ctx, m.layer))
}

// Labels implements snapshotter.RemoteMount.
func (m *lazyMount) Labels() map[string]string {
	return map[string]string{snapshotter.LabelMode: "lazy"}
}

// localMount is a layer unpacked into the snapshot directory: nothing is
// mounted, nothing needs releasing.
type localMount struct{}

func (localMount) Unmount() error { return nil }
func (localMount) Remove() error  { return nil }
func (localMount) Labels() map[string]string {
	return map[string]string{snapshotter.LabelMode: "unpacked"}
}

// unpack downloads a layer that has no zTOC, verifies it against its
// digest and applies it to dir (overlayfs whiteouts). On failure dir is
// left empty.
func (r *Resolver) unpack(ctx context.Context, dir, ref string, desc ocispec.Descriptor) (err error) {
	repo, err := r.repo(ref)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			emptyDir(dir)
		}
	}()
	rc, err := repo.FetchBlob(ctx, desc)
	if err != nil {
		return err
	}
	defer rc.Close()
	// The verifying reader fails at EOF on a digest mismatch; reading it to
	// the end after the tar stream makes sure that happens.
	dr, err := compression.DecompressStream(rc)
	if err != nil {
		return fmt.Errorf("unpack layer %s: %w", desc.Digest, err)
	}
	defer dr.Close()
	if _, err := archive.Apply(ctx, dir, dr, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		return fmt.Errorf("unpack layer %s: %w", desc.Digest, err)
	}
	if _, err := io.Copy(io.Discard, dr); err != nil {
		return fmt.Errorf("unpack layer %s: %w", desc.Digest, err)
	}
	if _, err := io.Copy(io.Discard, rc); err != nil {
		return fmt.Errorf("unpack layer %s: %w", desc.Digest, err)
	}
	r.cfg.Metrics.fetched("unpack", desc.Size)
	return nil
}

func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.Readdirnames(0)
}

// emptyDir deletes everything inside dir, keeping dir.
func emptyDir(dir string) {
	names, _ := readDirNames(dir)
	for _, n := range names {
		os.RemoveAll(filepath.Join(dir, n))
	}
}
