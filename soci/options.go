package soci

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Defaults of the indexing options; callers show them as flag defaults.
const (
	// DefaultSpanSize is the uncompressed distance between two checkpoints
	// of a zTOC: the most a lazy read inflates to reach a byte. 1 MiB, not
	// SOCI's 4 MiB (ztoc.DefaultSpanSize), chosen from measurements
	// (BENCHMARKS.md, "Span size"): a read fetches its span from the
	// checkpoint, so smaller spans fetch fewer bytes before a container is
	// ready, and our snapshotter fetches only the windows of the spans it
	// reads (the pack), so their larger number costs the start nothing.
	// The zTOC that upstream SOCI reads grows with the windows it holds.
	DefaultSpanSize = 1 << 20
	// DefaultMinLayerSize is SOCI's threshold: layers with fewer compressed
	// bytes are cheaper to pull whole than to mount lazily.
	DefaultMinLayerSize = 10 << 20
)

// DefaultConcurrency returns how many layers are indexed at once by
// default: one per CPU, since building a zTOC inflates the whole layer.
func DefaultConcurrency() int { return runtime.NumCPU() }

// ZtocCache is a local store of zTOCs built before, keyed by layer digest
// and span size, and of their packs, keyed by zTOC digest
// (store.ZtocCache is one). It lets a machine that indexes the same base
// layer for many images, or re-runs CI, skip streaming it.
type ZtocCache interface {
	// Get returns the cached zTOC bytes and their digest; ok is false on a
	// miss.
	Get(layer digest.Digest, spanSize int64) (b []byte, d digest.Digest, ok bool, err error)
	// Put records b as the zTOC of layer at spanSize.
	Put(layer digest.Digest, spanSize int64, b []byte) error
	// GetPack returns the cached pack of the zTOC with digest ztoc; ok is
	// false on a miss.
	GetPack(ztoc digest.Digest) (head, windows []byte, ok bool, err error)
	// PutPack records the pack of the zTOC with digest ztoc.
	PutPack(ztoc digest.Digest, head, windows []byte) error
}

// Observer is told how a run progresses, so that a caller can draw a
// progress line or print each layer as it finishes. Its methods are called
// concurrently from the goroutines that index layers and must not block.
type Observer interface {
	// LayerStarted says that layer begins streaming through the zTOC
	// builder. The function it returns (nil for none) is called with the
	// compressed bytes read so far, as they are read.
	LayerStarted(layer ocispec.Descriptor) (progress func(read int64))
	// LayerStopped says that the layer's stream ended, built or not.
	LayerStopped(layer ocispec.Descriptor)
	// LayerDone reports what happened to a layer as soon as it is known,
	// once per layer and run (a layer shared by platforms is reported once).
	LayerDone(r LayerResult)
}

// Options tune Create and Convert. The zero value indexes every layer of
// this machine's platform at DefaultSpanSize with DefaultConcurrency, and
// reuses only the zTOCs already in the registry.
type Options struct {
	// SpanSize is the uncompressed distance between checkpoints; zero means
	// DefaultSpanSize. zTOCs are reused only at the same span size.
	SpanSize int64
	// MinLayerSize skips layers with fewer compressed bytes (SOCI uses
	// DefaultMinLayerSize); zero indexes every layer.
	MinLayerSize int64
	// Platforms select the image manifests of an image index to index; none
	// means this machine's platform. A single-manifest image must match one
	// of them when some are given.
	Platforms []ocispec.Platform
	// AllPlatforms indexes every image manifest of an image index.
	AllPlatforms bool
	// Concurrency is how many layers are indexed at once; zero or less means
	// DefaultConcurrency().
	Concurrency int
	// Force rebuilds zTOCs that the registry or the cache already has.
	Force bool
	// NoPack publishes exactly SOCI's artifacts. By default every zTOC an
	// index lists gets its pack (ztoc.MarshalPack), two more blobs listed
	// after SOCI's, which let spanpull's snapshotter mount a layer without
	// fetching its whole zTOC. A pack made from a reused zTOC (from the
	// registry or the cache) whose pack is nowhere to be found has no chunk
	// table, which needs the layer (readers then fetch whole spans); Force
	// streams the layer again.
	NoPack bool
	// Cache, when set, is read before building a zTOC and written after.
	Cache ZtocCache
	// Observer, when set, is told about every layer.
	Observer Observer
}

// withDefaults returns o with zero fields set to their defaults, or an
// error for values that make no sense.
func (o Options) withDefaults() (Options, error) {
	if o.SpanSize < 0 {
		return o, fmt.Errorf("span size must be positive, got %d", o.SpanSize)
	}
	if o.MinLayerSize < 0 {
		return o, errors.New("minimum layer size must not be negative")
	}
	if o.SpanSize == 0 {
		o.SpanSize = DefaultSpanSize
	}
	if o.Concurrency <= 0 {
		o.Concurrency = DefaultConcurrency()
	}
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	return o, nil
}

// nopObserver is the Observer of a run nobody watches.
type nopObserver struct{}

func (nopObserver) LayerStarted(ocispec.Descriptor) func(int64) { return nil }
func (nopObserver) LayerStopped(ocispec.Descriptor)             {}
func (nopObserver) LayerDone(LayerResult)                       {}
