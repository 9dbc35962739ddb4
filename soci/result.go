package soci

import (
	"errors"
	"fmt"
	"strings"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
)

// LayerStatus is what happened to one layer of a run.
type LayerStatus string

// Layer statuses. The strings are stable: callers print them.
const (
	// LayerIndexed: the layer was streamed and its zTOC built and pushed.
	LayerIndexed LayerStatus = "indexed"
	// LayerReused: a zTOC for the layer and span size was already in the
	// destination registry or the local cache; the layer was not read.
	LayerReused LayerStatus = "reused"
	// LayerSkipped: the layer is not worth or not able to be indexed
	// (LayerResult.Reason says which); the runtime pulls it whole.
	LayerSkipped LayerStatus = "skipped"
	// LayerFailed: indexing the layer failed (LayerResult.Err), and with it
	// the platforms that have the layer.
	LayerFailed LayerStatus = "failed"
)

// ErrLayerTooSmall is the Reason of a layer skipped because it has fewer
// compressed bytes than Options.MinLayerSize.
var ErrLayerTooSmall = errors.New("layer is below the minimum layer size")

// UnsupportedLayerError is the Reason of a layer skipped because of its
// media type: the zTOC format describes only gzip and plain tar layers.
type UnsupportedLayerError struct {
	MediaType string
}

// Error says why the layer cannot be indexed, as the indexer prints it.
func (e *UnsupportedLayerError) Error() string {
	if strings.HasSuffix(e.MediaType, "+zstd") || strings.HasSuffix(e.MediaType, ".zstd") {
		return "zstd layers cannot be indexed (the zTOC format has no zstd checkpoints)"
	}
	return fmt.Sprintf("unsupported layer media type %q", e.MediaType)
}

// LayerResult reports what happened to one layer.
type LayerResult struct {
	// Layer is the layer's descriptor in the image manifest.
	Layer  ocispec.Descriptor
	Status LayerStatus
	// Reason says why a layer was skipped: ErrLayerTooSmall or an
	// *UnsupportedLayerError.
	Reason error
	// FromCache says that a reused zTOC came from the local cache (it was
	// pushed to the registry from there); otherwise it was in the registry.
	FromCache bool
	// Ztoc is the layer's zTOC blob (digest and size) when it was indexed
	// or reused.
	Ztoc ocispec.Descriptor
	// Pack is the zTOC's pack, pushed or found in the registry (zero Head
	// digest with Options.NoPack).
	Pack index.Pack
	// Spans is the number of spans of a zTOC built in this run.
	Spans int
	// Duration is how long streaming and building the zTOC took.
	Duration time.Duration
	// CacheErr says that a built zTOC could not be written to the local
	// cache; the layer is indexed all the same.
	CacheErr error
	// Err says why the layer failed.
	Err error
}

// PlatformResult reports one image manifest of the image.
type PlatformResult struct {
	// Platform is the manifest's platform: from the image index, or from
	// the image config of a single-manifest image (zero when the config
	// names none).
	Platform ocispec.Platform
	// Manifest is the image manifest's descriptor.
	Manifest ocispec.Descriptor
	// Index is the SOCI index pushed for the manifest (zero Digest when
	// none was).
	Index ocispec.Descriptor
	// Layers are the manifest's layers in order (nil when the manifest
	// could not be read).
	Layers []LayerResult
	// Err says why the platform failed; the other platforms are indexed
	// all the same.
	Err error
}

// Result is what Create or Convert did, platform by platform.
type Result struct {
	Platforms []PlatformResult
	// Image is the SOCI-enabled image index Convert pushed and tagged (zero
	// Digest for Create, or when no platform could be converted).
	Image ocispec.Descriptor
}

// Failed returns the platforms that failed.
func (r *Result) Failed() []PlatformResult {
	var out []PlatformResult
	for _, p := range r.Platforms {
		if p.Err != nil {
			out = append(out, p)
		}
	}
	return out
}
