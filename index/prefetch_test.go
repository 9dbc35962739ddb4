package index

import (
	"encoding/json"
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/ztoc"
)

// The recorded order becomes runs of consecutive spans, ranked by first
// access (the priority), sorted by start span; SpanIDs restores the order.
func TestNewPrefetchArtifact(t *testing.T) {
	order := []ztoc.SpanID{5, 6, 7, 2, 3, 9}
	a, err := NewPrefetchArtifact(order)
	if err != nil {
		t.Fatal(err)
	}
	b, err := a.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	// SOCI's struct shape and field order; priority 0 omitted.
	want := `{"version":"1.0","prefetch_spans":[{"start_span":2,"end_span":3,"priority":1},{"start_span":5,"end_span":7},{"start_span":9,"end_span":9,"priority":2}]}`
	if string(b) != want {
		t.Fatalf("artifact\n got %s\nwant %s", b, want)
	}
	back, err := ParsePrefetch(b)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := back.SpanIDs(10)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ids, order) {
		t.Fatalf("SpanIDs = %v, want %v", ids, order)
	}
	if n := back.Spans(); n != len(order) {
		t.Fatalf("Spans() = %d, want %d", n, len(order))
	}
	if _, err := back.SpanIDs(9); err == nil || !strings.Contains(err.Error(), "beyond the layer's 9 spans") {
		t.Fatalf("SpanIDs past the layer: %v", err)
	}
}

// Any order of distinct spans survives the artifact; its ranges are sorted
// and never overlap.
func TestPrefetchArtifactRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		n := 1 + rng.IntN(64)
		order := make([]ztoc.SpanID, 0, n)
		for _, id := range rng.Perm(n + rng.IntN(20)) {
			if len(order) < n {
				order = append(order, ztoc.SpanID(id))
			}
		}
		if i%3 == 0 { // long ascending runs, as a sequential read gives
			slices.Sort(order)
		}
		a, err := NewPrefetchArtifact(order)
		if err != nil {
			t.Fatal(err)
		}
		for j := 1; j < len(a.PrefetchSpans); j++ {
			if a.PrefetchSpans[j].StartSpan <= a.PrefetchSpans[j-1].EndSpan {
				t.Fatalf("ranges not sorted or overlapping: %+v", a.PrefetchSpans)
			}
		}
		got, err := a.SpanIDs(100)
		if err != nil || !slices.Equal(got, order) {
			t.Fatalf("order %v: SpanIDs = %v, %v", order, got, err)
		}
	}
}

func TestNewPrefetchArtifactErrors(t *testing.T) {
	for _, tc := range []struct {
		order []ztoc.SpanID
		want  string
	}{
		{nil, "no spans"},
		{[]ztoc.SpanID{1, 2, 1}, "span 1 listed twice"},
		{[]ztoc.SpanID{-1}, "not a span ID"},
		{[]ztoc.SpanID{1 << 31}, "not a span ID"},
	} {
		if _, err := NewPrefetchArtifact(tc.order); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewPrefetchArtifact(%v) = %v, want %q", tc.order, err, tc.want)
		}
	}
}

// SOCI's reader rules, plus well-formed ranges.
func TestParsePrefetchErrors(t *testing.T) {
	for _, tc := range []struct {
		blob, want string
	}{
		{`{"version":"2.0","prefetch_spans":[{"start_span":0,"end_span":0}]}`, `version "2.0"`},
		{`{"prefetch_spans":[{"start_span":0,"end_span":0}]}`, `version ""`},
		{`{"version":"1.0","prefetch_spans":[]}`, "no spans"},
		{`{"version":"1.0"}`, "no spans"},
		{`{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":2}]}`, "bad range [3, 2]"},
		{`{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":2}]}`, "bad range [-1, 2]"},
		{`{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":4294967296}]}`, "bad range"},
		{`{"version":"1.0","prefetch_spans":[{"start_span":"a"}]}`, "cannot unmarshal"},
		{`not json`, "invalid character"},
		{strings.Repeat(" ", MaxPrefetchSize+1), "byte limit"},
	} {
		_, err := ParsePrefetch([]byte(tc.blob))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParsePrefetch(%.60s) = %v, want %q", tc.blob, err, tc.want)
		}
	}
	if _, err := ParsePrefetch([]byte(`{"version":"1.0","prefetch_spans":[]}`)); !errors.Is(err, ErrEmptyPrefetch) {
		t.Errorf("empty list: %v, want ErrEmptyPrefetch", err)
	}
	// SOCI's own artifacts (no priorities, overlapping ranges merged by its
	// runtime) read fine; unknown fields are ignored as SOCI does.
	a, err := ParsePrefetch([]byte(`{"version":"1.0","prefetch_spans":[{"start_span":4,"end_span":6},{"start_span":5,"end_span":8}],"x":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if ids, err := a.SpanIDs(9); err != nil || !slices.Equal(ids, []ztoc.SpanID{4, 5, 6, 7, 8}) || a.Spans() != 5 {
		t.Fatalf("SOCI artifact: %v %v, %d spans", ids, err, a.Spans())
	}
}

func TestValidatePrefetchName(t *testing.T) {
	for _, ok := range []string{"default", "batch-2", "a.b_c", "0", strings.Repeat("x", 128)} {
		if err := ValidatePrefetchName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-x", ".x", "a b", "a/b", "é", strings.Repeat("x", 129)} {
		if err := ValidatePrefetchName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func prefetchBlob(s string) ocispec.Descriptor {
	return ocispec.Descriptor{Digest: digest.FromString(s), Size: int64(len(s))}
}

// Named prefetch artifacts: annotated, parsed per name, selected by name
// or else the first; a v1 index says which index it supersedes.
func TestNamedPrefetches(t *testing.T) {
	old := digest.FromString("old index")
	opts := BuildOptions{Version: V1, Subject: testSubject(), Layers: testLayers(), Supersedes: old,
		Prefetches: []Prefetch{
			{LayerDigest: layer1, Blob: prefetchBlob("soci")},
			{LayerDigest: layer1, Name: "web", Blob: prefetchBlob("web1")},
			{LayerDigest: layer2, Name: "web", Blob: prefetchBlob("web2")},
			{LayerDigest: layer2, Name: "batch", Blob: prefetchBlob("batch2")},
		}}
	b, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := b.Manifest.Layers[3].Annotations; got[AnnotationPrefetchName] != "web" || got[AnnotationImageLayerDigest] != layer1.String() || len(got) != 2 {
		t.Fatalf("named prefetch descriptor annotations %v", got)
	}
	if _, ok := b.Manifest.Layers[2].Annotations[AnnotationPrefetchName]; ok {
		t.Fatal("an unnamed prefetch artifact got a name annotation")
	}
	ix, err := Parse(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if names := ix.PrefetchNames(); !slices.Equal(names, []string{"", "web", "batch"}) {
		t.Fatalf("PrefetchNames = %q", names)
	}
	if p, ok := ix.Prefetch("web", layer2); !ok || p.Blob.Digest != digest.FromString("web2") {
		t.Fatalf("Prefetch(web, layer2) = %+v %v", p, ok)
	}
	if _, ok := ix.Prefetch("batch", layer1); ok {
		t.Fatal("Prefetch(batch, layer1) found")
	}
	for want, got := range map[string]string{"batch": "batch", "web": "web", "": "", "nope": ""} {
		if name, ok := SelectPrefetch(ix, want); !ok || name != got {
			t.Errorf("SelectPrefetch(%q) = %q %v, want %q", want, name, ok, got)
		}
	}
	if ix.Supersedes() != old {
		t.Fatalf("Supersedes = %q", ix.Supersedes())
	}
	plain, err := Parse(mustBuild(t, BuildOptions{Version: V2, Layers: testLayers()}).Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := SelectPrefetch(plain, "web"); ok || plain.Supersedes() != "" {
		t.Fatal("an index without prefetch artifacts selected one, or supersedes something")
	}
}

func mustBuild(t *testing.T, opts BuildOptions) *Built {
	t.Helper()
	b, err := Build(opts)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestNamedPrefetchErrors(t *testing.T) {
	dup := []Prefetch{{LayerDigest: layer1, Name: "a", Blob: prefetchBlob("1")}, {LayerDigest: layer1, Name: "a", Blob: prefetchBlob("2")}}
	if _, err := Build(BuildOptions{Version: V2, Layers: testLayers(), Prefetches: dup}); err == nil || !strings.Contains(err.Error(), `two prefetch artifacts named "a"`) {
		t.Errorf("duplicate: %v", err)
	}
	bad := []Prefetch{{LayerDigest: layer1, Name: "a b", Blob: prefetchBlob("1")}}
	if _, err := Build(BuildOptions{Version: V2, Layers: testLayers(), Prefetches: bad}); err == nil || !strings.Contains(err.Error(), "prefetch name") {
		t.Errorf("bad name: %v", err)
	}
	if _, err := Build(BuildOptions{Version: V2, Layers: testLayers(), Supersedes: digest.FromString("x")}); err == nil {
		t.Error("a v2 index superseding another: no error")
	}
	// Parse keeps the first of two artifacts of one name for one layer.
	b := mustBuild(t, BuildOptions{Version: V2, Layers: testLayers(), Prefetches: dup[:1]})
	var m ocispec.Manifest
	if err := json.Unmarshal(b.Bytes, &m); err != nil {
		t.Fatal(err)
	}
	second := m.Layers[len(m.Layers)-1]
	second.Digest = digest.FromString("2")
	m.Layers = append(m.Layers, second)
	raw, _ := json.Marshal(m)
	ix, err := Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := ix.Prefetch("a", layer1); len(ix.Prefetches) != 1 || p.Blob.Digest != dup[0].Blob.Digest {
		t.Fatalf("prefetches %+v", ix.Prefetches)
	}
}
