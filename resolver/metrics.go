package resolver

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/span"
)

// Metrics are the Prometheus metrics of lazily pulled layers, named
// spanpull_resolver_<name> (namespace snapshotter.MetricsNamespace). A nil
// *Metrics records nothing.
type Metrics struct {
	bytesFetched  *prometheus.CounterVec
	spansFetched  prometheus.Counter
	verifyFailed  prometheus.Counter
	cacheHits     prometheus.Counter
	readLatency   prometheus.Histogram
	readErrors    prometheus.Counter
	layersMounted *prometheus.CounterVec
	fallbacks     *prometheus.CounterVec
	// By fetch class (demand, prefetch, fill).
	classSpans    *prometheus.CounterVec
	classBytes    *prometheus.CounterVec
	classFailures *prometheus.CounterVec
	prefetchUse   *prometheus.CounterVec
	cacheWrites   prometheus.Counter
	// Verification of lazy layers.
	layerStates  *prometheus.GaugeVec
	quarantines  prometheus.Counter
	headerChecks prometheus.Counter
	headerBytes  prometheus.Counter
	treeBytes    prometheus.Gauge

	mu     sync.Mutex
	states map[string]string // by snapshot key: the state each served layer is counted in
}

// metricsSubsystem is the resolver's part of its metric names:
// spanpull_resolver_<name>.
const metricsSubsystem = "resolver"

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	counter := func(name, help string) prometheus.CounterOpts {
		return prometheus.CounterOpts{Namespace: snapshotter.MetricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help}
	}
	m := &Metrics{
		bytesFetched: prometheus.NewCounterVec(counter("fetched_bytes_total",
			"Compressed bytes fetched from registries, by what they were for (span, ztoc, unpack)."), []string{"kind"}),
		spansFetched: prometheus.NewCounter(counter("spans_fetched_total",
			"Spans fetched from registries and verified.")),
		verifyFailed: prometheus.NewCounter(counter("span_verify_failures_total",
			"Fetched spans whose bytes did not match their digest.")),
		cacheHits: prometheus.NewCounter(counter("span_cache_hits_total",
			"Reads served from the on-disk span cache.")),
		readLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: snapshotter.MetricsNamespace,
			Subsystem: metricsSubsystem,
			Name:      "read_duration_seconds",
			Help:      "Latency of reads of lazily pulled layers (FUSE reads).",
			Buckets:   prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		readErrors: prometheus.NewCounter(counter("read_errors_total",
			"Reads of lazily pulled layers that failed (EIO).")),
		layersMounted: prometheus.NewCounterVec(counter("layers_mounted_total",
			"Layers of indexed images served by the snapshotter, lazily or unpacked locally."), []string{"mode"}),
		fallbacks: prometheus.NewCounterVec(counter("fallbacks_total",
			"Layers left to containerd's normal pull, by reason."), []string{"reason"}),
		classSpans: prometheus.NewCounterVec(counter("class_span_fetches_total",
			"Span fetches (whole spans or chunks of them), by class (demand, prefetch, fill)."), []string{"class"}),
		classBytes: prometheus.NewCounterVec(counter("class_fetched_bytes_total",
			"Compressed span bytes fetched, by class (demand, prefetch, fill)."), []string{"class"}),
		classFailures: prometheus.NewCounterVec(counter("class_fetch_failures_total",
			"Span fetches that failed after their retries, by class."), []string{"class"}),
		prefetchUse: prometheus.NewCounterVec(counter("prefetched_spans_total",
			"Prefetched spans, by outcome: hit (read later) or waste (never read before the layer was unmounted)."), []string{"outcome"}),
		cacheWrites: prometheus.NewCounter(counter("span_cache_write_failures_total",
			"Verified span bytes the disk cache could not take (full disk, over budget); served from memory.")),
		layerStates: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: snapshotter.MetricsNamespace, Subsystem: metricsSubsystem,
			Name: "layers", Help: "Lazy layers served now, by verification state (unverified, verified, quarantined)."}, []string{"state"}),
		quarantines: prometheus.NewCounter(counter("quarantines_total",
			"Lazy layers quarantined because their index did not match the layer.")),
		headerChecks: prometheus.NewCounter(counter("header_checks_total",
			"Files whose tar header was checked against their TOC entry before their first byte was served.")),
		headerBytes: prometheus.NewCounter(counter("header_check_bytes_total",
			"Uncompressed tar header bytes read to check files against their TOC entries.")),
		treeBytes: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: snapshotter.MetricsNamespace, Subsystem: metricsSubsystem,
			Name: "local_tree_bytes", Help: "Bytes of the local trees of verified layers, which new mounts stack in place of FUSE."}),
		states: make(map[string]string),
	}
	for _, c := range []prometheus.Collector{m.bytesFetched, m.spansFetched, m.verifyFailed, m.cacheHits,
		m.readLatency, m.readErrors, m.layersMounted, m.fallbacks,
		m.classSpans, m.classBytes, m.classFailures, m.prefetchUse, m.cacheWrites,
		m.layerStates, m.quarantines, m.headerChecks, m.headerBytes, m.treeBytes} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// SpanFetched implements span.Metrics.
func (m *Metrics) SpanFetched(class span.Class, compressedBytes int64, d time.Duration) {
	if m == nil {
		return
	}
	m.bytesFetched.WithLabelValues("span").Add(float64(compressedBytes))
	m.spansFetched.Inc()
	m.classSpans.WithLabelValues(class.String()).Inc()
	m.classBytes.WithLabelValues(class.String()).Add(float64(compressedBytes))
}

// FetchFailed implements span.Metrics.
func (m *Metrics) FetchFailed(class span.Class) {
	if m != nil {
		m.classFailures.WithLabelValues(class.String()).Inc()
	}
}

// PrefetchUsed implements span.Metrics.
func (m *Metrics) PrefetchUsed(hit bool) {
	if m == nil {
		return
	}
	outcome := "waste"
	if hit {
		outcome = "hit"
	}
	m.prefetchUse.WithLabelValues(outcome).Inc()
}

// CacheWriteFailed implements span.Metrics.
func (m *Metrics) CacheWriteFailed() {
	if m != nil {
		m.cacheWrites.Inc()
	}
}

// SpanVerifyFailed implements span.Metrics.
func (m *Metrics) SpanVerifyFailed() {
	if m != nil {
		m.verifyFailed.Inc()
	}
}

// SpanCacheHit implements span.Metrics.
func (m *Metrics) SpanCacheHit() {
	if m != nil {
		m.cacheHits.Inc()
	}
}

// Read implements span.Metrics.
func (m *Metrics) Read(n int, d time.Duration, err error) {
	if m == nil {
		return
	}
	m.readLatency.Observe(d.Seconds())
	if err != nil {
		m.readErrors.Inc()
	}
}

func (m *Metrics) fetched(kind string, n int64) {
	if m != nil {
		m.bytesFetched.WithLabelValues(kind).Add(float64(n))
	}
}

func (m *Metrics) layerMounted(mode string) {
	if m != nil {
		m.layersMounted.WithLabelValues(mode).Inc()
	}
}

func (m *Metrics) fallback(reason string) {
	if m != nil {
		m.fallbacks.WithLabelValues(reason).Inc()
	}
}

// layerState counts the layer of snapshot key in verification state state
// ("" when it is no longer served).
func (m *Metrics) layerState(key, state string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.states[key]; ok {
		m.layerStates.WithLabelValues(old).Dec()
		delete(m.states, key)
	}
	if state != "" {
		m.states[key] = state
		m.layerStates.WithLabelValues(state).Inc()
	}
}

// quarantined counts a quarantined layer.
func (m *Metrics) quarantined() {
	if m != nil {
		m.quarantines.Inc()
	}
}

// headerChecked counts a file's header check that read n header bytes.
func (m *Metrics) headerChecked(n int64) {
	if m != nil {
		m.headerChecks.Inc()
		m.headerBytes.Add(float64(n))
	}
}

// localTrees records the bytes of all local trees.
func (m *Metrics) localTrees(n int64) {
	if m != nil {
		m.treeBytes.Set(float64(n))
	}
}
