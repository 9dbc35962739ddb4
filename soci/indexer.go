package soci

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/ztoc"
)

// indexer indexes the layers of image manifests from src and pushes their
// zTOCs and SOCI indexes to dst (src itself for Create).
type indexer struct {
	opts     Options
	src, dst *registry.Repository

	// existing maps (layer digest, span size) to zTOCs already in dst.
	existing map[ztocKey]ocispec.Descriptor
	// existingPacks maps zTOC digests to the packs already in dst.
	existingPacks map[digest.Digest]index.Pack
	// slots bounds the layers being streamed at once.
	slots chan struct{}
	// builds deduplicates layers shared by several platforms.
	mu     sync.Mutex
	builds map[digest.Digest]*layerBuild
}

type ztocKey struct {
	layer    digest.Digest
	spanSize int64
}

// layerBuild is one layer's indexing, which every platform that has the
// layer waits for.
type layerBuild struct {
	done   chan struct{}
	result LayerResult
}

// platformJob is one image manifest being indexed: its result and what
// building its SOCI index needs.
type platformJob struct {
	result   PlatformResult
	raw      []byte
	manifest ocispec.Manifest
}

func newIndexer(src, dst *registry.Repository, o Options) (*indexer, error) {
	o, err := o.withDefaults()
	if err != nil {
		return nil, err
	}
	return &indexer{
		opts: o, src: src, dst: dst,
		existing:      make(map[ztocKey]ocispec.Descriptor),
		existingPacks: make(map[digest.Digest]index.Pack),
		slots:         make(chan struct{}, o.Concurrency),
		builds:        make(map[digest.Digest]*layerBuild),
	}, nil
}

// startRun starts a run of Create or Convert: the indexer from src to dst,
// and the image manifests of src's reference to index.
func startRun(ctx context.Context, src, dst *registry.Repository, o Options) (*indexer, *source, error) {
	ix, err := newIndexer(src, dst, o)
	if err != nil {
		return nil, nil, err
	}
	img, err := resolveSource(ctx, src, ix.opts)
	if err != nil {
		return nil, nil, err
	}
	return ix, img, nil
}

// indexPlatforms builds (or reuses) the zTOCs of every target and pushes
// them to dst. A platform's failure is recorded in its result.
func (ix *indexer) indexPlatforms(ctx context.Context, targets []target) []*platformJob {
	jobs := make([]*platformJob, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		j := &platformJob{result: PlatformResult{Platform: t.platform, Manifest: t.desc}}
		jobs[i] = j
		wg.Go(func() { j.result.Err = ix.indexPlatform(ctx, j) })
	}
	wg.Wait()
	return jobs
}

func (ix *indexer) indexPlatform(ctx context.Context, j *platformJob) error {
	desc := j.result.Manifest
	b, err := ix.src.FetchManifestDescriptor(ctx, desc)
	if err != nil {
		return err
	}
	m, err := index.ParseImageManifest(b)
	if err != nil {
		return fmt.Errorf("manifest %s: %w", desc.Digest, err)
	}
	j.raw, j.manifest = b, *m
	j.result.Layers = make([]LayerResult, len(m.Layers))
	var wg sync.WaitGroup // layers wait on ix.slots to be streamed
	for i, l := range m.Layers {
		wg.Go(func() { j.result.Layers[i] = ix.layer(ctx, l) })
	}
	wg.Wait()
	var errs []error
	for _, r := range j.result.Layers {
		errs = append(errs, r.Err)
	}
	return errors.Join(errs...)
}

// layer indexes one layer once per run, however many platforms share it.
func (ix *indexer) layer(ctx context.Context, l ocispec.Descriptor) LayerResult {
	ix.mu.Lock()
	b, ok := ix.builds[l.Digest]
	if !ok {
		b = &layerBuild{done: make(chan struct{})}
		ix.builds[l.Digest] = b
	}
	ix.mu.Unlock()
	if !ok {
		b.result = ix.buildLayer(ctx, l)
		ix.opts.Observer.LayerDone(b.result)
		close(b.done)
		return b.result
	}
	select {
	case <-b.done:
		r := b.result
		r.Layer = l
		return r
	case <-ctx.Done():
		return LayerResult{Layer: l, Status: LayerFailed, Err: ctx.Err()}
	}
}

// buildLayer skips, reuses or builds the zTOC of one layer.
func (ix *indexer) buildLayer(ctx context.Context, l ocispec.Descriptor) LayerResult {
	res := LayerResult{Layer: l}
	if _, err := layerCompression(l.MediaType); err != nil {
		res.Status, res.Reason = LayerSkipped, err
		return res
	}
	if l.Size < ix.opts.MinLayerSize {
		res.Status, res.Reason = LayerSkipped, ErrLayerTooSmall
		return res
	}
	if !ix.opts.Force {
		if ok, err := ix.reuse(ctx, &res); ok || err != nil {
			if err != nil {
				res.Status, res.Err = LayerFailed, err
			}
			return res
		}
	}
	if err := ix.build(ctx, &res); err != nil {
		res.Status, res.Err = LayerFailed, err
	}
	return res
}

// reuse fills res with a zTOC of the layer that dst or the local cache
// already has (pushing a cached one to dst), and reports whether it did.
func (ix *indexer) reuse(ctx context.Context, res *LayerResult) (bool, error) {
	l := res.Layer
	if d, ok := ix.existing[ztocKey{l.Digest, ix.opts.SpanSize}]; ok {
		res.Status, res.Ztoc = LayerReused, ztocDescriptor(d.Digest, d.Size)
		return true, ix.reusePack(ctx, res, nil)
	}
	if ix.opts.Cache == nil {
		return false, nil
	}
	b, d, ok, err := ix.opts.Cache.Get(l.Digest, ix.opts.SpanSize)
	if err != nil || !ok {
		return false, err
	}
	if _, err := ix.dst.PushBlobBytes(ctx, index.MediaTypeZtoc, b); err != nil {
		return false, err
	}
	res.Status, res.FromCache, res.Ztoc = LayerReused, true, ztocDescriptor(d, int64(len(b)))
	return true, ix.reusePack(ctx, res, b)
}

// build streams the layer through the zTOC builder, within the run's
// concurrency, and pushes the zTOC to dst and the local cache.
func (ix *indexer) build(ctx context.Context, res *LayerResult) error {
	l := res.Layer
	select {
	case ix.slots <- struct{}{}:
		defer func() { <-ix.slots }()
	case <-ctx.Done():
		return ctx.Err()
	}
	start := time.Now()
	z, zb, err := ix.buildZtoc(ctx, l)
	if err != nil {
		return fmt.Errorf("layer %s: %w", l.Digest, err)
	}
	d, err := ix.dst.PushBlobBytes(ctx, index.MediaTypeZtoc, zb)
	if err != nil {
		return err
	}
	if ix.opts.Cache != nil {
		res.CacheErr = ix.opts.Cache.Put(l.Digest, ix.opts.SpanSize, zb)
	}
	res.Ztoc = ztocDescriptor(d.Digest, d.Size)
	if !ix.opts.NoPack {
		if err := ix.publishPack(ctx, res, z); err != nil {
			return err
		}
	}
	res.Status, res.Spans = LayerIndexed, z.NumSpans()
	res.Duration = time.Since(start)
	return nil
}

// buildZtoc streams layer l from src through the zTOC builder, checks that
// the registry sent the layer the manifest names, and returns the zTOC
// with its encoding.
func (ix *indexer) buildZtoc(ctx context.Context, l ocispec.Descriptor) (*ztoc.Ztoc, []byte, error) {
	rc, err := ix.src.FetchBlob(ctx, l)
	if err != nil {
		return nil, nil, err
	}
	defer rc.Close()
	progress := ix.opts.Observer.LayerStarted(l)
	if progress == nil {
		progress = func(int64) {}
	}
	z, layerDigest, err := ztoc.Build(ctx, rc, ztoc.BuildOptions{SpanSize: ix.opts.SpanSize, Progress: progress})
	ix.opts.Observer.LayerStopped(l)
	if err != nil {
		return nil, nil, err
	}
	if layerDigest != l.Digest || z.CompressedArchiveSize != l.Size {
		return nil, nil, fmt.Errorf("the registry sent %d bytes with digest %s", z.CompressedArchiveSize, layerDigest)
	}
	zb, err := ztoc.Marshal(z)
	if err != nil {
		return nil, nil, err
	}
	return z, zb, nil
}

func ztocDescriptor(d digest.Digest, size int64) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: index.MediaTypeZtoc, Digest: d, Size: size}
}

// pushIndex assembles the SOCI index of one platform (its zTOCs in image
// layer order, skipped layers left out, then their packs) and pushes its
// config blob and the index itself (untagged; a v1 index becomes a
// referrer of its subject).
func (ix *indexer) pushIndex(ctx context.Context, j *platformJob, v index.Version) (*index.Built, error) {
	opts := index.BuildOptions{Version: v}
	if v == index.V1 {
		m := j.result.Manifest
		opts.Subject = &ocispec.Descriptor{MediaType: m.MediaType, Digest: m.Digest, Size: m.Size}
	}
	for i, res := range j.result.Layers {
		if res.Ztoc.Digest == "" {
			continue
		}
		opts.Layers = append(opts.Layers, index.Layer{
			LayerDigest:    res.Layer.Digest,
			LayerMediaType: j.manifest.Layers[i].MediaType,
			SpanSize:       ix.opts.SpanSize,
			Ztoc:           res.Ztoc,
		})
	}
	opts.Packs = indexPacks(j.result.Layers)
	built, err := index.Build(opts)
	if err != nil {
		return nil, err
	}
	cfg := index.ConfigDescriptor(v)
	if _, err := ix.dst.PushBlobBytes(ctx, cfg.MediaType, []byte(index.EmptyConfigData)); err != nil {
		return nil, err
	}
	if err := ix.dst.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		return nil, err
	}
	return built, nil
}

// results returns the platform results of jobs.
func results(jobs []*platformJob) []PlatformResult {
	out := make([]PlatformResult, len(jobs))
	for i, j := range jobs {
		out[i] = j.result
	}
	return out
}
