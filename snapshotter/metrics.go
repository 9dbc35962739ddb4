//go:build linux

package snapshotter

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricsNamespace starts the name of every metric of the daemon:
// spanpull_<subsystem>_<name>, with one subsystem per component
// ("snapshotter" here and for the daemon's gRPC server, "resolver"), in
// snake_case with Prometheus' unit suffixes (_total, _seconds, _bytes).
const MetricsNamespace = "spanpull"

// MetricsSubsystem is the snapshotter's part of its metric names, and of
// those of the daemon's snapshots API server.
const MetricsSubsystem = "snapshotter"

// Outcomes of a Prepare that could be served remotely (label "result").
const (
	// resultMounted: the layer was mounted remotely and committed.
	resultMounted = "mounted"
	// resultExists: the target snapshot existed already.
	resultExists = "exists"
	// resultNoRemote: the resolver cannot serve the layer (ErrNoRemote);
	// containerd pulls it.
	resultNoRemote = "no_remote"
	// resultFailed: the resolver or the commit failed; containerd pulls it.
	resultFailed = "failed"
)

// metrics are the snapshotter's own Prometheus metrics.
type metrics struct {
	prepares *prometheus.CounterVec
	mounts   prometheus.GaugeFunc
}

func newMetrics(s *Snapshotter) *metrics {
	m := &metrics{
		prepares: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: MetricsNamespace,
			Subsystem: MetricsSubsystem,
			Name:      "remote_prepares_total",
			Help:      "Prepares of layers that could be served remotely, by result: mounted, exists, no_remote (pulled normally), failed (pulled normally).",
		}, []string{"result"}),
		mounts: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: MetricsNamespace,
			Subsystem: MetricsSubsystem,
			Name:      "remote_mounts",
			Help:      "Remote layers currently mounted by this process.",
		}, func() float64 {
			s.mu.Lock()
			defer s.mu.Unlock()
			return float64(len(s.mounted))
		}),
	}
	// Every result is exported from the start, at zero.
	for _, r := range []string{resultMounted, resultExists, resultNoRemote, resultFailed} {
		m.prepares.WithLabelValues(r)
	}
	return m
}

func (m *metrics) register(reg prometheus.Registerer) error {
	return errors.Join(reg.Register(m.prepares), reg.Register(m.mounts))
}
