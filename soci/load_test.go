package soci_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/registry/registrytest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// loadFixture is an image indexed with packs at packSpanSize, and the
// index as the snapshotter fetches it.
type loadFixture struct {
	addr   string
	layers []socitest.Layer
	ix     *index.Index
}

func newLoadFixture(t *testing.T, addr, repo string, opts soci.Options) loadFixture {
	t.Helper()
	layers := packLayers()
	socitest.PushImage(t, addr, repo, "v1", "linux/amd64", false, layers...)
	opts.MinLayerSize, opts.SpanSize = 1000, packSpanSize
	res := create(t, addr+"/"+repo+":v1", opts)
	ix, _, err := soci.FetchIndex(context.Background(), repoAt(t, addr, repo), ocispec.Descriptor{Digest: res.Platforms[0].Index.Digest})
	if err != nil {
		t.Fatal(err)
	}
	return loadFixture{addr: addr, layers: layers, ix: ix}
}

func repoAt(t *testing.T, addr, name string) *registry.Repository { return repo(t, addr+"/"+name) }

// ztocOf fetches the zTOC the index lists for layer l.
func (f loadFixture) ztocOf(t *testing.T, repo string, l socitest.Layer) (*ztoc.Ztoc, ocispec.Descriptor) {
	t.Helper()
	zd, ok := f.ix.Ztoc(l.Desc.Digest)
	if !ok {
		t.Fatalf("layer %s is not indexed", l.Desc.Digest)
	}
	return socitest.FetchZtoc(t, f.addr, repo, zd), zd
}

// TestLoadLayer loads layers the way the snapshotter does: from the pack
// head when there is one (far fewer bytes than the zTOC), with windows
// fetched lazily, verified and equal to the zTOC's; from the zTOC when the
// index has no pack or its pack is broken.
func TestLoadLayer(t *testing.T) {
	ctx := context.Background()
	up := registrytest.StartDistribution(t)
	proxy := socitest.StartProxy(t, up)
	f := newLoadFixture(t, proxy.Addr, "load", soci.Options{})
	r := repoAt(t, proxy.Addr, "load")
	gz, tarLayer := f.layers[0], f.layers[1]

	li, err := soci.LoadLayer(ctx, r, f.ix, gz.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	z, zd := f.ztocOf(t, "load", gz)
	head, windows, _ := f.ix.Pack(gz.Desc.Digest)
	if li.Head.Digest != head.Digest || li.ZtocDigest != zd.Digest || li.Fetched != head.Size || li.PackErr != nil || li.Windows == nil {
		t.Fatalf("LoadLayer = %+v; want head %s (%d bytes) for zTOC %s", li, head.Digest, head.Size, zd.Digest)
	}
	if li.Fetched*3 > zd.Size {
		t.Errorf("the head (%d bytes) is not much smaller than the zTOC (%d)", li.Fetched, zd.Size)
	}
	if li.Ztoc.Chunks == nil {
		t.Error("no chunk table")
	}
	want, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	spans, err := li.Ztoc.Spans()
	if err != nil || len(spans) != len(want) || len(spans) < 3 {
		t.Fatalf("%d spans (%v), the zTOC has %d", len(spans), err, len(want))
	}
	for i := range spans {
		if spans[i].Window != nil {
			t.Errorf("span %d of the head has a window", i)
		}
		for range 2 { // the second time from the cache
			w, err := li.Windows.Window(ctx, ztoc.SpanID(i))
			if err != nil || !bytes.Equal(w, want[i].Window) {
				t.Fatalf("window %d: %v (equal to the zTOC's: %v)", i, err, bytes.Equal(w, want[i].Window))
			}
		}
	}
	if got := li.Windows.Fetched(); got != windows.Size {
		t.Errorf("windows fetched: %d bytes, the blob has %d", got, windows.Size)
	}

	// A tar layer needs no windows: its head holds the whole zTOC.
	tl, err := soci.LoadLayer(ctx, r, f.ix, tarLayer.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	tz, tzd := f.ztocOf(t, "load", tarLayer)
	if tl.Windows != nil || tl.Head.Digest == "" {
		t.Errorf("tar layer: %+v", tl)
	}
	var tarFiles []ztoc.FileMetadata
	if err := tl.Files(func(f *ztoc.FileMetadata) error { tarFiles = append(tarFiles, *f); return nil }); err != nil || !reflect.DeepEqual(tarFiles, tz.Files) {
		t.Errorf("tar layer: the head's TOC is not the zTOC's (%v)", err)
	}
	if tl.Ztoc.Files != nil || tl.ZtocDigest != tzd.Digest {
		t.Errorf("tar layer: LoadLayer decoded the entries (%d) or names zTOC %s, want %s", len(tl.Ztoc.Files), tl.ZtocDigest, tzd.Digest)
	}

	if _, err := soci.LoadLayer(ctx, r, f.ix, socitest.GzipLayer(99, 1000, socitest.OCIGzip).Desc, 1<<30); !errors.Is(err, soci.ErrNotIndexed) {
		t.Errorf("an unindexed layer: %v", err)
	}

	// A corrupted windows blob fails the span whose window it hits, only.
	fresh, err := soci.LoadLayer(ctx, r, f.ix, gz.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	off, n := packHeadOf(t, proxy.Addr, "load", head).WindowRange(1)
	proxy.Corrupt(windows.Digest, off+n/2)
	if _, err := fresh.Windows.Window(ctx, 1); !errors.Is(err, ztoc.ErrWindowDigest) {
		t.Errorf("window 1 of a corrupted windows blob: %v", err)
	}
	for _, id := range []ztoc.SpanID{0, 2} {
		if w, err := fresh.Windows.Window(ctx, id); err != nil || !bytes.Equal(w, want[id].Window) {
			t.Errorf("window %d next to a corrupted one: %v", id, err)
		}
	}

	// A corrupted head: the zTOC is loaded instead, and the error kept.
	proxy.Corrupt(head.Digest, 10)
	fb, err := soci.LoadLayer(ctx, r, f.ix, gz.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if fb.PackErr == nil || fb.Windows != nil || fb.Head.Digest != "" || fb.Fetched != head.Size+zd.Size {
		t.Errorf("corrupted head: %+v", fb)
	}
	if digest.FromBytes(fb.Blob) != zd.Digest || digest.FromBytes(fb.TOC) != zd.Digest {
		t.Errorf("corrupted head: the zTOC was not loaded")
	}
}

// packHeadOf fetches and decodes a pack head.
func packHeadOf(t *testing.T, addr, repo string, d ocispec.Descriptor) *ztoc.PackHead {
	t.Helper()
	h, err := ztoc.UnmarshalPackHead(socitest.Blob(t, addr, repo, d.Digest))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestLoadLayerWithoutPack loads a layer of an index without packs: from
// its zTOC, windows included.
func TestLoadLayerWithoutPack(t *testing.T) {
	addr := registrytest.StartDistribution(t)
	f := newLoadFixture(t, addr, "nopack", soci.Options{NoPack: true})
	gz := f.layers[0]
	if _, _, ok := f.ix.Pack(gz.Desc.Digest); ok {
		t.Fatal("NoPack index has a pack")
	}
	li, err := soci.LoadLayer(context.Background(), repoAt(t, addr, "nopack"), f.ix, gz.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	z, zd := f.ztocOf(t, "nopack", gz)
	if li.Windows != nil || li.Head.Digest != "" || li.PackErr != nil || li.Fetched != zd.Size || li.ZtocDigest != zd.Digest {
		t.Errorf("LoadLayer = %+v, want the zTOC %s", li, zd.Digest)
	}
	var files []ztoc.FileMetadata
	if err := li.Files(func(f *ztoc.FileMetadata) error { files = append(files, *f); return nil }); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(files)
	want, _ := json.Marshal(z.Files)
	if spans, err := li.Ztoc.Spans(); err != nil || spans[1].Window == nil || !bytes.Equal(got, want) {
		t.Errorf("the zTOC loaded differs (%v)", err)
	}
	if _, err := soci.LoadLayer(context.Background(), repoAt(t, addr, "nopack"), f.ix, gz.Desc, zd.Size-1); err == nil {
		t.Error("a zTOC over the size limit was loaded")
	}
}

// TestLoadLayerDebian indexes the real Debian python layer and reports
// what a mount fetches: the head instead of the zTOC, and a window per
// span first read.
func TestLoadLayerDebian(t *testing.T) {
	data, err := os.ReadFile(layertest.DebianLayer(t))
	if err != nil {
		t.Fatal(err)
	}
	layer := socitest.NewLayer(socitest.OCIGzip, data, digest.FromString("unused diff id"), nil)
	addr := registrytest.StartDistribution(t)
	socitest.PushImage(t, addr, "debian", "v1", "linux/amd64", false, layer)
	res := create(t, addr+"/debian:v1", soci.Options{MinLayerSize: 1000})
	r := repoAt(t, addr, "debian")
	ix, _, err := soci.FetchIndex(context.Background(), r, ocispec.Descriptor{Digest: res.Platforms[0].Index.Digest})
	if err != nil {
		t.Fatal(err)
	}
	li, err := soci.LoadLayer(context.Background(), r, ix, layer.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	zd, _ := ix.Ztoc(layer.Desc.Digest)
	_, windows, _ := ix.Pack(layer.Desc.Digest)
	n := li.Ztoc.NumSpans()
	t.Logf("Debian python layer (%d bytes, %d spans of 4 MiB): zTOC %d bytes, head %d bytes (%.1f%%), windows %d bytes (%d per span)",
		len(data), n, zd.Size, li.Fetched, 100*float64(li.Fetched)/float64(zd.Size), windows.Size, windows.Size/int64(n))
	if li.Fetched*5 > zd.Size {
		t.Errorf("the head (%d bytes) is not much smaller than the zTOC (%d)", li.Fetched, zd.Size)
	}
	if _, err := li.Windows.Window(context.Background(), ztoc.SpanID(n/2)); err != nil {
		t.Fatal(err)
	}
}

// windowsFixture is a packed gzip layer in a registry behind a recording
// proxy, for the tests of soci.Windows.
type windowsFixture struct {
	proxy   *socitest.Proxy
	repo    string
	want    []ztoc.Span // with their windows
	head    *ztoc.PackHead
	windows ocispec.Descriptor
}

func newWindowsFixture(t *testing.T, repo string) windowsFixture {
	t.Helper()
	proxy := socitest.StartProxy(t, registrytest.StartDistribution(t))
	f := newLoadFixture(t, proxy.Addr, repo, soci.Options{})
	gz := f.layers[0]
	z, _ := f.ztocOf(t, repo, gz)
	want, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	li, err := soci.LoadLayer(context.Background(), repoAt(t, proxy.Addr, repo), f.ix, gz.Desc, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	head, windows, _ := f.ix.Pack(gz.Desc.Digest)
	if head.Digest == "" || li.Pack == nil {
		t.Fatal("no pack")
	}
	return windowsFixture{proxy: proxy, repo: repo, want: want, head: li.Pack, windows: windows}
}

// open returns a Windows of the layer that reads the registry at addr and
// keeps windows in dir (a second one over the same directory is as after a
// restart).
func (f windowsFixture) open(t *testing.T, addr, dir string) *soci.Windows {
	w := soci.NewWindows(repoAt(t, addr, f.repo), f.windows, f.head)
	w.KeepIn(dir)
	return w
}

// TestWindowsKeepIn: windows kept on disk serve without the registry (a
// second Windows over the same directory, as after a restart), a kept
// window that no longer matches the head is fetched again, and a window
// neither kept nor reachable fails.
func TestWindowsKeepIn(t *testing.T) {
	ctx := context.Background()
	f := newWindowsFixture(t, "keep")
	want, proxy, dir := f.want, f.proxy, t.TempDir()
	open := func(addr string) *soci.Windows { return f.open(t, addr, dir) }
	w := open(proxy.Addr)
	for i := 1; i < len(want); i++ {
		if b, err := w.Window(ctx, ztoc.SpanID(i)); err != nil || !bytes.Equal(b, want[i].Window) {
			t.Fatalf("window %d: %v", i, err)
		}
	}
	// A registry that is not there: every window comes from the disk.
	offline := open("127.0.0.1:1")
	for i := 1; i < len(want); i++ {
		if b, err := offline.Window(ctx, ztoc.SpanID(i)); err != nil || !bytes.Equal(b, want[i].Window) {
			t.Fatalf("kept window %d without the registry: %v", i, err)
		}
	}
	if offline.Fetched() != 0 {
		t.Errorf("%d bytes fetched for kept windows", offline.Fetched())
	}
	// A damaged kept window is not used: fetched again, and fixed on disk.
	if err := os.WriteFile(filepath.Join(dir, "1"), []byte("damaged"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := open("127.0.0.1:1").Window(ctx, 1); err == nil {
		t.Fatal("a damaged kept window was served without the registry")
	}
	fresh := open(proxy.Addr)
	if b, err := fresh.Window(ctx, 1); err != nil || !bytes.Equal(b, want[1].Window) || fresh.Fetched() == 0 {
		t.Fatalf("damaged kept window: %v, fetched %d bytes", err, fresh.Fetched())
	}
	if b, err := open("127.0.0.1:1").Window(ctx, 1); err != nil || !bytes.Equal(b, want[1].Window) {
		t.Fatalf("window 1 kept again after the refetch: %v", err)
	}
}

// TestWindowsKeepWindows: KeepWindows fetches the windows not kept yet in
// one range read of the windows blob, after which every window serves
// without the registry; with nothing missing it sends no request; a windows
// blob whose bytes do not match the head fails it.
func TestWindowsKeepWindows(t *testing.T) {
	ctx := context.Background()
	f := newWindowsFixture(t, "keepall")
	want, windows := f.want, f.windows
	gets := func() int {
		n := 0
		for _, r := range f.proxy.Requests() {
			if strings.HasPrefix(r, "GET ") && strings.Contains(r, windows.Digest.String()) {
				n++
			}
		}
		return n
	}
	var ids []ztoc.SpanID
	for _, s := range want {
		ids = append(ids, s.ID)
	}
	dir := t.TempDir()
	w := f.open(t, f.proxy.Addr, dir)
	if _, err := w.Window(ctx, 1); err != nil { // kept by a read first
		t.Fatal(err)
	}
	before := gets()
	if err := w.KeepWindows(ctx, ids); err != nil {
		t.Fatal(err)
	}
	if got := gets() - before; got != 1 {
		t.Errorf("KeepWindows of %d spans sent %d requests for the windows blob, want 1", len(ids), got)
	}
	offline := f.open(t, "127.0.0.1:1", dir)
	for i := range want {
		if b, err := offline.Window(ctx, ztoc.SpanID(i)); err != nil || !bytes.Equal(b, want[i].Window) {
			t.Fatalf("kept window %d without the registry: %v", i, err)
		}
	}
	if err := offline.KeepWindows(ctx, ids); err != nil || offline.Fetched() != 0 {
		t.Errorf("KeepWindows with every window kept: %v, %d bytes fetched", err, offline.Fetched())
	}
	off, _ := f.head.WindowRange(3)
	f.proxy.Corrupt(windows.Digest, off)
	if err := f.open(t, f.proxy.Addr, t.TempDir()).KeepWindows(ctx, ids); !errors.Is(err, ztoc.ErrWindowDigest) {
		t.Errorf("KeepWindows of a corrupted windows blob: %v, want %v", err, ztoc.ErrWindowDigest)
	}
}
