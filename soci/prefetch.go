package soci

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/ztoc"
)

// ErrNoPrefetch says that an index has no prefetch artifact of a name for a
// layer.
var ErrNoPrefetch = errors.New("no prefetch artifact")

// LoadPrefetch fetches the prefetch artifact named name of image layer
// from the SOCI index ix of repo, verified against its descriptor, and
// returns the spans to fetch in priority order (index.PrefetchArtifact.
// SpanIDs). numSpans is the layer's span count (from its zTOC): a range
// past it is an error. A corrupt or foreign artifact is an error, never a
// partial list: a runtime logs it and prefetches nothing for the layer.
func LoadPrefetch(ctx context.Context, repo *registry.Repository, ix *index.Index, layer digest.Digest, name string, numSpans int) ([]ztoc.SpanID, error) {
	p, ok := ix.Prefetch(name, layer)
	if !ok {
		return nil, fmt.Errorf("layer %s: %w named %q", layer, ErrNoPrefetch, name)
	}
	b, err := repo.FetchBlobBytes(ctx, p.Blob, index.MaxPrefetchSize)
	if err != nil {
		return nil, fmt.Errorf("layer %s: fetch prefetch artifact %s: %w", layer, p.Blob.Digest, err)
	}
	a, err := index.ParsePrefetch(b)
	if err != nil {
		return nil, fmt.Errorf("layer %s: prefetch artifact %s: %w", layer, p.Blob.Digest, err)
	}
	ids, err := a.SpanIDs(numSpans)
	if err != nil {
		return nil, fmt.Errorf("layer %s: prefetch artifact %s: %w", layer, p.Blob.Digest, err)
	}
	return ids, nil
}

// LayerSpans is the prefetch order of one layer: span IDs, first to fetch
// first (a layer of an access record).
type LayerSpans struct {
	Layer digest.Digest
	Spans []ztoc.SpanID
}

// AttachOptions say what Attach attaches.
type AttachOptions struct {
	// Name is the workload the prefetch artifacts are for
	// (index.ValidatePrefetchName). Artifacts of that name already in the
	// index are replaced; those of other names are kept.
	Name string
	// Layers are the spans to prefetch per layer, from an access record.
	// Exactly one of Layers and Files is set.
	Layers []LayerSpans
	// Files are paths to prefetch in order, SOCI's hand-list style: each
	// is resolved against the top-most indexed layer whose TOC holds the
	// cleaned path (a whiteout or an opaque directory above hides it), and
	// becomes the spans of its tar header and data.
	Files []string
	// Manifest is the digest of the image manifest the record was made
	// with; empty: not checked. Attach refuses a record of another
	// manifest unless that manifest (in the same repository) has the same
	// layers, or Force is set.
	Manifest digest.Digest
	// Force attaches a record of another image manifest, as long as every
	// layer it names is in the image.
	Force bool
	// Platform selects the image manifest of an image index when Manifest
	// is not one of its manifests; nil: this machine's platform.
	Platform *ocispec.Platform
}

// AttachedPrefetch is one prefetch artifact Attach pushed.
type AttachedPrefetch struct {
	Layer digest.Digest
	// Blob is the artifact's descriptor.
	Blob ocispec.Descriptor
	// Ranges is the number of span ranges, Spans the spans they cover.
	Ranges, Spans int
}

// AttachResult is what Attach pushed.
type AttachResult struct {
	// Manifest is the image manifest the artifacts serve: for a v2 index,
	// the newly rewritten one.
	Manifest ocispec.Descriptor
	// Version is the version of the index that got the artifacts.
	Version index.Version
	// Previous is the index the new one replaces (its Size is zero when
	// an annotation named it); Index is the new one.
	Previous, Index ocispec.Descriptor
	// Image is, for v2, the new SOCI-enabled image index (tagged with the
	// repository reference's tag when it has one); zero for v1.
	Image ocispec.Descriptor
	// Prefetches are the artifacts pushed, in layer order.
	Prefetches []AttachedPrefetch
	// Notes are things the user should know (a record of another manifest
	// with the same layers was accepted, ...).
	Notes []string
}

// attachTarget is the image manifest Attach works on, and its index.
type attachTarget struct {
	root     Image          // what repo's reference names
	rootIdx  *ocispec.Index // root as an image index; nil for a manifest
	desc     ocispec.Descriptor
	raw      []byte
	manifest *ocispec.Manifest
	found    Found
	ix       *index.Index
}

// Attach publishes prefetch artifacts (SOCI-FORMAT.md §1.10) for the image
// repo's reference names ("latest" when it has none), one per layer with
// spans, in a new version of the SOCI index a runtime would mount for the
// image (FindIndex). The zTOCs and packs of that index are reused as they
// are: no layer is read.
//
//   - v1: a new index v1 with the same subject, which names the old one as
//     superseded (index.AnnotationSupersedes), so discovery passes over
//     the old one; the image is unchanged.
//   - v2: a new index v2, the image manifest rewritten to name it, and a
//     new SOCI-enabled image index, pushed under the reference's tag: the
//     image digest changes.
//
// Attach refuses a record whose spans lie beyond their layer's span count,
// that names a layer the image does not have or has no zTOC for, that
// prefetches nothing, or that was made with another image manifest (see
// AttachOptions.Manifest).
func Attach(ctx context.Context, repo *registry.Repository, opts AttachOptions) (*AttachResult, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	t, err := resolveAttachTarget(ctx, repo, opts)
	if err != nil {
		return nil, err
	}
	res := &AttachResult{Version: t.ix.Version, Previous: t.found.Index, Manifest: t.desc}
	if err := checkRecordManifest(ctx, repo, t, opts, res); err != nil {
		return nil, err
	}
	orders, err := prefetchOrders(ctx, repo, t, opts)
	if err != nil {
		return nil, err
	}
	prefetches, err := pushPrefetches(ctx, repo, opts.Name, orders, res)
	if err != nil {
		return nil, err
	}
	built, err := pushAttachedIndex(ctx, repo, t, opts.Name, prefetches)
	if err != nil {
		return nil, err
	}
	res.Index = built.Descriptor
	if t.ix.Version == index.V2 {
		if err := pushAttachedImage(ctx, repo, t, built, res); err != nil {
			return nil, err
		}
	}
	return res, nil
}

func (o AttachOptions) check() error {
	if err := index.ValidatePrefetchName(o.Name); err != nil {
		return err
	}
	switch {
	case len(o.Layers) > 0 && len(o.Files) > 0:
		return errors.New("attach prefetch: spans from a record and a file list exclude each other")
	case len(o.Files) > 0:
		return nil
	}
	for _, l := range o.Layers {
		if len(l.Spans) > 0 {
			return nil
		}
	}
	return errors.New("attach prefetch: the record is empty: no span of any layer was read")
}

// resolveAttachTarget fetches the image, selects its image manifest and
// finds the SOCI index a runtime would mount for it.
func resolveAttachTarget(ctx context.Context, repo *registry.Repository, o AttachOptions) (*attachTarget, error) {
	root, err := fetchImage(ctx, repo)
	if err != nil {
		return nil, err
	}
	t := &attachTarget{root: root}
	switch {
	case isImageIndex(root.Descriptor.MediaType):
		if t.rootIdx, err = index.ParseImageIndex(root.Bytes); err != nil {
			return nil, err
		}
		if t.desc, err = selectAttachManifest(t.rootIdx, o); err != nil {
			return nil, fmt.Errorf("%s: %w", reference(repo), err)
		}
		if t.raw, err = repo.FetchManifestDescriptor(ctx, t.desc); err != nil {
			return nil, err
		}
	case isImageManifest(root.Descriptor.MediaType):
		t.desc, t.raw = root.Descriptor, root.Bytes
	default:
		return nil, fmt.Errorf("%s is a %q, not an image", reference(repo), root.Descriptor.MediaType)
	}
	if t.manifest, err = index.ParseImageManifest(t.raw); err != nil {
		return nil, err
	}
	found, ix, err := FindIndex(ctx, repo, Image{Descriptor: t.desc, Bytes: t.raw}, DiscoverOptions{})
	if errors.Is(err, ErrNoIndex) {
		return nil, fmt.Errorf("%s has no SOCI index: index it first (indexer create or convert)", reference(repo))
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", reference(repo), err)
	}
	t.found, t.ix = found, ix
	if ix.Version == index.V2 && t.rootIdx == nil {
		return nil, fmt.Errorf("%s: a SOCI index v2 lives in a SOCI-enabled image index; name that image, not its manifest", reference(repo))
	}
	return t, nil
}

// selectAttachManifest picks the image manifest of an image index: the
// record's when listed, else the one of the requested platform.
func selectAttachManifest(idx *ocispec.Index, o AttachOptions) (ocispec.Descriptor, error) {
	want := platforms.DefaultSpec()
	if o.Platform != nil {
		want = *o.Platform
	}
	match := platforms.Only(want)
	var byPlatform []ocispec.Descriptor
	for _, d := range idx.Manifests {
		if d.ArtifactType != "" || !isImageManifest(d.MediaType) {
			continue
		}
		if o.Manifest != "" && d.Digest == o.Manifest {
			return d, nil
		}
		if d.Platform != nil && match.Match(*d.Platform) {
			byPlatform = append(byPlatform, d)
		}
	}
	if len(byPlatform) == 0 {
		return ocispec.Descriptor{}, fmt.Errorf("no image manifest for platform %s", platforms.Format(want))
	}
	return byPlatform[0], nil
}

// checkRecordManifest refuses a record made with another image manifest,
// unless that manifest has the same layers or Force is set.
func checkRecordManifest(ctx context.Context, repo *registry.Repository, t *attachTarget, o AttachOptions, res *AttachResult) error {
	if o.Manifest == "" || o.Manifest == t.desc.Digest {
		return nil
	}
	if b, _, err := repo.FetchManifest(ctx, o.Manifest.String()); err == nil {
		if m, err := index.ParseImageManifest(b); err == nil && sameLayers(m.Layers, t.manifest.Layers) {
			res.Notes = append(res.Notes, fmt.Sprintf("the record was made with image manifest %s, which has the same layers as %s", o.Manifest, t.desc.Digest))
			return nil
		}
	}
	if o.Force {
		res.Notes = append(res.Notes, fmt.Sprintf("the record was made with image manifest %s, not %s: attached anyway (force)", o.Manifest, t.desc.Digest))
		return nil
	}
	return fmt.Errorf("the record is for image manifest %s, %s is manifest %s with other layers (force attaches it anyway when the layers it names are in the image)",
		o.Manifest, reference(repo), t.desc.Digest)
}

func sameLayers(a, b []ocispec.Descriptor) bool {
	return slices.EqualFunc(a, b, func(x, y ocispec.Descriptor) bool { return x.Digest == y.Digest })
}

// loadedLayer is an indexed layer of the target with its zTOC.
type loadedLayer struct {
	desc  ocispec.Descriptor
	z     *ztoc.Ztoc
	spans []ztoc.Span
}

// loadLayer loads the zTOC (from its pack head when there is one) of an
// image layer of t, which must be indexed.
func loadLayer(ctx context.Context, repo *registry.Repository, t *attachTarget, layer digest.Digest) (*loadedLayer, error) {
	i := slices.IndexFunc(t.manifest.Layers, func(d ocispec.Descriptor) bool { return d.Digest == layer })
	if i < 0 {
		return nil, fmt.Errorf("layer %s is not a layer of image manifest %s", layer, t.desc.Digest)
	}
	if _, ok := t.ix.Ztoc(layer); !ok {
		return nil, fmt.Errorf("layer %s has no zTOC in SOCI index %s: it is not pulled lazily, nothing to prefetch", layer, t.found.Index.Digest)
	}
	li, err := LoadLayer(ctx, repo, t.ix, t.manifest.Layers[i], maxReusedZtocSize)
	if err != nil {
		return nil, err
	}
	z, err := li.FullZtoc()
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", layer, err)
	}
	spans, err := z.Spans()
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", layer, err)
	}
	return &loadedLayer{desc: t.manifest.Layers[i], z: z, spans: spans}, nil
}

// prefetchOrders returns the span order of every layer with spans to
// prefetch, in image layer order, from a record or a file list.
func prefetchOrders(ctx context.Context, repo *registry.Repository, t *attachTarget, o AttachOptions) ([]LayerSpans, error) {
	var orders map[digest.Digest][]ztoc.SpanID
	var err error
	if len(o.Files) > 0 {
		orders, err = fileOrders(ctx, repo, t, o.Files)
	} else {
		orders, err = recordOrders(ctx, repo, t, o.Layers)
	}
	if err != nil {
		return nil, err
	}
	var out []LayerSpans
	for _, l := range t.manifest.Layers {
		if ids := orders[l.Digest]; len(ids) > 0 {
			out = append(out, LayerSpans{Layer: l.Digest, Spans: ids})
		}
	}
	return out, nil
}

// recordOrders checks the recorded layers against the image and their
// zTOCs.
func recordOrders(ctx context.Context, repo *registry.Repository, t *attachTarget, layers []LayerSpans) (map[digest.Digest][]ztoc.SpanID, error) {
	out := make(map[digest.Digest][]ztoc.SpanID, len(layers))
	for _, ls := range layers {
		if len(ls.Spans) == 0 {
			continue
		}
		if _, dup := out[ls.Layer]; dup {
			return nil, fmt.Errorf("layer %s is listed twice", ls.Layer)
		}
		l, err := loadLayer(ctx, repo, t, ls.Layer)
		if err != nil {
			return nil, err
		}
		for _, id := range ls.Spans {
			if id < 0 || int(id) >= len(l.spans) {
				return nil, fmt.Errorf("layer %s: span %d is beyond the layer's %d spans (a record of another index or span size?)", ls.Layer, id, len(l.spans))
			}
		}
		out[ls.Layer] = ls.Spans
	}
	return out, nil
}

// pushPrefetches builds and pushes one prefetch artifact per layer.
func pushPrefetches(ctx context.Context, repo *registry.Repository, name string, orders []LayerSpans, res *AttachResult) ([]index.Prefetch, error) {
	var out []index.Prefetch
	for _, ls := range orders {
		a, err := index.NewPrefetchArtifact(ls.Spans)
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", ls.Layer, err)
		}
		b, err := a.Marshal()
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", ls.Layer, err)
		}
		d, err := repo.PushBlobBytes(ctx, index.MediaTypePrefetch, b)
		if err != nil {
			return nil, err
		}
		out = append(out, index.Prefetch{LayerDigest: ls.Layer, Name: name, Blob: d})
		res.Prefetches = append(res.Prefetches, AttachedPrefetch{Layer: ls.Layer, Blob: d, Ranges: len(a.PrefetchSpans), Spans: a.Spans()})
	}
	return out, nil
}

// pushAttachedIndex pushes the index of t with the prefetch artifacts of
// name replaced by added: the same zTOCs, packs and other artifacts.
func pushAttachedIndex(ctx context.Context, repo *registry.Repository, t *attachTarget, name string, added []index.Prefetch) (*index.Built, error) {
	opts := index.BuildOptions{
		Version:    t.ix.Version,
		Subject:    t.ix.Subject(),
		Layers:     t.ix.Layers,
		Packs:      t.ix.Packs,
		BuildTool:  t.ix.BuildTool(),
		Prefetches: mergePrefetches(t.ix, t.manifest.Layers, name, added),
	}
	if opts.Version == index.V1 {
		opts.Supersedes = t.found.Index.Digest
	}
	built, err := index.Build(opts)
	if err != nil {
		return nil, err
	}
	cfg := index.ConfigDescriptor(opts.Version)
	if _, err := repo.PushBlobBytes(ctx, cfg.MediaType, []byte(index.EmptyConfigData)); err != nil {
		return nil, err
	}
	if err := repo.PushManifest(ctx, built.Descriptor, built.Bytes, ""); err != nil {
		return nil, err
	}
	return built, nil
}

// mergePrefetches returns the prefetch artifacts of the new index: one
// name after the other (in the order of the old index, a new name last),
// each in image layer order, name's replaced by added.
func mergePrefetches(ix *index.Index, layers []ocispec.Descriptor, name string, added []index.Prefetch) []index.Prefetch {
	names := ix.PrefetchNames()
	if !slices.Contains(names, name) {
		names = append(names, name)
	}
	pos := func(d digest.Digest) int {
		return slices.IndexFunc(layers, func(l ocispec.Descriptor) bool { return l.Digest == d })
	}
	var out []index.Prefetch
	for _, n := range names {
		var group []index.Prefetch
		if n == name {
			group = slices.Clone(added)
		} else {
			for _, p := range ix.Prefetches {
				if p.Name == n {
					group = append(group, p)
				}
			}
		}
		slices.SortStableFunc(group, func(a, b index.Prefetch) int { return pos(a.LayerDigest) - pos(b.LayerDigest) })
		out = append(out, group...)
	}
	return out
}

// pushAttachedImage pushes, for a v2 index, the image manifest rewritten to
// name the new index and the new SOCI-enabled image index, tagged with the
// repository reference's tag.
func pushAttachedImage(ctx context.Context, repo *registry.Repository, t *attachTarget, built *index.Built, res *AttachResult) error {
	rewritten, desc, err := index.RewriteManifest(t.raw, built.Descriptor.Digest)
	if err != nil {
		return err
	}
	if err := repo.PushManifest(ctx, desc, rewritten, ""); err != nil {
		return err
	}
	out, imgDesc, err := index.ConvertIndex(t.root.Bytes, []index.Converted{{Source: t.desc.Digest, Manifest: desc, Index: &built.Descriptor}})
	if err != nil {
		return err
	}
	tag := referenceOrLatest(repo)
	if strings.Contains(tag, ":") { // a digest names the old image: push untagged
		tag = ""
	}
	if err := repo.PushManifest(ctx, imgDesc, out, tag); err != nil {
		return err
	}
	desc.Platform = t.desc.Platform
	res.Manifest, res.Image = desc, imgDesc
	return nil
}
