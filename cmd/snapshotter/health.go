package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/spanpull/spanpull/snapshotter"
)

// readyTimeout bounds one readiness check (a kubelet probe waits about as
// long by default).
const readyTimeout = 3 * time.Second

// readiness returns the daemon's readiness check: its gRPC sockets answer
// (the snapshots API, and the CRI proxy when configured), checked through
// the sockets themselves as containerd and the kubelet reach them, and
// every remote layer it remembers is mounted again (snapshotter.Ready).
func readiness(cfg config, sn *snapshotter.Snapshotter) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := checkSocket(ctx, cfg.Address); err != nil {
			return fmt.Errorf("snapshots API: %w", err)
		}
		if cfg.CRI.ImageServiceProxy != "" {
			if err := checkSocket(ctx, cfg.CRI.ImageServiceProxy); err != nil {
				return fmt.Errorf("CRI image service proxy: %w", err)
			}
		}
		return sn.Ready()
	}
}

// checkSocket asks the gRPC health service on a unix socket whether it
// serves.
func checkSocket(ctx context.Context, socket string) error {
	cc, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return errors.New("not serving: " + resp.Status.String())
	}
	return nil
}

// healthHandlers adds /healthz (the process serves HTTP: for liveness
// probes) and /readyz (ready, see readiness; 503 with the reason
// otherwise) to mux.
func healthHandlers(mux *http.ServeMux, ready func(context.Context) error) {
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		defer cancel()
		if err := ready(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
}
