package resolver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/registry/registrytest"
)

// pushImage pushes a one-layer image manifest (the layer blob is
// arbitrary bytes: discovery never reads it) and returns its digest.
func pushImage(t *testing.T, addr, repo string) (digest.Digest, ocispec.Descriptor) {
	t.Helper()
	cfg := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	layer := []byte("not really a layer")
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.Digest(registrytest.PushBlob(t, addr, repo, cfg)), Size: int64(len(cfg))},
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.Digest(registrytest.PushBlob(t, addr, repo, layer)), Size: int64(len(layer))}},
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	registrytest.PushManifest(t, addr, repo, "v1", m.MediaType, b)
	return digest.FromBytes(b), ocispec.Descriptor{MediaType: m.MediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
}

func newResolver(t *testing.T, ttl time.Duration) *Resolver {
	t.Helper()
	r, err := New(Config{Root: t.TempDir(), IndexCacheTTL: ttl, FillRate: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestImageIndexCache: whether an image has an index is looked up once per
// TTL (an index pushed meanwhile is seen after the TTL), and the lookup
// finds a v1 index through the referrers API.
func TestImageIndexCache(t *testing.T) {
	addr := registrytest.StartReferrersRegistry(t)
	md, subject := pushImage(t, addr, "app")
	ref := addr + "/app:v1"
	labels := map[string]string{snapshotters.TargetManifestDigestLabel: md.String()}
	ctx := context.Background()

	r := newResolver(t, time.Hour)
	if img := r.image(ctx, ref, labels); !errors.Is(img.err, errNoIndex) {
		t.Fatalf("image without index: err = %v, want errNoIndex", img.err)
	}

	// Push a v1 index for the image.
	ztocBlob := []byte("a zTOC")
	zd := registrytest.PushBlob(t, addr, "app", ztocBlob)
	registrytest.PushBlob(t, addr, "app", []byte("{}"))
	built, err := index.Build(index.BuildOptions{Version: index.V1, Subject: &subject, Layers: []index.Layer{{
		LayerDigest: digest.FromString("layer"), LayerMediaType: ocispec.MediaTypeImageLayerGzip, SpanSize: 1 << 22,
		Ztoc: ocispec.Descriptor{MediaType: index.MediaTypeZtoc, Digest: digest.Digest(zd), Size: int64(len(ztocBlob))},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	registrytest.PushManifest(t, addr, "app", built.Descriptor.Digest.String(), ocispec.MediaTypeImageManifest, built.Bytes)

	if img := r.image(ctx, ref, labels); !errors.Is(img.err, errNoIndex) {
		t.Fatalf("within the TTL the answer must come from the cache: err = %v", img.err)
	}
	r = newResolver(t, time.Nanosecond)
	img := r.image(ctx, ref, labels)
	if img.err != nil || img.indexDig != built.Descriptor.Digest {
		t.Fatalf("after the TTL: index %s, err %v; want %s", img.indexDig, img.err, built.Descriptor.Digest)
	}
}

// TestImageLookupFailureNotCached: a registry that cannot be reached is
// not taken as "no index": the next layer asks again.
func TestImageLookupFailureNotCached(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	r := newResolver(t, time.Hour)
	labels := map[string]string{snapshotters.TargetManifestDigestLabel: digest.FromString("m").String()}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	first := r.image(ctx, addr+"/app:v1", labels)
	if first.err == nil || errors.Is(first.err, errNoIndex) {
		t.Fatalf("unreachable registry: err = %v, want a lookup failure", first.err)
	}
	if second := r.image(ctx, addr+"/app:v1", labels); second == first {
		t.Fatal("a failed lookup was cached")
	}
}

// TestImageLogsToConfigLogger: the one line per image goes to
// Config.Logger, at info level, with the text operators and the
// integration tests look for; a logger set to warn drops it.
func TestImageLogsToConfigLogger(t *testing.T) {
	addr := registrytest.StartReferrersRegistry(t)
	md, _ := pushImage(t, addr, "app")
	labels := map[string]string{snapshotters.TargetManifestDigestLabel: md.String()}
	for _, level := range []logrus.Level{logrus.InfoLevel, logrus.WarnLevel} {
		var out bytes.Buffer
		logger := logrus.New()
		logger.SetOutput(&out)
		logger.SetLevel(level)
		r, err := New(Config{Root: t.TempDir(), FillRate: -1, Logger: logrus.NewEntry(logger)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if img := r.image(context.Background(), addr+"/app:v1", labels); !errors.Is(img.err, errNoIndex) {
			t.Fatalf("image without index: err = %v, want errNoIndex", img.err)
		}
		logged := out.String()
		if level == logrus.WarnLevel {
			if logged != "" {
				t.Fatalf("logged at level warn: %q", logged)
			}
			continue
		}
		for _, want := range []string{"spanpull: image is not lazy: pulled normally", "reason=", md.String()} {
			if !strings.Contains(logged, want) {
				t.Fatalf("log %q does not contain %q", logged, want)
			}
		}
	}
}
