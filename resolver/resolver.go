// Package resolver is the snapshotter's SOCI resolver: it mounts the layers
// of SOCI-indexed images lazily. It finds an image's SOCI index, loads each
// layer's TOC (from the index's compact pack head when there is one, else
// from the zTOC) and serves the layer as a read-only FUSE filesystem whose
// reads fetch only the spans they cover (package span), behind the
// recorded prefetch and ahead of a background fill that completes the
// layer. Layers of an indexed image that have no zTOC are downloaded,
// verified and unpacked locally, so that containerd never has to fetch
// anything for the image.
//
// Trust: see verify.go. A lazy layer is bound to the image, not to its
// index: files are checked against their tar headers on first read, the
// whole layer against the layer digest and diff_id once it is local, and a
// layer whose index lies is quarantined and repaired.
//
// Restarts: see holder.go. Every lazy layer's FUSE connection is kept in an
// fd holder process; a new daemon takes the live connections over, so a
// crash, kill or upgrade of the daemon is invisible to the containers
// reading lazy layers (a read waits until the new daemon answers it).
package resolver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/record"
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
	// CacheMaxBytes bounds what lazy layers keep on disk: the span cache
	// (compressed span bytes, LRU across layers) and the local files of
	// verified layers. Zero means span.DefaultMaxBytes: 10% of the
	// filesystem holding Root.
	CacheMaxBytes int64
	// MemoryBytes bounds the inflated (and unwritable compressed) spans
	// kept in memory across layers (span.MemoryCache). Zero means
	// span.DefaultMemoryBytes; negative: none.
	MemoryBytes int64
	// IndexSources lists the kinds of SOCI index the resolver trusts to
	// find an image's index: "v2" (named by the image itself, so pinned by
	// the image digest) and "v1" (referrers, which anyone who can push to
	// the repository can add). Nil means DefaultIndexSources.
	IndexSources []string
	// PrefetchName names the recorded prefetch to use when an index has
	// several (one per workload); empty: the first.
	PrefetchName string
	// Records, when set, records the files and spans each layer's start
	// reads (package record), for recorded prefetch.
	Records *record.Store
	// Holder keeps FUSE connections across daemon restarts.
	Holder HolderConfig
	// NoEntryBinding turns off the check of each file's tar header against
	// its TOC entry before its first read (a diagnostic setting: it trades
	// the per-file binding for a few header bytes per file).
	NoEntryBinding bool
	// NoLocalFiles keeps verified layers from being unpacked to local
	// trees, for passthrough reads and for overlayfs to stack in place of
	// the FUSE mount (a diagnostic setting).
	NoLocalFiles bool
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

// DefaultIndexSources trusts both kinds of SOCI index (v2 first): see
// Config.IndexSources and the README's trust model.
var DefaultIndexSources = []string{"v2", "v1"}

// DefaultConfig returns the defaults of every tunable field of Config (Root
// is left empty): what the daemon runs with when its config file sets
// nothing.
func DefaultConfig() Config {
	return Config{
		FetchTimeout:  span.DefaultFetchTimeout,
		FillDelay:     DefaultFillDelay,
		FillRate:      DefaultFillRate,
		IndexCacheTTL: DefaultIndexCacheTTL,
		IndexSources:  DefaultIndexSources,
	}
}

// memoryBytes is the size of the memory cache c asks for.
func (c Config) memoryBytes() int64 {
	switch {
	case c.MemoryBytes == 0:
		return span.DefaultMemoryBytes
	case c.MemoryBytes < 0:
		return 0
	}
	return c.MemoryBytes
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
	// files are the local copies of verified layers' files; maxBytes the
	// budget they share with spans.
	trees    *localTrees
	maxBytes int64
	holder   *holder

	mu sync.Mutex
	// images is keyed by repository and image manifest digest: the same
	// manifest pushed to two repositories may be indexed in only one of
	// them, and an index's blobs are fetched from the image's repository.
	images map[string]*imageIndex
	repos  map[string]cachedRepo
}

var _ snapshotter.RemoteLayerResolver = (*Resolver)(nil)

// New opens the resolver's state under cfg.Root and connects to its fd
// holder (starting one if needed), whose connections Mount takes over.
func New(cfg Config) (*Resolver, error) {
	if cfg.IndexCacheTTL <= 0 {
		cfg.IndexCacheTTL = DefaultIndexCacheTTL
	}
	if cfg.FillRate == 0 {
		cfg.FillRate = DefaultFillRate
	}
	if cfg.IndexSources == nil {
		cfg.IndexSources = DefaultIndexSources
	}
	for _, src := range cfg.IndexSources {
		if src != "v1" && src != "v2" {
			return nil, fmt.Errorf("index source %q: want v1 or v2", src)
		}
	}
	logger := cfg.Logger
	if logger == nil {
		logger = logrus.NewEntry(logrus.New())
	}
	r := &Resolver{cfg: cfg, log: logger, images: make(map[string]*imageIndex), repos: make(map[string]cachedRepo)}
	if err := r.open(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// open opens the resolver's stores and caches.
func (r *Resolver) open() (err error) {
	if r.meta, err = store.OpenMetaStore(filepath.Join(r.cfg.Root, "meta")); err != nil {
		return err
	}
	if r.maxBytes = r.cfg.CacheMaxBytes; r.maxBytes == 0 {
		if r.maxBytes, err = span.DefaultMaxBytes(r.cfg.Root); err != nil {
			return err
		}
	}
	if r.spans, err = span.OpenCache(filepath.Join(r.cfg.Root, "cache"), span.CacheOptions{MaxBytes: r.maxBytes}); err != nil {
		return err
	}
	if r.trees, err = openLocalTrees(filepath.Join(r.cfg.Root, "trees")); err != nil {
		return err
	}
	r.cfg.Metrics.localTrees(r.trees.total())
	r.sched = span.NewScheduler(span.SchedulerOptions{FillDelay: r.cfg.FillDelay, FillRate: max(r.cfg.FillRate, 0)})
	r.mem = span.NewMemoryCache(r.cfg.memoryBytes())
	if r.holder, err = openHolder(context.Background(), r.cfg.Holder, r.log); err != nil {
		// Lazy layers still work; only a restart of the daemon would
		// break the containers reading them.
		r.log.WithError(err).Error("spanpull: no fd holder: lazy layers will not survive a restart of the daemon")
	}
	return nil
}

// Close releases the resolver's state. Mounts must be released first.
func (r *Resolver) Close() error {
	var errs []error
	if r.holder != nil {
		errs = append(errs, r.holder.close())
	}
	if r.meta != nil {
		errs = append(errs, r.meta.Close())
	}
	if r.trees != nil {
		r.trees.close()
	}
	return errors.Join(errs...)
}

// Restored implements snapshotter's restore hook: every remembered layer
// has been mounted again, so the connections left in the fd holder that
// no snapshot claimed belong to layers removed meanwhile: they are ended.
func (r *Resolver) Restored(ctx context.Context) error {
	return r.holder.dropLeft(ctx)
}

// errNoIndex says that an image has no SOCI index at all.
var errNoIndex = errors.New("no SOCI index (no index label, no v2 annotation, no v1 referrer)")

// imageIndex is what the resolver learned about one image: its manifest,
// the diff_ids of its config and its SOCI index, or why it has none.
type imageIndex struct {
	once sync.Once
	// expires is when the entry must be looked up again (zero while the
	// lookup runs); guarded by Resolver.mu.
	expires  time.Time
	digest   digest.Digest // of the image manifest
	manifest *ocispec.Manifest
	diffIDs  []digest.Digest // nil when the config could not be read
	index    *index.Index
	indexDig digest.Digest
	err      error
}

// diffID returns the diff_id of the manifest's layer i, or "".
func (img *imageIndex) diffID(i int) digest.Digest {
	if i < len(img.diffIDs) && len(img.diffIDs) == len(img.manifest.Layers) {
		return img.diffIDs[i]
	}
	return ""
}

// Mount implements snapshotter.RemoteLayerResolver. A snapshot mounted
// before (the daemon restarted) is served again from what was stored, and
// takes over the live FUSE connection of the previous daemon when the fd
// holder has it.
func (r *Resolver) Mount(ctx context.Context, dir string, labels map[string]string) (snapshotter.RemoteMount, error) {
	layerDigest, err := layerDigestOf(labels, snapshotters.TargetLayerDigestLabel)
	if err != nil {
		return nil, err
	}
	if rec, err := r.meta.GetLayer(ctx, dir); err == nil && rec.LayerDigest == layerDigest {
		return r.remount(ctx, rec)
	}
	if names, err := readDirNames(dir); err == nil && len(names) > 0 {
		// Unpacked locally before a restart: the files are all there.
		return localMount{dir}, nil
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
	i := slices.IndexFunc(img.manifest.Layers, func(d ocispec.Descriptor) bool { return d.Digest == layerDigest })
	if i < 0 {
		r.cfg.Metrics.fallback("layer_not_in_manifest")
		return nil, fmt.Errorf("layer %s is not in the manifest of %s: %w", layerDigest, imageRef, snapshotter.ErrNoRemote)
	}
	desc := img.manifest.Layers[i]
	if _, ok := img.index.Ztoc(layerDigest); !ok {
		if err := r.unpack(ctx, dir, imageRef, desc); err != nil {
			r.cfg.Metrics.fallback("unpack_failed")
			return nil, err
		}
		r.cfg.Metrics.layerMounted("unpacked")
		return localMount{dir}, nil
	}
	l, err := r.mountNew(ctx, dir, imageRef, img, i)
	if err != nil {
		return nil, err
	}
	r.cfg.Metrics.layerMounted("lazy")
	return l, nil
}

// mountNew mounts layer i of img lazily on dir: it loads the layer's TOC,
// records the layer, mounts it and starts its prefetch and fill.
func (r *Resolver) mountNew(ctx context.Context, dir, imageRef string, img *imageIndex, i int) (*lazyLayer, error) {
	desc := img.manifest.Layers[i]
	repo, err := r.repo(imageRef)
	if err != nil {
		return nil, err
	}
	li, err := soci.LoadLayer(ctx, repo, img.index, desc, maxZtocSize)
	if li != nil {
		r.cfg.Metrics.fetched("ztoc", li.Fetched)
	}
	if err != nil {
		r.cfg.Metrics.fallback("ztoc_unavailable")
		return nil, err
	}
	if li.PackErr != nil {
		r.log.WithError(li.PackErr).WithField("layer", desc.Digest).Warn("spanpull: the layer's pack is unusable; mounting it from its zTOC")
	}
	rec := store.RemoteLayer{Key: dir, LayerDigest: desc.Digest, ZtocDigest: li.ZtocDigest, IndexDigest: img.indexDig,
		ImageRef: imageRef, Mountpoint: dir, HeadDigest: li.Head.Digest, LayerSize: desc.Size, LayerMediaType: desc.MediaType,
		ManifestDigest: img.digest, DiffID: img.diffID(i), Verification: stateUnverified}
	if _, w, ok := img.index.Pack(desc.Digest); ok && li.Head.Digest != "" {
		rec.WindowsDigest, rec.WindowsSize = w.Digest, w.Size
	}
	if err := r.meta.PutLayer(ctx, rec, li.Blob); err != nil {
		return nil, err
	}
	l, err := r.openLazy(rec, li, repo)
	if err == nil {
		err = l.serve(ctx, dir)
		if err != nil {
			l.closeParts()
		}
	}
	if err != nil {
		r.meta.DeleteLayer(context.WithoutCancel(ctx), dir)
		r.cfg.Metrics.fallback("mount_failed")
		return nil, err
	}
	l.recorder = r.cfg.Records.Layer(record.Image{Reference: imageRef, Manifest: img.digest},
		record.LayerInfo{Digest: desc.Digest, Spans: li.Ztoc.NumSpans()})
	r.cfg.Metrics.layerState(dir, stateUnverified)
	l.start(r.prefetch(ctx, repo, img, desc.Digest, li.Ztoc.NumSpans()))
	return l, nil
}

// remount serves the layer of record rec again, after a restart: from the
// stored zTOC or pack head, taking over the live FUSE connection when the
// fd holder has it.
func (r *Resolver) remount(ctx context.Context, rec store.RemoteLayer) (*lazyLayer, error) {
	blob, err := r.meta.Ztoc(ctx, rec.BlobDigest())
	if err != nil {
		return nil, err
	}
	li, err := soci.DecodeLayerIndex(blob, rec.HeadDigest != "")
	if err != nil {
		return nil, fmt.Errorf("stored index of layer %s: %w", rec.LayerDigest, err)
	}
	repo, err := r.repo(rec.ImageRef)
	if err != nil {
		return nil, err
	}
	if li.Pack != nil {
		li.Windows = soci.NewWindows(repo, ocispec.Descriptor{MediaType: index.MediaTypePackWindows, Digest: rec.WindowsDigest, Size: rec.WindowsSize}, li.Pack)
	}
	if rec.LayerSize == 0 { // a record of an older version
		rec.LayerSize = li.Ztoc.CompressedArchiveSize
	}
	l, err := r.openLazy(rec, li, repo)
	if err != nil {
		return nil, err
	}
	if err := l.serve(ctx, rec.Key); err != nil {
		l.closeParts()
		return nil, err
	}
	r.cfg.Metrics.layerState(rec.Key, l.state.Load().(string))
	l.start(nil)
	return l, nil
}

// prefetch returns the spans of layer that img's index says to prefetch
// (the recorded prefetch named Config.PrefetchName, else the first), in
// priority order, or none. A prefetch artifact that cannot be used is
// logged and ignored: the layer is still lazy.
func (r *Resolver) prefetch(ctx context.Context, repo *registry.Repository, img *imageIndex, layer digest.Digest, numSpans int) []ztoc.SpanID {
	name, ok := index.SelectPrefetch(img.index, r.cfg.PrefetchName)
	if !ok {
		return nil
	}
	if _, ok := img.index.Prefetch(name, layer); !ok {
		return nil
	}
	ids, err := soci.LoadPrefetch(ctx, repo, img.index, layer, name, numSpans)
	if err != nil {
		r.log.WithError(err).WithField("layer", layer).Warn("spanpull: recorded prefetch ignored")
		return nil
	}
	r.log.WithFields(log.Fields{"layer": layer, "name": name, "spans": len(ids)}).Debug("spanpull: recorded prefetch")
	return ids
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
		img.digest = md
		img.manifest, img.index, img.indexDig, img.err = r.findIndex(ctx, ref, md, labels[LabelIndexDigest])
		if img.err == nil {
			img.diffIDs = r.diffIDs(ctx, ref, img.manifest)
		}
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
	opts := soci.DiscoverOptions{SkipV2: !slices.Contains(r.cfg.IndexSources, "v2"), SkipReferrers: !slices.Contains(r.cfg.IndexSources, "v1")}
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

// maxConfigSize bounds an image config fetched for its diff_ids.
const maxConfigSize = 4 << 20

// diffIDs returns the diff_ids of the image config of m, against which its
// lazy layers are verified once complete; nil (with a warning) when the
// config cannot be read: the layers are then served, but never verified.
func (r *Resolver) diffIDs(ctx context.Context, ref string, m *ocispec.Manifest) []digest.Digest {
	repo, err := r.repo(ref)
	if err == nil {
		var b []byte
		if b, err = repo.FetchBlobBytes(ctx, m.Config, maxConfigSize); err == nil {
			var cfg ocispec.Image
			if err = json.Unmarshal(b, &cfg); err == nil && len(cfg.RootFS.DiffIDs) == len(m.Layers) {
				return cfg.RootFS.DiffIDs
			}
			if err == nil {
				err = fmt.Errorf("config lists %d diff_ids for %d layers", len(cfg.RootFS.DiffIDs), len(m.Layers))
			}
		}
	}
	r.log.WithError(err).WithField("image", ref).Warn("spanpull: image config unreadable: its lazy layers cannot be verified")
	return nil
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

// localMount is a layer unpacked into the snapshot directory dir: nothing
// is mounted, nothing needs releasing. It was verified while unpacked.
type localMount struct{ dir string }

func (localMount) Release() error   { return nil }
func (localMount) Remove() error    { return nil }
func (localMount) LocalDir() string { return "" }
func (localMount) Labels() map[string]string {
	return map[string]string{snapshotter.LabelMode: "unpacked", snapshotter.LabelVerified: stateVerified}
}

// Usage is the disk space of the unpacked files, as containerd's overlayfs
// snapshotter measures it.
func (m localMount) Usage() snapshots.Usage {
	u, err := fs.DiskUsage(context.Background(), m.dir)
	if err != nil {
		return snapshots.Usage{}
	}
	return snapshots.Usage{Inodes: u.Inodes, Size: u.Size}
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
