package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/store"
	"github.com/spanpull/spanpull/ztoc"
)

// Media types of manifests and layers the indexer understands.
const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// layerCompression classifies a layer media type. An empty kind comes with
// the reason the layer cannot be indexed.
func layerCompression(mediaType string) (ztoc.Compression, string) {
	switch mediaType {
	case ocispec.MediaTypeImageLayerGzip, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
		"application/vnd.docker.image.rootfs.diff.tar.gzip", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
		return ztoc.Gzip, ""
	case ocispec.MediaTypeImageLayer, "application/vnd.oci.image.layer.nondistributable.v1.tar",
		"application/vnd.docker.image.rootfs.diff.tar":
		return ztoc.Uncompressed, ""
	}
	if strings.HasSuffix(mediaType, "+zstd") || strings.HasSuffix(mediaType, ".zstd") {
		return 0, "zstd layers cannot be indexed (the zTOC format has no zstd checkpoints)"
	}
	return 0, fmt.Sprintf("unsupported layer media type %q", mediaType)
}

// indexOptions are the flags shared by create and convert.
type indexOptions struct {
	SpanSize     int64
	MinLayerSize int64
	Platforms    []string
	AllPlatforms bool
	PlainHTTP    bool
	Insecure     bool
	Timeout      time.Duration
	Concurrency  int
	Force        bool
	Quiet        bool
	JSON         bool
	CacheDir     string
	NoCache      bool
}

// layerResult reports what happened to one layer.
type layerResult struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	// Status is "indexed", "reused" or "skipped".
	Status   string        `json:"status"`
	Reason   string        `json:"reason,omitempty"`
	Ztoc     digest.Digest `json:"ztoc,omitempty"`
	ZtocSize int64         `json:"ztocSize,omitempty"`
	Spans    int           `json:"spans,omitempty"`
	Seconds  float64       `json:"seconds,omitempty"`
}

// platformResult reports one platform manifest of the image.
type platformResult struct {
	Platform string         `json:"platform"`
	Manifest digest.Digest  `json:"manifest"`
	Index    digest.Digest  `json:"index,omitempty"`
	Layers   []*layerResult `json:"layers"`
	Error    string         `json:"error,omitempty"`
	raw      []byte
	manifest ocispec.Manifest
	desc     ocispec.Descriptor
	platform ocispec.Platform
}

// publisher indexes the layers of image manifests from src and pushes
// zTOCs to dst (src itself for create).
type publisher struct {
	opts     indexOptions
	src, dst *registry.Repository
	cache    *store.ZtocCache
	progress *progress
	log      io.Writer

	// existing maps (layer digest, span size) to zTOCs already in dst.
	existing map[ztocKey]ocispec.Descriptor
	// builds deduplicates layers shared by several platforms.
	mu     sync.Mutex
	builds map[digest.Digest]*layerBuild
}

type ztocKey struct {
	layer    digest.Digest
	spanSize int64
}

type layerBuild struct {
	done   chan struct{}
	result layerResult
	err    error
}

// target is one image manifest selected for indexing.
type target struct {
	desc     ocispec.Descriptor
	platform ocispec.Platform
}

// selectTargets picks the image manifests to index from a resolved image:
// every manifest of an index matching the requested platforms (default:
// this machine's), or the single manifest.
func (p *publisher) selectTargets(ctx context.Context, root ocispec.Descriptor, rootBytes []byte) ([]target, *ocispec.Index, error) {
	switch root.MediaType {
	case ocispec.MediaTypeImageIndex, mediaTypeDockerManifestList:
		idx, err := index.ParseImageIndex(rootBytes)
		if err != nil {
			return nil, nil, err
		}
		var matcher platforms.MatchComparer
		if !p.opts.AllPlatforms {
			specs := []ocispec.Platform{platforms.DefaultSpec()}
			if len(p.opts.Platforms) > 0 {
				specs = specs[:0]
				for _, s := range p.opts.Platforms {
					pl, err := platforms.Parse(s)
					if err != nil {
						return nil, nil, fmt.Errorf("--platform %q: %w", s, err)
					}
					specs = append(specs, pl)
				}
			}
			matcher = platforms.Any(specs...)
		}
		var out []target
		for _, d := range idx.Manifests {
			if d.ArtifactType != "" || d.Platform == nil || (d.MediaType != ocispec.MediaTypeImageManifest && d.MediaType != mediaTypeDockerManifest) {
				continue // SOCI indexes, attestations, nested indexes
			}
			if d.Platform.OS == "unknown" {
				continue
			}
			if matcher != nil && !matcher.Match(*d.Platform) {
				continue
			}
			out = append(out, target{desc: d, platform: *d.Platform})
		}
		if len(out) == 0 {
			return nil, nil, fmt.Errorf("no image manifest for the selected platforms (%s)", platformList(p.opts))
		}
		return out, idx, nil
	case ocispec.MediaTypeImageManifest, mediaTypeDockerManifest:
		m, err := index.ParseImageManifest(rootBytes)
		if err != nil {
			return nil, nil, err
		}
		rc, err := p.src.FetchBlob(ctx, m.Config)
		if err != nil {
			return nil, nil, err
		}
		cfg, err := io.ReadAll(io.LimitReader(rc, 4<<20))
		rc.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("read image config %s: %w", m.Config.Digest, err)
		}
		// A config without a platform is indexable (v1 needs none);
		// convert refuses it, since a v2 index entry must name one.
		pl, err := index.PlatformFromConfig(cfg)
		if err != nil && len(p.opts.Platforms) > 0 {
			return nil, nil, err
		}
		if len(p.opts.Platforms) > 0 && !p.opts.AllPlatforms {
			ok := false
			for _, s := range p.opts.Platforms {
				want, err := platforms.Parse(s)
				if err != nil {
					return nil, nil, fmt.Errorf("--platform %q: %w", s, err)
				}
				ok = ok || platforms.Only(want).Match(pl)
			}
			if !ok {
				return nil, nil, fmt.Errorf("image is %s only, not %s", platforms.Format(pl), platformList(p.opts))
			}
		}
		return []target{{desc: root, platform: pl}}, nil, nil
	}
	return nil, nil, fmt.Errorf("%s is a %q, not an image", root.Digest, root.MediaType)
}

func platformList(o indexOptions) string {
	if len(o.Platforms) == 0 {
		return platforms.Format(platforms.DefaultSpec())
	}
	return strings.Join(o.Platforms, ", ")
}

// indexPlatforms builds (or reuses) the zTOCs of every selected manifest
// and pushes them to dst. Per-platform failures are recorded in the
// results; the returned error is for failures of the whole run.
func (p *publisher) indexPlatforms(ctx context.Context, targets []target) []*platformResult {
	results := make([]*platformResult, len(targets))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(p.opts.Concurrency, 1) + len(targets)) // platform goroutines only wait on layers
	layerSlots := make(chan struct{}, max(p.opts.Concurrency, 1))
	for i, t := range targets {
		r := &platformResult{Platform: platforms.Format(t.platform), Manifest: t.desc.Digest, desc: t.desc, platform: t.platform}
		results[i] = r
		g.Go(func() error {
			if err := p.indexPlatform(gctx, r, layerSlots); err != nil {
				r.Error = err.Error()
			}
			return nil
		})
	}
	_ = g.Wait()
	return results
}

func (p *publisher) indexPlatform(ctx context.Context, r *platformResult, slots chan struct{}) error {
	b, err := p.src.FetchManifestDescriptor(ctx, r.desc)
	if err != nil {
		return err
	}
	m, err := index.ParseImageManifest(b)
	if err != nil {
		return fmt.Errorf("manifest %s: %w", r.desc.Digest, err)
	}
	r.raw, r.manifest = b, *m
	r.Layers = make([]*layerResult, len(m.Layers))
	var wg sync.WaitGroup
	errs := make([]error, len(m.Layers))
	for i, l := range m.Layers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := p.layer(ctx, l, slots)
			r.Layers[i] = res
			errs[i] = err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return nil
}

// layer indexes one layer once per run, however many platforms share it.
func (p *publisher) layer(ctx context.Context, l ocispec.Descriptor, slots chan struct{}) (*layerResult, error) {
	p.mu.Lock()
	b, ok := p.builds[l.Digest]
	if !ok {
		b = &layerBuild{done: make(chan struct{})}
		p.builds[l.Digest] = b
	}
	p.mu.Unlock()
	if !ok {
		b.result, b.err = p.buildLayer(ctx, l, slots)
		close(b.done)
	} else {
		select {
		case <-b.done:
		case <-ctx.Done():
			return &layerResult{Digest: l.Digest, MediaType: l.MediaType, Size: l.Size, Status: "failed"}, ctx.Err()
		}
	}
	res := b.result
	return &res, b.err
}

func (p *publisher) buildLayer(ctx context.Context, l ocispec.Descriptor, slots chan struct{}) (layerResult, error) {
	res := layerResult{Digest: l.Digest, MediaType: l.MediaType, Size: l.Size}
	if _, reason := layerCompression(l.MediaType); reason != "" {
		res.Status, res.Reason = "skipped", reason
		p.report(&res)
		return res, nil
	}
	if l.Size < p.opts.MinLayerSize {
		res.Status, res.Reason = "skipped", fmt.Sprintf("%s is below --min-layer-size %s", humanBytes(l.Size), humanBytes(p.opts.MinLayerSize))
		p.report(&res)
		return res, nil
	}
	if !p.opts.Force {
		if d, ok := p.existing[ztocKey{l.Digest, p.opts.SpanSize}]; ok {
			res.Status, res.Reason, res.Ztoc, res.ZtocSize = "reused", "zTOC already in the registry", d.Digest, d.Size
			p.report(&res)
			return res, nil
		}
		if p.cache != nil {
			b, d, ok, err := p.cache.Get(l.Digest, p.opts.SpanSize)
			if err != nil {
				return res, err
			}
			if ok {
				if _, err := p.dst.PushBlobBytes(ctx, index.MediaTypeZtoc, b); err != nil {
					return res, err
				}
				res.Status, res.Reason, res.Ztoc, res.ZtocSize = "reused", "zTOC from the local cache", d, int64(len(b))
				p.report(&res)
				return res, nil
			}
		}
	}

	select {
	case slots <- struct{}{}:
		defer func() { <-slots }()
	case <-ctx.Done():
		return res, ctx.Err()
	}
	start := time.Now()
	rc, err := p.src.FetchBlob(ctx, l)
	if err != nil {
		return res, fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	defer rc.Close()
	counter := p.progress.start(l.Digest, l.Size)
	z, layerDigest, err := ztoc.Build(ctx, rc, ztoc.BuildOptions{
		SpanSize: p.opts.SpanSize,
		Progress: func(n int64) { counter.Store(n) },
	})
	p.progress.finish(l.Digest)
	if err != nil {
		return res, fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	if layerDigest != l.Digest || z.CompressedArchiveSize != l.Size {
		return res, fmt.Errorf("layer %s: the registry sent %d bytes with digest %s", l.Digest, z.CompressedArchiveSize, layerDigest)
	}
	zb, err := ztoc.Marshal(z)
	if err != nil {
		return res, fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	d, err := p.dst.PushBlobBytes(ctx, index.MediaTypeZtoc, zb)
	if err != nil {
		return res, err
	}
	if p.cache != nil {
		if err := p.cache.Put(l.Digest, p.opts.SpanSize, zb); err != nil {
			p.mu.Lock()
			fmt.Fprintf(p.log, "warning: %v\n", err)
			p.mu.Unlock()
		}
	}
	res.Status, res.Ztoc, res.ZtocSize, res.Spans = "indexed", d.Digest, d.Size, z.NumSpans()
	res.Seconds = time.Since(start).Seconds()
	p.report(&res)
	return res, nil
}

// buildIndex assembles the SOCI index of one platform (layers in image
// order, skipped ones left out) and pushes its config blob first.
func (p *publisher) buildIndex(ctx context.Context, r *platformResult, v index.Version) (*index.Built, error) {
	opts := index.BuildOptions{Version: v}
	if v == index.V1 {
		subject := ocispec.Descriptor{MediaType: r.desc.MediaType, Digest: r.desc.Digest, Size: r.desc.Size}
		opts.Subject = &subject
	}
	for i, res := range r.Layers {
		if res == nil || res.Ztoc == "" {
			continue
		}
		opts.Layers = append(opts.Layers, index.Layer{
			LayerDigest:    res.Digest,
			LayerMediaType: r.manifest.Layers[i].MediaType,
			SpanSize:       p.opts.SpanSize,
			Ztoc:           ocispec.Descriptor{MediaType: index.MediaTypeZtoc, Digest: res.Ztoc, Size: res.ZtocSize},
		})
	}
	built, err := index.Build(opts)
	if err != nil {
		return nil, err
	}
	cfg := index.ConfigDescriptor(v)
	if _, err := p.dst.PushBlobBytes(ctx, cfg.MediaType, []byte("{}")); err != nil {
		return nil, err
	}
	return built, nil
}

// maxScannedTags bounds how many tags of the repository are looked at for
// existing SOCI indexes.
const maxScannedTags = 256

// findExisting collects the zTOCs that SOCI indexes in dst already hold:
// v1 referrers of the given image manifests, v2 entries of imageIndex, and
// the indexes of other images in the repository (their v2 image indexes
// and sha256-<hex> referrers fallback tags), so that a base layer shared
// by many images is indexed once.
func (p *publisher) findExisting(ctx context.Context, manifests []ocispec.Descriptor, imageIndex *ocispec.Index) error {
	if p.existing == nil {
		p.existing = make(map[ztocKey]ocispec.Descriptor)
	}
	var indexes []ocispec.Descriptor
	for _, m := range manifests {
		refs, err := p.dst.Referrers(ctx, ocispec.Descriptor{MediaType: m.MediaType, Digest: m.Digest, Size: m.Size}, index.V1.ArtifactType())
		if errors.Is(err, registry.ErrNotFound) {
			continue // dst does not exist yet: nothing to reuse
		}
		if err != nil {
			return err
		}
		indexes = append(indexes, refs...)
	}
	indexes = append(indexes, v2Entries(imageIndex)...)
	tags, err := p.dst.Tags(ctx, maxScannedTags)
	if err != nil && !errors.Is(err, registry.ErrNotFound) {
		return err
	}
	// Without fallback tags (registries with the referrers API), other
	// images' v1 indexes are found by asking for their referrers.
	api, err := p.dst.ReferrersAPI(ctx)
	if err != nil {
		api = false
	}
	referrersOf := func(ms ...ocispec.Descriptor) {
		for _, m := range ms {
			if m.ArtifactType != "" || (m.MediaType != ocispec.MediaTypeImageManifest && m.MediaType != mediaTypeDockerManifest) {
				continue
			}
			refs, err := p.dst.Referrers(ctx, ocispec.Descriptor{MediaType: m.MediaType, Digest: m.Digest, Size: m.Size}, index.V1.ArtifactType())
			if err == nil {
				indexes = append(indexes, refs...)
			}
		}
	}
	for _, tag := range tags {
		b, d, err := p.dst.FetchManifest(ctx, tag)
		if err != nil {
			continue
		}
		if d.MediaType != ocispec.MediaTypeImageIndex && d.MediaType != mediaTypeDockerManifestList {
			if api {
				referrersOf(d)
			}
			continue
		}
		idx, err := index.ParseImageIndex(b)
		if err != nil {
			continue
		}
		if strings.HasPrefix(tag, "sha256-") {
			// A referrers fallback tag: its manifests are referrers.
			for _, r := range idx.Manifests {
				if r.ArtifactType == index.V1.ArtifactType() {
					indexes = append(indexes, r)
				}
			}
			continue
		}
		indexes = append(indexes, v2Entries(idx)...)
		if api {
			referrersOf(idx.Manifests...)
		}
	}
	for _, d := range indexes {
		p.addExisting(ctx, d)
	}
	return nil
}

// v2Entries returns the SOCI index v2 descriptors of an image index.
func v2Entries(idx *ocispec.Index) []ocispec.Descriptor {
	if idx == nil {
		return nil
	}
	var out []ocispec.Descriptor
	for _, d := range idx.Manifests {
		if d.ArtifactType == index.V2.ArtifactType() {
			out = append(out, d)
		}
	}
	return out
}

// addExisting records the zTOCs of SOCI index d whose blobs are in dst.
func (p *publisher) addExisting(ctx context.Context, d ocispec.Descriptor) {
	b, err := p.dst.FetchManifestDescriptor(ctx, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: d.Digest, Size: d.Size})
	if err != nil {
		return // a dangling referrer is not ours to fix
	}
	ix, err := index.Parse(b)
	if err != nil {
		return
	}
	for _, l := range ix.Manifest.Layers {
		ld, err := digest.Parse(l.Annotations[index.AnnotationImageLayerDigest])
		if err != nil || l.MediaType != index.MediaTypeZtoc {
			continue
		}
		ss, err := strconv.ParseInt(l.Annotations[index.AnnotationSpanSize], 10, 64)
		if err != nil {
			continue // no recorded span size: cannot tell if it matches
		}
		if _, seen := p.existing[ztocKey{ld, ss}]; seen {
			continue
		}
		if ok, err := p.dst.Exists(ctx, l); err == nil && ok {
			p.existing[ztocKey{ld, ss}] = l
		}
	}
}

func (p *publisher) report(r *layerResult) {
	if p.opts.Quiet || p.opts.JSON {
		return
	}
	// Layers finish concurrently and p.log may be any io.Writer (cobra's
	// SetOut): write one line at a time.
	p.mu.Lock()
	defer p.mu.Unlock()
	p.progress.clear()
	switch r.Status {
	case "indexed":
		fmt.Fprintf(p.log, "indexed  %s  %s in %.1fs (%s/s), %d spans -> ztoc %s (%s)\n", short(r.Digest), humanBytes(r.Size), r.Seconds,
			humanBytes(int64(float64(r.Size)/max(r.Seconds, 1e-3))), r.Spans, short(r.Ztoc), humanBytes(r.ZtocSize))
	case "reused":
		fmt.Fprintf(p.log, "reused   %s  %s: %s -> ztoc %s\n", short(r.Digest), humanBytes(r.Size), r.Reason, short(r.Ztoc))
	case "skipped":
		fmt.Fprintf(p.log, "skipped  %s  %s: %s\n", short(r.Digest), humanBytes(r.Size), r.Reason)
	}
}

func short(d digest.Digest) string {
	if len(d) > 19 {
		return string(d[:19])
	}
	return string(d)
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// progress draws one status line of the layers being indexed on a
// terminal; it is a no-op when the output is not a terminal.
type progress struct {
	w      io.Writer
	on     bool
	mu     sync.Mutex
	layers map[digest.Digest]*layerProgress
	stop   chan struct{}
	drawn  bool
}

type layerProgress struct {
	size  int64
	read  *atomic.Int64
	start time.Time
}

func newProgress(w io.Writer, on bool) *progress {
	p := &progress{w: w, on: on, layers: make(map[digest.Digest]*layerProgress), stop: make(chan struct{})}
	if on {
		go p.loop()
	}
	return p
}

func (p *progress) start(d digest.Digest, size int64) *atomic.Int64 {
	c := new(atomic.Int64)
	p.mu.Lock()
	p.layers[d] = &layerProgress{size: size, read: c, start: time.Now()}
	p.mu.Unlock()
	return c
}

func (p *progress) finish(d digest.Digest) {
	p.mu.Lock()
	delete(p.layers, d)
	p.mu.Unlock()
}

func (p *progress) loop() {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			p.draw()
		}
	}
}

func (p *progress) draw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	var parts []string
	for d, l := range p.layers {
		n := l.read.Load()
		rate := float64(n) / max(time.Since(l.start).Seconds(), 1e-3)
		parts = append(parts, fmt.Sprintf("%s %s/%s %s/s", short(d)[7:15], humanBytes(n), humanBytes(l.size), humanBytes(int64(rate))))
	}
	if len(parts) == 0 {
		return
	}
	line := "indexing " + strings.Join(parts, " | ")
	if len(line) > 150 {
		line = line[:150]
	}
	fmt.Fprintf(p.w, "\r\033[K%s", line)
	p.drawn = true
}

// clear erases the status line before a regular line is printed.
func (p *progress) clear() {
	if !p.on {
		return
	}
	p.mu.Lock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
	p.mu.Unlock()
}

func (p *progress) close() {
	if p.on {
		close(p.stop)
		p.clear()
	}
}
