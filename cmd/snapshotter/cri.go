package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/spanpull/spanpull/criproxy"
	"github.com/spanpull/spanpull/snapshotter"
)

// credentialSweepInterval is how often the credentials of images without
// snapshots are forgotten (criproxy.Store.Expire).
const credentialSweepInterval = time.Minute

// criProxy is the running CRI image service proxy and its credential
// sweeper; stop ends both.
type criProxy struct {
	srv    *grpc.Server
	cc     *grpc.ClientConn
	socket string
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startCRIProxy serves the CRI image service proxy on cfg's socket,
// forwarding to containerd's CRI socket and remembering credentials in
// creds, and starts forgetting the credentials of images whose snapshots
// in sn are gone. A failure of the server is reported to errc.
func startCRIProxy(cfg criConfig, creds *criproxy.Store, sn *snapshotter.Snapshotter, errc chan<- error, logger *log.Entry) (*criProxy, error) {
	cc, err := criproxy.Dial(cfg.ContainerdCRISocket)
	if err != nil {
		return nil, err
	}
	l, err := listenUnix(cfg.ImageServiceProxy)
	if err != nil {
		cc.Close()
		return nil, fmt.Errorf("CRI image service proxy: %w", err)
	}
	p := &criProxy{srv: grpc.NewServer(), cc: cc, socket: cfg.ImageServiceProxy}
	criproxy.NewServer(cc, creds, logger).Register(p.srv)
	healthpb.RegisterHealthServer(p.srv, health.NewServer())
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	p.wg.Add(2)
	go func() {
		defer p.wg.Done()
		if err := p.srv.Serve(l); err != nil {
			errc <- fmt.Errorf("serve CRI image service proxy: %w", err)
		}
	}()
	go func() {
		defer p.wg.Done()
		sweepCredentials(ctx, creds, sn, logger)
	}()
	logger.WithField("address", cfg.ImageServiceProxy).WithField("containerd", cfg.ContainerdCRISocket).
		Info("serving CRI image service proxy")
	return p, nil
}

// stop stops the proxy (in-flight pulls are cut: the kubelet retries) and
// the sweeper, and removes the socket. A nil proxy is fine.
func (p *criProxy) stop() {
	if p == nil {
		return
	}
	p.srv.Stop()
	p.cancel()
	p.wg.Wait()
	p.cc.Close()
	os.Remove(p.socket)
}

// sweepCredentials forgets, every credentialSweepInterval until ctx is
// done, the credentials of images that have no remote snapshot left and
// were pulled longer than criproxy.DefaultGrace ago: the credentials live
// as long as the layers that read with them.
func sweepCredentials(ctx context.Context, creds *criproxy.Store, sn *snapshotter.Snapshotter, logger *log.Entry) {
	t := time.NewTicker(credentialSweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		inUse, err := remoteImageRefs(ctx, sn)
		if err != nil {
			logger.WithError(err).Warn("spanpull: list remote snapshots to expire credentials")
			continue
		}
		for _, ref := range creds.Expire(func(ref string) bool { return inUse[ref] }, criproxy.DefaultGrace) {
			logger.WithField("image", ref).Debug("spanpull: CRI credentials forgotten: the image has no snapshots left")
		}
	}
}

// remoteImageRefs returns the (normalized) image references of sn's
// remote snapshots: the images whose layers are read lazily.
func remoteImageRefs(ctx context.Context, sn *snapshotter.Snapshotter) (map[string]bool, error) {
	refs := map[string]bool{}
	err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if ref := info.Labels[snapshotters.TargetRefLabel]; ref != "" {
			refs[criproxy.Normalize(ref)] = true
		}
		return nil
	}, fmt.Sprintf(`labels."%s"`, snapshotter.LabelRemote))
	return refs, err
}
