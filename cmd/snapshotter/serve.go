package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/spanpull/spanpull/criproxy"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/resolver"
	"github.com/spanpull/spanpull/snapshotter"
)

// shutdownGrace bounds how long in-flight RPCs may run after a signal.
const shutdownGrace = 10 * time.Second

// newLogger returns the daemon's one logger: lines at level and above, in
// containerd's text format, to w.
//
// It is containerd's logger (github.com/containerd/log, a logrus entry), not
// log/slog, because it needs the fewest adapters: the containerd code the
// daemon runs (overlay snapshotter, snapshot metadata, mount helpers, the
// snapshots gRPC service) logs through log.G(ctx), which returns this logger
// once it is in the context (log.WithLogger); with slog every such line
// would need a logrus-to-slog bridge. The one adapter left is fusefs' small
// writer for go-fuse's standard library logger. spanpull's packages take
// the logger as a constructor option (snapshotter.WithLogger,
// resolver.Config.Logger, fusefs.Options.Logger).
func newLogger(w io.Writer, level string) (*log.Entry, error) {
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	l := logrus.New()
	l.SetOutput(w)
	l.SetLevel(lvl)
	l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: log.RFC3339NanoFixed})
	return logrus.NewEntry(l), nil
}

// serve runs the daemon until ctx is done, logging to logOut.
func serve(ctx context.Context, cfg config, logOut io.Writer) error {
	logger, err := newLogger(logOut, cfg.LogLevel)
	if err != nil {
		return err
	}
	ctx = log.WithLogger(ctx, logger)
	setMemoryLimit(cfg.MemoryLimitBytes, logger)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// The CRI proxy's credentials are the resolver's first source.
	var creds *criproxy.Store
	if cfg.CRI.ImageServiceProxy != "" {
		creds = criproxy.NewStore()
	}
	records := newRecords(cfg.Record, logger)
	defer records.Close()
	sn, closeSnapshotter, err := openSnapshotter(ctx, cfg, reg, logger, creds, records)
	if err != nil {
		return err
	}
	defer closeSnapshotter()

	l, err := listenUnix(cfg.Address)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Address)
	srv := newSnapshotsServer(sn, newRPCMetrics(reg), logger)
	// The servers report a failure here; they stop (and their goroutines
	// return) in shutdown and cri.stop.
	errc := make(chan error, 3)
	go func() {
		if err := srv.Serve(l); err != nil {
			errc <- fmt.Errorf("serve snapshots API: %w", err)
		}
	}()
	var cri *criProxy
	if creds != nil {
		if cri, err = startCRIProxy(cfg.CRI, creds, sn, errc, logger); err != nil {
			srv.Stop()
			return err
		}
	}
	metrics, err := serveMetrics(cfg.MetricsAddress, reg, readiness(cfg, sn), records, errc, logger)
	var debugSrv *http.Server
	if err == nil {
		debugSrv, err = serveDebug(cfg.DebugAddress, errc, logger)
	}
	if err != nil {
		shutdown(srv, []*http.Server{metrics}, logger)
		cri.stop()
		return err
	}
	logger.WithField("address", cfg.Address).WithField("root", cfg.Root).Info("spanpull snapshotter serving")

	var runErr error
	select {
	case <-ctx.Done():
		logger.Info("shutting down")
	case runErr = <-errc:
		logger.WithError(runErr).Error("server failed, shutting down")
	}
	cri.stop()
	shutdown(srv, []*http.Server{metrics, debugSrv}, logger)
	return runErr
}

// newRecords returns the store of the access records of lazily mounted
// layers (for recorded prefetch), or nil when recording is off.
func newRecords(c record.Config, logger *log.Entry) *record.Store {
	if c.Disable {
		return nil
	}
	opts := c.Options()
	opts.OnFrozen = func(img record.Image) { record.LogReady(logger, img) }
	return record.NewStore(opts)
}

// openSnapshotter opens the snapshotter under cfg.Root and, unless lazy
// pulling is disabled, the resolver that serves its remote layers.
// release closes both, the snapshotter first: it releases the mounts the
// resolver serves.
//
// creds, when not nil, holds the credentials of CRI pulls: the resolver
// tries them first for an image's registry requests. records, when not
// nil, receives the access records of lazily mounted layers.
func openSnapshotter(ctx context.Context, cfg config, reg prometheus.Registerer, logger *log.Entry, creds *criproxy.Store, records *record.Store) (_ *snapshotter.Snapshotter, release func(), err error) {
	opts := []snapshotter.Opt{snapshotter.WithMetrics(reg), snapshotter.WithLogger(logger)}
	if cfg.AsyncRemove {
		opts = append(opts, snapshotter.WithAsyncRemove())
	}
	if len(cfg.MountOptions) > 0 {
		opts = append(opts, snapshotter.WithMountOptions(cfg.MountOptions...))
	}
	var res *resolver.Resolver
	if !cfg.Remote.Disable {
		rm, err := resolver.NewMetrics(reg)
		if err != nil {
			return nil, nil, err
		}
		rc := cfg.resolverConfig()
		rc.Metrics = rm
		rc.Logger = logger
		rc.Records = records
		if creds != nil {
			rc.ImageCredentials = creds.ImageCredentials
		}
		if res, err = resolver.New(rc); err != nil {
			return nil, nil, err
		}
		opts = append(opts, snapshotter.WithRemoteLayerResolver(res))
	}
	sn, err := snapshotter.New(ctx, cfg.Root, opts...)
	if err != nil {
		if res != nil {
			res.Close()
		}
		return nil, nil, err
	}
	return sn, func() {
		if err := sn.Close(); err != nil {
			logger.WithError(err).Error("close snapshotter")
		}
		if res != nil {
			if err := res.Close(); err != nil {
				logger.WithError(err).Error("close resolver")
			}
		}
	}, nil
}

// rpcMetrics count and time the calls of the snapshots API.
type rpcMetrics struct {
	calls   *prometheus.CounterVec
	seconds *prometheus.HistogramVec
}

func newRPCMetrics(reg prometheus.Registerer) rpcMetrics {
	m := rpcMetrics{
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: snapshotter.MetricsNamespace,
			Subsystem: snapshotter.MetricsSubsystem,
			Name:      "grpc_requests_total",
			Help:      "Snapshots API calls by method and gRPC status code.",
		}, []string{"method", "code"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: snapshotter.MetricsNamespace,
			Subsystem: snapshotter.MetricsSubsystem,
			Name:      "grpc_request_duration_seconds",
			Help:      "Snapshots API call latency by method.",
			Buckets:   prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"method"}),
	}
	reg.MustRegister(m.calls, m.seconds)
	return m
}

// newSnapshotsServer returns a gRPC server of containerd's snapshots API
// over sn. Every call is counted and timed, and runs with logger in its
// context, so that containerd's code under it (log.G) logs through it.
func newSnapshotsServer(sn *snapshotter.Snapshotter, m rpcMetrics, logger *log.Entry) *grpc.Server {
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(
		func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			start := time.Now()
			resp, err := h(log.WithLogger(ctx, logger), req)
			method := filepath.Base(info.FullMethod)
			m.calls.WithLabelValues(method, status.Code(err).String()).Inc()
			m.seconds.WithLabelValues(method).Observe(time.Since(start).Seconds())
			if err != nil {
				logger.WithError(err).WithField("method", method).Debug("snapshots call failed")
			}
			return resp, err
		}))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	// For readiness checks through the socket (/readyz).
	healthpb.RegisterHealthServer(srv, health.NewServer())
	return srv
}

// setMemoryLimit sets the Go runtime's soft memory limit to limit (zero:
// defaultMemoryLimit; negative: none), unless GOMEMLIMIT set one.
func setMemoryLimit(limit int64, logger *log.Entry) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	switch {
	case limit == 0:
		limit = defaultMemoryLimit
	case limit < 0:
		return
	}
	debug.SetMemoryLimit(limit)
	logger.WithField("bytes", limit).Debug("Go memory limit")
}

// serveMetrics serves reg's metrics on /metrics, /healthz and /readyz
// (ready), and the access records of records on record.HandlerPath, at
// addr until shutdown, reporting a failure to errc. An empty addr serves
// nothing (nil server).
func serveMetrics(addr string, reg *prometheus.Registry, ready func(context.Context) error, records *record.Store, errc chan<- error, logger *log.Entry) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	healthHandlers(mux, ready)
	if records != nil {
		mux.Handle(record.HandlerPath, record.Handler(records))
	}
	return serveHTTP("metrics", addr, mux, errc, logger)
}

// serveDebug serves the Go runtime's profiles (net/http/pprof) at addr,
// as containerd's [debug] address does: how an operator finds out where
// the daemon's memory or CPU goes. An empty addr serves nothing.
func serveDebug(addr string, errc chan<- error, logger *log.Entry) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return serveHTTP("debug", addr, mux, errc, logger)
}

// serveHTTP serves h at the TCP address addr until shutdown, reporting a
// failure to errc; name says which server in logs and errors. An empty
// addr serves nothing (nil server).
func serveHTTP(name, addr string, h http.Handler, errc chan<- error, logger *log.Entry) (*http.Server, error) {
	if addr == "" {
		return nil, nil
	}
	ml, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s listener: %w", name, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ml); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("serve %s: %w", name, err)
		}
	}()
	logger.WithField("address", ml.Addr().String()).Info("serving " + name)
	return srv, nil
}

// shutdown stops the snapshots API server, letting in-flight calls finish
// for up to shutdownGrace, and the HTTP servers (nil ones are skipped).
func shutdown(srv *grpc.Server, servers []*http.Server, logger *log.Entry) {
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		srv.Stop()
		<-stopped
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	for _, s := range servers {
		if s == nil {
			continue
		}
		if err := s.Shutdown(ctx); err != nil {
			logger.WithError(err).Warn("stop HTTP server")
		}
	}
}

// listenUnix listens on the unix socket path, creating its directory and
// removing a stale socket. It refuses to replace a non-socket file or a
// socket that some process still accepts connections on.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	st, err := os.Lstat(path)
	switch {
	case err == nil:
		if st.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("socket path %s exists and is not a socket", path)
		}
		c, derr := net.DialTimeout("unix", path, time.Second)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("socket %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("socket path: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket permissions: %w", err)
	}
	return l, nil
}
