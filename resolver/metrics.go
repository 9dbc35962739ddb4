package resolver

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the Prometheus metrics of lazily pulled layers. A nil
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
}

// NewMetrics creates the metrics and registers them with reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		bytesFetched: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spanpull_registry_bytes_fetched_total",
			Help: "Bytes fetched from registries, by what they were for (span, ztoc, unpack).",
		}, []string{"kind"}),
		spansFetched: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spanpull_spans_fetched_total",
			Help: "Spans fetched from registries and verified.",
		}),
		verifyFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spanpull_span_verify_failures_total",
			Help: "Fetched spans whose bytes did not match their digest.",
		}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spanpull_span_cache_hits_total",
			Help: "Reads served from the on-disk span cache.",
		}),
		readLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "spanpull_read_seconds",
			Help:    "Latency of reads of lazily pulled layers (FUSE reads).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10),
		}),
		readErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "spanpull_read_errors_total",
			Help: "Reads of lazily pulled layers that failed (EIO).",
		}),
		layersMounted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spanpull_layers_mounted_total",
			Help: "Layers of indexed images served by the snapshotter, lazily or unpacked locally.",
		}, []string{"mode"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "spanpull_fallbacks_total",
			Help: "Layers left to containerd's normal pull, by reason.",
		}, []string{"reason"}),
	}
	for _, c := range []prometheus.Collector{m.bytesFetched, m.spansFetched, m.verifyFailed, m.cacheHits,
		m.readLatency, m.readErrors, m.layersMounted, m.fallbacks} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// SpanFetched implements span.Metrics.
func (m *Metrics) SpanFetched(compressedBytes int64, d time.Duration) {
	if m == nil {
		return
	}
	m.bytesFetched.WithLabelValues("span").Add(float64(compressedBytes))
	m.spansFetched.Inc()
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
