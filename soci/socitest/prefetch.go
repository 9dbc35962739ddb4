package socitest

import (
	"bytes"
	"encoding/json"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
)

// PrefetchDescriptors returns the prefetch descriptors of an index.
func PrefetchDescriptors(m ocispec.Manifest) []ocispec.Descriptor {
	var out []ocispec.Descriptor
	for _, d := range m.Layers {
		if d.MediaType == index.MediaTypePrefetch {
			out = append(out, d)
		}
	}
	return out
}

// SOCIPrefetchSpan is a range of a prefetch artifact as SOCI declares it.
type SOCIPrefetchSpan struct {
	StartSpan int32 `json:"start_span"`
	EndSpan   int32 `json:"end_span"`
	Priority  int   `json:"priority,omitempty"`
}

// CheckPrefetchBlob decodes prefetch blob b with SOCI-FORMAT.md §1.10's
// rules, independently of package index: SOCI's JSON shape and nothing
// else (compact encoding/json, as SOCI marshals it), version "1.0", a
// non-empty list of inclusive int32 ranges sorted by start span, none
// overlapping, and adjacent ones merged unless their priorities differ
// (spanpull keeps the recorded order as priorities, lower first). It
// returns the ranges.
func CheckPrefetchBlob(t testing.TB, b []byte) []SOCIPrefetchSpan {
	t.Helper()
	var a struct {
		Version       string             `json:"version"`
		PrefetchSpans []SOCIPrefetchSpan `json:"prefetch_spans"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		t.Fatalf("prefetch blob %s: %v", b, err)
	}
	if re, _ := json.Marshal(a); !bytes.Equal(re, b) {
		t.Errorf("prefetch blob is not SOCI's encoding:\n got %s\nwant %s", b, re)
	}
	if a.Version != "1.0" {
		t.Errorf("prefetch blob version %q, SOCI reads only 1.0", a.Version)
	}
	if len(a.PrefetchSpans) == 0 {
		t.Fatalf("prefetch blob with an empty list: SOCI rejects it: %s", b)
	}
	for i, r := range a.PrefetchSpans {
		if r.StartSpan < 0 || r.EndSpan < r.StartSpan || r.Priority < 0 {
			t.Errorf("prefetch_spans[%d] = %+v", i, r)
		}
		if i == 0 {
			continue
		}
		prev := a.PrefetchSpans[i-1]
		switch {
		case r.StartSpan <= prev.EndSpan:
			t.Errorf("prefetch_spans[%d] %+v is not sorted after, or overlaps, %+v", i, r, prev)
		case r.StartSpan == prev.EndSpan+1 && r.Priority == prev.Priority:
			t.Errorf("prefetch_spans[%d] %+v is adjacent to %+v with the same priority: not merged", i, r, prev)
		}
	}
	return a.PrefetchSpans
}
