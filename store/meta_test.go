package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/internal/testutil/dirtest"
)

func remote(key string, ztocBlob []byte) RemoteLayer {
	return RemoteLayer{
		Key:         key,
		LayerDigest: digest.FromString("layer of " + key),
		ZtocDigest:  digest.FromBytes(ztocBlob),
		IndexDigest: digest.FromString("index"),
		ImageRef:    "127.0.0.1:5000/img:tag",
		Mountpoint:  "/var/lib/spanpull/snapshots/" + key + "/fs",
	}
}

// openMeta opens the metadata store under root.
func openMeta(t *testing.T, root string) *MetaStore {
	t.Helper()
	m, err := OpenMetaStore(root)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestMetaStore(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m := openMeta(t, root)
	z1, z2 := []byte("ztoc one"), []byte("ztoc two")
	l1, l2, l3 := remote("k1", z1), remote("k2", z1), remote("k3", z2)
	for _, l := range []RemoteLayer{l3, l1, l2} {
		if err := m.PutLayer(ctx, l, map[string][]byte{"k1": z1, "k2": z1, "k3": z2}[l.Key]); err != nil {
			t.Fatal(err)
		}
	}
	got, err := m.GetLayer(ctx, "k3")
	if err != nil || got != l3 {
		t.Errorf("GetLayer = %+v, %v", got, err)
	}
	if _, err := m.GetLayer(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetLayer of a missing key = %v", err)
	}
	ls, err := m.ListLayers(ctx)
	if err != nil || len(ls) != 3 || ls[0] != l1 || ls[1] != l2 || ls[2] != l3 {
		t.Errorf("ListLayers = %+v, %v", ls, err)
	}
	if b, err := m.Ztoc(ctx, l1.ZtocDigest); err != nil || string(b) != "ztoc one" {
		t.Errorf("Ztoc = %q, %v", b, err)
	}

	// A restart finds everything again.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m = openMeta(t, root)
	defer m.Close()
	ls2, err := m.ListLayers(ctx)
	if err != nil || fmt.Sprint(ls2) != fmt.Sprint(ls) {
		t.Errorf("after reopening: %+v, %v", ls2, err)
	}
	if b, err := m.Ztoc(ctx, l3.ZtocDigest); err != nil || string(b) != "ztoc two" {
		t.Errorf("Ztoc after reopening = %q, %v", b, err)
	}

	// A zTOC goes with the last layer that uses it.
	if err := m.DeleteLayer(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Ztoc(ctx, l1.ZtocDigest); err != nil {
		t.Errorf("zTOC still used by k2 was deleted: %v", err)
	}
	if err := m.DeleteLayer(ctx, "k2"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Ztoc(ctx, l1.ZtocDigest); !errors.Is(err, ErrNotFound) {
		t.Errorf("unused zTOC = %v, want ErrNotFound", err)
	}
	if err := m.DeleteLayer(ctx, "k2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleting again = %v, want ErrNotFound", err)
	}
	// Re-recording a key with another zTOC drops the old one.
	l3b := remote("k3", z1)
	if err := m.PutLayer(ctx, l3b, z1); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Ztoc(ctx, l3.ZtocDigest); !errors.Is(err, ErrNotFound) {
		t.Errorf("replaced zTOC = %v, want ErrNotFound", err)
	}
	if err := m.DeleteLayer(ctx, "k3"); err != nil {
		t.Fatal(err)
	}
	if got := dirtest.Files(t, filepath.Join(root, "ztocs")); len(got) != 0 {
		t.Errorf("zTOC files left: %v", got)
	}
}

func TestMetaStoreBadInput(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	m := openMeta(t, root)
	defer m.Close()
	z := []byte("ztoc")
	for name, tc := range map[string]struct {
		l    RemoteLayer
		blob []byte
		want string
	}{
		"no key":         {func() RemoteLayer { l := remote("k", z); l.Key = ""; return l }(), z, "empty snapshot key"},
		"bad layer":      {func() RemoteLayer { l := remote("k", z); l.LayerDigest = "sha256:zz"; return l }(), z, "layer digest"},
		"no index":       {func() RemoteLayer { l := remote("k", z); l.IndexDigest = ""; return l }(), z, "index digest"},
		"path in digest": {func() RemoteLayer { l := remote("k", z); l.ZtocDigest = "sha256:../../x"; return l }(), z, "zTOC digest"},
		"wrong blob":     {remote("k", z), []byte("other"), "zTOC blob has digest"},
	} {
		if err := m.PutLayer(ctx, tc.l, tc.blob); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: PutLayer = %v, want an error about %q", name, err, tc.want)
		}
	}
	if ls, _ := m.ListLayers(ctx); len(ls) != 0 {
		t.Errorf("bad records were stored: %v", ls)
	}
	// A damaged zTOC file is detected, and heals when stored again.
	l := remote("k", z)
	if err := m.PutLayer(ctx, l, z); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "ztocs", l.ZtocDigest.Encoded()), []byte("zt0c"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Ztoc(ctx, l.ZtocDigest); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("damaged zTOC read = %v", err)
	}
	if err := m.PutLayer(ctx, l, z); err != nil {
		t.Fatal(err)
	}
	if b, err := m.Ztoc(ctx, l.ZtocDigest); err != nil || string(b) != "ztoc" {
		t.Errorf("healed zTOC = %q, %v", b, err)
	}
	if _, err := m.Ztoc(ctx, "sha256:nothex"); err == nil {
		t.Error("Ztoc accepted a bad digest")
	}
	// A second process cannot open the same database.
	if _, err := OpenMetaStore(root); err == nil {
		t.Error("second OpenMetaStore of a locked database succeeded")
	}
}

// TestMetaStoreConcurrent records and deletes layers sharing zTOCs from
// many goroutines: a recorded layer always finds its zTOC.
func TestMetaStoreConcurrent(t *testing.T) {
	ctx := context.Background()
	m := openMeta(t, t.TempDir())
	defer m.Close()
	blobs := [][]byte{[]byte("z0"), []byte("z1"), []byte("z2")}
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Go(func() {
			for i := range 40 {
				key := fmt.Sprintf("k%d-%d", g, i%4)
				blob := blobs[(g+i)%3]
				if i%3 == 2 {
					if err := m.DeleteLayer(ctx, key); err != nil && !errors.Is(err, ErrNotFound) {
						t.Error(err)
					}
					continue
				}
				l := remote(key, blob)
				if err := m.PutLayer(ctx, l, blob); err != nil {
					t.Error(err)
					continue
				}
				if _, err := m.Ztoc(ctx, l.ZtocDigest); err != nil {
					// another goroutine may have replaced the
					// record already; only a live record counts
					if cur, gerr := m.GetLayer(ctx, key); gerr == nil && cur.ZtocDigest == l.ZtocDigest {
						t.Errorf("%s: %v", key, err)
					}
				}
			}
		})
	}
	wg.Wait()
	ls, err := m.ListLayers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		if _, err := m.Ztoc(ctx, l.ZtocDigest); err != nil {
			t.Errorf("%s: zTOC missing: %v", l.Key, err)
		}
	}
}
