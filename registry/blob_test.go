package registry_test

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
)

func TestFetchBlobBytes(t *testing.T) {
	addr := registrytest.StartReferrersRegistry(t)
	data := []byte("twelve bytes")
	registrytest.PushBlob(t, addr, "app", data)
	repo := newRepo(t, addr, "app", registry.Options{PlainHTTP: true})
	ctx := context.Background()
	desc, err := repo.ResolveBlob(ctx, digest.FromBytes(data))
	if err != nil {
		t.Fatal(err)
	}
	if desc.Size != int64(len(data)) {
		t.Fatalf("ResolveBlob size %d, want %d", desc.Size, len(data))
	}
	b, err := repo.FetchBlobBytes(ctx, desc, int64(len(data)))
	if err != nil || !bytes.Equal(b, data) {
		t.Fatalf("FetchBlobBytes = %q, %v", b, err)
	}
	if _, err := repo.FetchBlobBytes(ctx, desc, int64(len(data))-1); err == nil || !strings.Contains(err.Error(), "allowed") {
		t.Fatalf("over the limit: err = %v, want a refusal", err)
	}
	// A descriptor that lies about the size is caught by verification.
	lie := ocispec.Descriptor{Digest: desc.Digest, Size: desc.Size - 1}
	if _, err := repo.FetchBlobBytes(ctx, lie, 100); err == nil {
		t.Fatal("a blob longer than its descriptor was accepted")
	}
}
