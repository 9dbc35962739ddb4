package ztoc

import (
	"bytes"
	"context"
	"crypto/sha256"
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
		vfCheckServes(t, z, blob, tarball)
	})
}

// vfCheckServes checks that z serves the layer blob whose tar stream is
// tarball: the same entries as archive/tar reads, the same file contents.
func vfCheckServes(t *testing.T, z *Ztoc, blob, tarball []byte) {
	t.Helper()
	entries, end, err := cfReadTarHeaders(tarball)
	if err != nil {
		t.Fatalf("VerifyLayer accepted a tar that archive/tar rejects: %v", err)
	}
	if z.UncompressedArchiveSize != end || z.CompressedArchiveSize != int64(len(blob)) {
		t.Fatalf("sizes %d/%d, the layer's %d/%d", z.CompressedArchiveSize, z.UncompressedArchiveSize, len(blob), end)
	}
	if len(z.Files) != len(entries) {
		t.Fatalf("TOC has %d entries, archive/tar reads %d", len(z.Files), len(entries))
	}
	r, err := cfNewReader(z, blob)
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range entries {
		f := &z.Files[i]
		if f.Name != e.name || f.Type != e.typ || f.UncompressedSize != e.size {
			t.Fatalf("entry %d: TOC %q %s %d bytes, archive/tar %q %s %d bytes", i, f.Name, f.Type, f.UncompressedSize, e.name, e.typ, e.size)
		}
		if f.Type != TypeReg || e.size > cfFuzzMaxFile {
			continue
		}
		h := sha256.New()
		if _, err := r.WriteFile(h, f); err != nil {
			t.Fatalf("WriteFile(%q): %v", f.Name, err)
		}
		if !bytes.Equal(h.Sum(nil), e.sum) {
			t.Fatalf("entry %d %q: contents through the zTOC differ from archive/tar's", i, f.Name)
		}
	}
}
