package span

import (
	"fmt"
	"time"
)

// Class is what a fetch is for. A Scheduler orders fetches by class:
// demand first, then prefetch, then fill.
type Class int

const (
	// ClassDemand fetches serve reads that a container is waiting on.
	ClassDemand Class = iota
	// ClassPrefetch fetches bring spans that a container is expected to
	// read soon (Layer.Prefetch).
	ClassPrefetch
	// ClassFill fetches complete a layer in the background (Layer.Fill).
	ClassFill
)

// String returns the class's name as metrics label it.
func (c Class) String() string {
	switch c {
	case ClassDemand:
		return "demand"
	case ClassPrefetch:
		return "prefetch"
	case ClassFill:
		return "fill"
	}
	return fmt.Sprintf("class(%d)", int(c))
}

// Metrics observes the read path of a Layer. All methods must be safe for
// concurrent use.
type Metrics interface {
	// SpanFetched is called after compressed bytes of a span (all of it,
	// or with chunk marks a part of it) arrived and were verified.
	SpanFetched(class Class, compressedBytes int64, d time.Duration)
	// FetchFailed is called when a fetch failed for good (after its
	// retries). A failed prefetch or fill is no error for anyone: the
	// span is left to demand reads.
	FetchFailed(class Class)
	// SpanVerifyFailed is called when fetched bytes did not match their
	// span or chunk digest.
	SpanVerifyFailed()
	// SpanCacheHit is called when a read was served from cached bytes
	// (inflated in memory, or compressed on disk) without a fetch.
	SpanCacheHit()
	// CacheWriteFailed is called when verified bytes could not be written
	// to the disk cache (full disk, over budget). They are served from
	// memory; the write is tried again later.
	CacheWriteFailed()
	// PrefetchUsed is called once per prefetched span: with hit true when
	// a read needed it, with hit false when the layer was closed before
	// any read did (wasted bandwidth).
	PrefetchUsed(hit bool)
	// Read is called after every ReadAt.
	Read(n int, d time.Duration, err error)
}

type noMetrics struct{}

func (noMetrics) SpanFetched(Class, int64, time.Duration) {}
func (noMetrics) FetchFailed(Class)                       {}
func (noMetrics) SpanVerifyFailed()                       {}
func (noMetrics) SpanCacheHit()                           {}
func (noMetrics) CacheWriteFailed()                       {}
func (noMetrics) PrefetchUsed(bool)                       {}
func (noMetrics) Read(int, time.Duration, error)          {}
