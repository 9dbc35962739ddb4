package ztoc

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// FuzzVerifyLayer feeds VerifyLayer an arbitrary blob and an arbitrary
// zTOC, with the blob's own digests as the image's. Properties: it never
// panics or hangs; and when it accepts, the zTOC serves exactly the layer:
// its entries are archive/tar's reading of the layer and every regular
// file read through it equals archive/tar's contents. Seeds: tiny layers
// and their zTOCs (testdata/fuzz/FuzzVerifyLayer).
func FuzzVerifyLayer(f *testing.F) {
	f.Fuzz(func(t *testing.T, blob, zb []byte) {
		z, err := Unmarshal(zb)
		if err != nil {
			return
		}
		tarball := blob
		if bytes.HasPrefix(blob, gzipMagic) {
			if tarball, err = cfBufferedGunzip(blob); err != nil {
				tarball = nil
			}
		}
		want := LayerDigests{Blob: digest.FromBytes(blob), DiffID: digest.FromBytes(tarball)}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err = VerifyLayer(ctx, bytes.NewReader(blob), z, want)
		if ctx.Err() != nil {
			t.Fatalf("VerifyLayer hung: %v", err)
		}
		if err != nil {
			return
		}
		if tarball == nil {
			t.Fatal("VerifyLayer accepted gzip data that compress/gzip rejects")
		}
		cfCheckServes(t, "VerifyLayer", z, blob, tarball)
	})
}
