package record

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

var testImage = Image{Reference: "registry.example.com/app:1.2", Manifest: testManifest}

// nodePaths is a layer filesystem of n nodes whose node i is /f<i>; it
// counts the Path calls per node.
type nodePaths struct {
	mu    sync.Mutex
	calls map[uint64]int
}

func (p *nodePaths) path(node uint64) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.calls == nil {
		p.calls = map[uint64]int{}
	}
	p.calls[node]++
	return fmt.Sprintf("f%d", node)
}

// First accesses are recorded once each, in order, with non-decreasing
// times; IDs outside the layer are ignored; the record round-trips.
func TestLayerRecorder(t *testing.T) {
	s := NewStore(Options{})
	defer s.Close()
	var paths nodePaths
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 10, Nodes: 4, Path: paths.path})
	for _, id := range []ztoc.SpanID{5, 5, 2, 9, 10, -1, 2, 0} {
		l.Span(id)
	}
	for _, n := range []uint64{3, 3, 1, 200, 200, 3} {
		l.Node(n)
	}
	l.File("./etc/passwd")
	l.File("/etc/passwd")
	rec, err := s.Record(testImage.Reference, "")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Name != DefaultName || rec.Image != testImage || len(rec.Layers) != 1 {
		t.Fatalf("record %+v", rec)
	}
	got := rec.Layers[0]
	if ids := got.SpanIDs(); !slices.Equal(ids, []ztoc.SpanID{5, 2, 9, 0}) {
		t.Fatalf("spans %v", ids)
	}
	var files []string
	for _, f := range got.Files {
		files = append(files, f.Path)
	}
	if !slices.Equal(files, []string{"/f3", "/f1", "/f200", "/etc/passwd"}) {
		t.Fatalf("files %v", files)
	}
	if paths.calls[3] != 1 || paths.calls[200] != 1 {
		t.Fatalf("Path called %v times per node, want once", paths.calls)
	}
	if err := rec.Validate(); err != nil {
		t.Fatalf("the recorder's record does not validate: %v", err)
	}
}

// A nil store and a nil recorder record nothing and do not crash.
func TestNilRecorder(t *testing.T) {
	var s *Store
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 1})
	l.Span(0)
	l.Node(1)
	l.File("x")
	l.Freeze()
	if !l.Frozen() {
		t.Fatal("a nil recorder is not frozen")
	}
	if _, err := s.Record("x", ""); err == nil {
		t.Fatal("record from a nil store")
	}
	s.Close()
}

// The window freezes a layer; when every layer of the image froze, the
// image's record is reported complete, once.
func TestWindow(t *testing.T) {
	frozen := make(chan Image, 4)
	s := NewStore(Options{Window: 100 * time.Millisecond, OnFrozen: func(img Image) { frozen <- img }})
	defer s.Close()
	a := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 4})
	b := s.Layer(testImage, LayerInfo{Digest: testLayer2, Spans: 4})
	a.Span(1)
	b.Freeze() // unmounted early
	select {
	case img := <-frozen:
		t.Fatalf("image %v reported frozen with a live layer", img)
	case <-time.After(20 * time.Millisecond):
	}
	select {
	case img := <-frozen:
		if img != testImage {
			t.Fatalf("frozen image %v", img)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the window did not freeze the record")
	}
	if !a.Frozen() {
		t.Fatal("layer not frozen after its window")
	}
	a.Span(2) // after the window: ignored
	rec, err := s.Record(testImage.Manifest.String(), "late")
	if err != nil {
		t.Fatal(err)
	}
	if ids := rec.Layers[0].SpanIDs(); !slices.Equal(ids, []ztoc.SpanID{1}) || rec.Name != "late" {
		t.Fatalf("record after the window: %v, name %q", ids, rec.Name)
	}
	select {
	case <-frozen:
		t.Fatal("frozen reported twice")
	case <-time.After(150 * time.Millisecond):
	}
	// A new mount of the layer after it froze records afresh.
	a2 := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 4})
	if a2 == a || a2.Frozen() {
		t.Fatal("a new mount got the frozen recorder")
	}
	a2.Span(3)
	rec, _ = s.Record(testImage.Reference, "")
	if len(rec.Layers) != 2 || rec.Layers[1].Digest != testLayer1 || !slices.Equal(rec.Layers[1].SpanIDs(), []ztoc.SpanID{3}) {
		t.Fatalf("record after a new mount: %+v", rec.Layers)
	}
}

// The entry bound freezes a layer: spans and files count together.
func TestMaxEntries(t *testing.T) {
	frozen := make(chan Image, 1)
	s := NewStore(Options{MaxEntries: 3, OnFrozen: func(img Image) { frozen <- img }})
	defer s.Close()
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 100})
	if again := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 100}); again != l {
		t.Fatal("a live layer got a second recorder")
	}
	l.Span(0)
	l.File("a")
	l.Span(1)
	l.Span(2)
	l.File("b")
	select {
	case <-frozen:
	case <-time.After(5 * time.Second):
		t.Fatal("the entry bound did not freeze the record")
	}
	rec, _ := s.Record(testImage.Reference, "")
	if n := len(rec.Layers[0].Spans) + len(rec.Layers[0].Files); n != 3 {
		t.Fatalf("%d entries recorded, want 3", n)
	}
}

// Many goroutines hit the hot path at once (run with -race): every ID is
// recorded exactly once.
func TestConcurrentAccess(t *testing.T) {
	s := NewStore(Options{})
	defer s.Close()
	var paths nodePaths
	const spans, nodes = 500, 300
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: spans, Nodes: nodes, Path: paths.path})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range spans {
				l.Span(ztoc.SpanID((i * (g + 1)) % spans))
				l.Node(uint64(i % (nodes + 50)))
			}
		})
	}
	wg.Go(func() {
		for range 50 {
			if _, err := s.Record(testImage.Reference, ""); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	rec, err := s.Record(testImage.Reference, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Validate(); err != nil {
		t.Fatal(err)
	}
	if n := len(rec.Layers[0].Spans); n != spans {
		t.Fatalf("%d spans recorded, want %d", n, spans)
	}
	if n := len(rec.Layers[0].Files); n != nodes+50 {
		t.Fatalf("%d files recorded, want %d", n, nodes+50)
	}
}

// Records are found by reference (short or long Docker Hub form) or
// manifest digest, the latest image first; the oldest images are dropped.
func TestStoreLookup(t *testing.T) {
	s := NewStore(Options{})
	defer s.Close()
	hub := Image{Reference: "docker.io/library/python:3.12", Manifest: digest.FromString("py")}
	s.Layer(hub, LayerInfo{Digest: testLayer1, Spans: 1}).Span(0)
	for _, q := range []string{"python:3.12", "docker.io/library/python:3.12", hub.Manifest.String()} {
		if rec, err := s.Record(q, ""); err != nil || rec.Image != hub {
			t.Errorf("Record(%q) = %v, %v", q, rec, err)
		}
	}
	for _, q := range []string{"python:3.11", "python", digest.FromString("other").String(), "::"} {
		if _, err := s.Record(q, ""); err == nil {
			t.Errorf("Record(%q) found a record", q)
		}
	}
	for i := range maxImages {
		s.Layer(Image{Reference: fmt.Sprintf("r/%d", i), Manifest: digest.FromString(fmt.Sprint(i))}, LayerInfo{Digest: testLayer1})
	}
	if _, err := s.Record("python:3.12", ""); err == nil {
		t.Fatal("the oldest image was not dropped")
	}
	if _, err := s.Record("r/0", ""); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if l := s.Layer(hub, LayerInfo{Digest: testLayer1}); l != nil {
		t.Fatal("a closed store made a recorder")
	}
}

func TestConfig(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if o := c.Options(); o.Window != DefaultWindow || o.MaxEntries != DefaultMaxEntries {
		t.Fatalf("options %+v", o)
	}
	for _, bad := range []Config{{WindowSeconds: 0, MaxEntries: 1}, {WindowSeconds: 1, MaxEntries: -1}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// Range records the spans a read of the tar stream covers.
func TestRange(t *testing.T) {
	s := NewStore(Options{})
	defer s.Close()
	spans := []ztoc.Span{
		{ID: 0, UncompressedStart: 0, UncompressedEnd: 100},
		{ID: 1, UncompressedStart: 100, UncompressedEnd: 200},
		{ID: 2, UncompressedStart: 200, UncompressedEnd: 300},
		{ID: 3, UncompressedStart: 300, UncompressedEnd: 350},
	}
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: len(spans)})
	l.Range(spans, 250, 100) // spans 2, 3
	l.Range(spans, 99, 2)    // spans 0, 1
	l.Range(spans, 120, 0)   // nothing
	l.Range(spans, 400, 10)  // past the stream
	l.Range(spans, 150, 10)  // span 1 again
	rec, _ := s.Record(testImage.Reference, "")
	if ids := rec.Layers[0].SpanIDs(); !slices.Equal(ids, []ztoc.SpanID{2, 3, 0, 1}) {
		t.Fatalf("spans %v", ids)
	}
}
