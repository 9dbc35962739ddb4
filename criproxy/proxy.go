package criproxy

import (
	"context"
	"fmt"

	"github.com/containerd/log"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Server is the CRI image service proxy. Every call is forwarded to
// containerd's image service unchanged (its answer and error, gRPC status
// included, are returned as they are); PullImage's credentials are
// remembered in the Store first. Only the image service is served: the
// kubelet's --image-service-endpoint sends nothing else, and its runtime
// service stays pointed at containerd.
type Server struct {
	runtime.UnimplementedImageServiceServer
	images runtime.ImageServiceClient
	store  *Store
	log    *log.Entry
}

// NewServer returns a proxy forwarding to the image service on backend
// (containerd's CRI socket, see Dial) and remembering credentials in
// store.
func NewServer(backend grpc.ClientConnInterface, store *Store, logger *log.Entry) *Server {
	return &Server{images: runtime.NewImageServiceClient(backend), store: store, log: logger}
}

// Register adds the proxy's image service to g.
func (s *Server) Register(g *grpc.Server) { runtime.RegisterImageServiceServer(g, s) }

// Dial returns a connection to containerd's CRI socket (a unix socket
// path). It connects lazily: containerd may start after the proxy, and a
// call made while it is down fails with codes.Unavailable.
func Dial(socket string) (*grpc.ClientConn, error) {
	cc, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("containerd CRI socket %s: %w", socket, err)
	}
	return cc, nil
}

// PullImage remembers the request's credentials for the image, then
// forwards the pull. A reference the store cannot parse is forwarded all
// the same: containerd reports the error.
func (s *Server) PullImage(ctx context.Context, r *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	ref := r.GetImage().GetImage()
	l := s.log.WithField("image", ref)
	if ok, err := s.store.Remember(ref, r.GetAuth()); err != nil {
		l.WithError(err).Warn("spanpull: CRI pull: credentials not remembered")
	} else if ok {
		l.Debug("spanpull: CRI pull: credentials remembered for lazy reads")
	}
	resp, err := s.images.PullImage(ctx, r)
	if err != nil {
		l.WithError(err).Debug("spanpull: CRI pull failed")
	}
	return resp, err
}

// ListImages forwards the call.
func (s *Server) ListImages(ctx context.Context, r *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return s.images.ListImages(ctx, r)
}

// ImageStatus forwards the call.
func (s *Server) ImageStatus(ctx context.Context, r *runtime.ImageStatusRequest) (*runtime.ImageStatusResponse, error) {
	return s.images.ImageStatus(ctx, r)
}

// RemoveImage forwards the call. The image's credentials go when its
// snapshots do (Store.Expire): the kubelet removes images by ID, which
// names no reference.
func (s *Server) RemoveImage(ctx context.Context, r *runtime.RemoveImageRequest) (*runtime.RemoveImageResponse, error) {
	return s.images.RemoveImage(ctx, r)
}

// ImageFsInfo forwards the call.
func (s *Server) ImageFsInfo(ctx context.Context, r *runtime.ImageFsInfoRequest) (*runtime.ImageFsInfoResponse, error) {
	return s.images.ImageFsInfo(ctx, r)
}
