package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestZtocCache(t *testing.T) {
	dir := t.TempDir()
	c, err := OpenZtocCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	layer := digest.FromString("layer")
	blob := []byte("a zTOC")
	if _, _, ok, err := c.Get(layer, 4<<20); ok || err != nil {
		t.Fatalf("empty cache: ok=%v err=%v", ok, err)
	}
	if err := c.Put(layer, 4<<20, blob); err != nil {
		t.Fatal(err)
	}
	b, d, ok, err := c.Get(layer, 4<<20)
	if err != nil || !ok || !bytes.Equal(b, blob) || d != digest.FromBytes(blob) {
		t.Fatalf("Get = %q, %s, %v, %v; want the stored zTOC", b, d, ok, err)
	}
	if _, _, ok, _ := c.Get(layer, 1<<20); ok {
		t.Fatal("a zTOC built at another span size was returned")
	}
	// A damaged blob is a miss, never returned.
	if err := os.WriteFile(filepath.Join(dir, "blobs", digest.FromBytes(blob).Encoded()), []byte("damaged"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, ok, err := c.Get(layer, 4<<20); ok || err != nil {
		t.Fatalf("damaged blob: ok=%v err=%v, want a miss", ok, err)
	}
}

func TestZtocCachePacks(t *testing.T) {
	dir := t.TempDir()
	c, err := OpenZtocCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	z := digest.FromString("a zTOC")
	if _, _, ok, err := c.GetPack(z); ok || err != nil {
		t.Fatalf("empty cache: ok=%v err=%v", ok, err)
	}
	head, windows := []byte("a head"), []byte("windows")
	if err := c.PutPack(z, head, windows); err != nil {
		t.Fatal(err)
	}
	h, w, ok, err := c.GetPack(z)
	if err != nil || !ok || !bytes.Equal(h, head) || !bytes.Equal(w, windows) {
		t.Fatalf("GetPack = %q, %q, %v, %v", h, w, ok, err)
	}
	// A pack without windows (a tar layer) and a replaced pack.
	if err := c.PutPack(z, []byte("another head"), nil); err != nil {
		t.Fatal(err)
	}
	if h, w, ok, err := c.GetPack(z); err != nil || !ok || string(h) != "another head" || len(w) != 0 {
		t.Fatalf("GetPack after replace = %q, %q, %v, %v", h, w, ok, err)
	}
	// The pack survives reopening; a damaged blob is a miss.
	c.Close()
	if c, err = OpenZtocCache(dir); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, _, ok, err := c.GetPack(z); !ok || err != nil {
		t.Fatalf("after reopen: ok=%v err=%v", ok, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "blobs", digest.FromString("another head").Encoded()), []byte("damaged"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, ok, err := c.GetPack(z); ok || err != nil {
		t.Fatalf("damaged head: ok=%v err=%v, want a miss", ok, err)
	}
}
