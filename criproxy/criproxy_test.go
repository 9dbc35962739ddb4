package criproxy

import (
	"context"
	"encoding/base64"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// fakeImages is containerd's image service as the proxy sees it: it
// records the pull requests and fails the images named "denied".
type fakeImages struct {
	runtime.UnimplementedImageServiceServer
	mu    sync.Mutex
	pulls []*runtime.PullImageRequest
}

func (f *fakeImages) PullImage(_ context.Context, r *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	f.mu.Lock()
	f.pulls = append(f.pulls, r)
	f.mu.Unlock()
	if r.GetImage().GetImage() == "denied" {
		return nil, status.Error(codes.Unknown, "failed to resolve reference: 401 Unauthorized")
	}
	return &runtime.PullImageResponse{ImageRef: "sha256:abc"}, nil
}

func (f *fakeImages) ListImages(context.Context, *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return &runtime.ListImagesResponse{Images: []*runtime.Image{{Id: "sha256:abc", RepoTags: []string{"r/app:1"}}}}, nil
}

// serve serves srv's registrations on a unix socket in dir and returns
// its path; the server stops in Cleanup.
func serve(t *testing.T, dir, name string, register func(*grpc.Server)) string {
	t.Helper()
	sock := filepath.Join(dir, name)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	register(g)
	done := make(chan struct{})
	go func() { defer close(done); _ = g.Serve(l) }()
	t.Cleanup(func() { g.Stop(); <-done })
	return sock
}

// proxyClient starts a fake containerd and the proxy in front of it, and
// returns a client of the proxy, the fake and the store.
func proxyClient(t *testing.T) (runtime.ImageServiceClient, *fakeImages, *Store) {
	t.Helper()
	dir := t.TempDir()
	fake := &fakeImages{}
	backend := serve(t, dir, "containerd.sock", func(g *grpc.Server) { runtime.RegisterImageServiceServer(g, fake) })
	cc, err := Dial(backend)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	store := NewStore()
	proxy := serve(t, dir, "proxy.sock", NewServer(cc, store, logrus.NewEntry(logrus.New())).Register)
	pc, err := Dial(proxy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return runtime.NewImageServiceClient(pc), fake, store
}

func TestPullRemembersCredentials(t *testing.T) {
	client, fake, store := proxyClient(t)
	ctx := context.Background()
	req := &runtime.PullImageRequest{
		Image: &runtime.ImageSpec{Image: "reg.example:5000/team/app:1"},
		Auth:  &runtime.AuthConfig{Username: "alice", Password: "s3cret"},
	}
	resp, err := client.PullImage(ctx, req)
	if err != nil || resp.ImageRef != "sha256:abc" {
		t.Fatalf("pull: %v %v", resp, err)
	}
	if len(fake.pulls) != 1 || !proto.Equal(fake.pulls[0], req) {
		t.Fatalf("containerd got %v, want the request unchanged", fake.pulls)
	}
	c, err := store.ImageCredentials("reg.example:5000/team/app:1")(ctx, "reg.example:5000")
	if err != nil || c != (auth.Credential{Username: "alice", Password: "s3cret"}) {
		t.Fatalf("credentials: %+v %v", c, err)
	}
	// Other calls pass through.
	if l, err := client.ListImages(ctx, &runtime.ListImagesRequest{}); err != nil || len(l.Images) != 1 {
		t.Fatalf("list: %v %v", l, err)
	}
	// containerd's error reaches the caller with its code.
	if _, err := client.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: "denied"}}); status.Code(err) != codes.Unknown || status.Convert(err).Message() != "failed to resolve reference: 401 Unauthorized" {
		t.Fatalf("denied pull: %v", err)
	}
	// An anonymous pull keeps the credentials of the earlier one.
	if _, err := client.PullImage(ctx, &runtime.PullImageRequest{Image: req.Image}); err != nil {
		t.Fatal(err)
	}
	if store.Len() != 1 {
		t.Fatalf("%d images with credentials, want 1", store.Len())
	}
}

func TestCredentialForms(t *testing.T) {
	ctx := context.Background()
	b64 := base64.StdEncoding.EncodeToString([]byte("bob:pw"))
	for _, tc := range []struct {
		name      string
		ref, host string
		auth      *runtime.AuthConfig
		want      auth.Credential
	}{
		{"auth field", "r.io/a:1", "r.io", &runtime.AuthConfig{Auth: b64}, auth.Credential{Username: "bob", Password: "pw"}},
		{"identity token", "r.io/a:1", "r.io", &runtime.AuthConfig{IdentityToken: "idt"}, auth.Credential{RefreshToken: "idt"}},
		{"registry token", "r.io/a:1", "r.io", &runtime.AuthConfig{RegistryToken: "rt"}, auth.Credential{AccessToken: "rt"}},
		{"server address matches", "r.io/a:1", "r.io", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "https://r.io/v1/"}, auth.Credential{Username: "u", Password: "p"}},
		{"bare server address", "r.io:5000/a:1", "r.io:5000", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "r.io:5000"}, auth.Credential{Username: "u", Password: "p"}},
		{"other server", "r.io/a:1", "mirror.local:5000", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "r.io"}, auth.EmptyCredential},
		{"no server address: every host of the image", "r.io/a:1", "mirror.local:5000", &runtime.AuthConfig{Username: "u", Password: "p"}, auth.Credential{Username: "u", Password: "p"}},
		{"docker hub names", "alpine:3", "registry-1.docker.io", &runtime.AuthConfig{Username: "u", Password: "p", ServerAddress: "https://index.docker.io/v1/"}, auth.Credential{Username: "u", Password: "p"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewStore()
			if ok, err := s.Remember(tc.ref, tc.auth); err != nil || !ok {
				t.Fatalf("remember: %v %v", ok, err)
			}
			c, err := s.ImageCredentials(tc.ref)(ctx, tc.host)
			if err != nil || c != tc.want {
				t.Fatalf("got %+v %v, want %+v", c, err, tc.want)
			}
		})
	}
	// The short and the full form of a reference are the same image; an
	// image pulled without credentials has none.
	s := NewStore()
	if _, err := s.Remember("alpine:3", &runtime.AuthConfig{Username: "u", Password: "p"}); err != nil {
		t.Fatal(err)
	}
	if c, _ := s.ImageCredentials("docker.io/library/alpine:3")(ctx, "registry-1.docker.io"); c.Username != "u" {
		t.Fatalf("normalized lookup: %+v", c)
	}
	if c, _ := s.ImageCredentials("docker.io/library/alpine:4")(ctx, "registry-1.docker.io"); c != auth.EmptyCredential {
		t.Fatalf("other image: %+v", c)
	}
	if _, err := s.Remember("bad ref:with spaces", &runtime.AuthConfig{Username: "u"}); err == nil {
		t.Fatal("bad reference accepted")
	}
}

// Credentials stay while the image has snapshots or its pull is recent,
// and go after that.
func TestExpire(t *testing.T) {
	s := NewStore()
	now := time.Unix(1000, 0)
	s.now = func() time.Time { return now }
	for _, ref := range []string{"r.io/used:1", "r.io/unused:1"} {
		if _, err := s.Remember(ref, &runtime.AuthConfig{Username: "u", Password: "p"}); err != nil {
			t.Fatal(err)
		}
	}
	inUse := func(ref string) bool { return ref == Normalize("r.io/used:1") }
	if gone := s.Expire(inUse, time.Minute); len(gone) != 0 {
		t.Fatalf("expired during the grace period: %v", gone)
	}
	now = now.Add(2 * time.Minute)
	if gone := s.Expire(inUse, time.Minute); len(gone) != 1 || gone[0] != "r.io/unused:1" {
		t.Fatalf("expired %v, want r.io/unused:1", gone)
	}
	if c, _ := s.ImageCredentials("r.io/used:1")(context.Background(), "r.io"); c.Username != "u" {
		t.Fatal("credentials of an image in use expired")
	}
}
