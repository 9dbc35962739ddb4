package index

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"sort"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// Prefetch artifacts (SOCI-FORMAT.md §1.10) list, per layer, the spans a
// runtime fetches ahead of the container's own reads. SOCI builds them from
// a hand-written file list, one per layer, all of equal priority; spanpull
// also builds them from an access record (package record), several per
// layer (one per workload, told apart by AnnotationPrefetchName), with the
// recorded order kept as priority.
const (
	// PrefetchVersion is the only prefetch artifact version SOCI writes and
	// reads.
	PrefetchVersion = "1.0"
	// AnnotationPrefetchName names the workload a prefetch descriptor was
	// recorded for ("default", "batch", ...). SOCI's own artifacts have
	// none; their name is "". A runtime picks one name per image
	// (SelectPrefetch).
	AnnotationPrefetchName = "dev.spanpull.prefetch.name"
	// AnnotationSupersedes, on a SOCI index v1 manifest, names the index v1
	// of the same image manifest it replaces (it lists the same zTOCs plus
	// more prefetch artifacts). Registries copy a referrer's manifest
	// annotations into its referrers descriptor, so discovery can leave the
	// replaced index out without fetching it; a registry cannot always
	// delete it.
	AnnotationSupersedes = "dev.spanpull.supersedes"
	// MaxPrefetchSize bounds the prefetch blob bytes ParsePrefetch accepts:
	// a range is about 50 bytes, so this allows tens of thousands.
	MaxPrefetchSize = 4 << 20
	// maxPrefetchNameLen bounds a prefetch name.
	maxPrefetchNameLen = 128
)

// ErrEmptyPrefetch is returned for a prefetch artifact that lists no span:
// SOCI refuses to write or read one.
var ErrEmptyPrefetch = errors.New("prefetch artifact lists no spans")

// PrefetchArtifact is the content of a prefetch blob, in SOCI's JSON shape.
type PrefetchArtifact struct {
	// Version is PrefetchVersion.
	Version string `json:"version"`
	// PrefetchSpans are inclusive span ranges sorted by StartSpan.
	PrefetchSpans []PrefetchSpan `json:"prefetch_spans"`
}

// PrefetchSpan is an inclusive range of span IDs of one layer.
type PrefetchSpan struct {
	StartSpan ztoc.SpanID `json:"start_span"`
	EndSpan   ztoc.SpanID `json:"end_span"`
	// Priority orders the fetches: lower values first (SOCI's convention;
	// omitted when 0). Within a range, spans go in ascending order.
	Priority int `json:"priority,omitempty"`
}

// NewPrefetchArtifact returns the artifact that fetches the spans of order
// in that order. Each run of consecutive ascending span IDs in order
// becomes one range whose priority is the run's rank (0 for the first), and
// the ranges are sorted by StartSpan, as SOCI's readers expect. SpanIDs
// gives order back. IDs must be unique and within int32 (SOCI's span ID).
func NewPrefetchArtifact(order []ztoc.SpanID) (*PrefetchArtifact, error) {
	if len(order) == 0 {
		return nil, ErrEmptyPrefetch
	}
	seen := make(map[ztoc.SpanID]bool, len(order))
	a := &PrefetchArtifact{Version: PrefetchVersion}
	for i, id := range order {
		if id < 0 || id > math.MaxInt32 {
			return nil, fmt.Errorf("prefetch: span %d is not a span ID", id)
		}
		if seen[id] {
			return nil, fmt.Errorf("prefetch: span %d listed twice", id)
		}
		seen[id] = true
		if n := len(a.PrefetchSpans); i > 0 && id == order[i-1]+1 {
			a.PrefetchSpans[n-1].EndSpan = id
			continue
		}
		a.PrefetchSpans = append(a.PrefetchSpans, PrefetchSpan{StartSpan: id, EndSpan: id, Priority: len(a.PrefetchSpans)})
	}
	sort.Slice(a.PrefetchSpans, func(i, j int) bool { return a.PrefetchSpans[i].StartSpan < a.PrefetchSpans[j].StartSpan })
	return a, nil
}

// Marshal returns the blob bytes of a: compact encoding/json, as SOCI
// writes them.
func (a *PrefetchArtifact) Marshal() ([]byte, error) {
	if err := a.check(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(a)
	if err != nil {
		return nil, fmt.Errorf("prefetch: marshal: %w", err)
	}
	return b, nil
}

// ParsePrefetch decodes a prefetch blob with SOCI's reader rules (version
// "1.0", at least one range) plus well-formed ranges: 0 <= start <= end
// within int32. Unknown fields are ignored, as SOCI does.
func ParsePrefetch(b []byte) (*PrefetchArtifact, error) {
	if len(b) > MaxPrefetchSize {
		return nil, fmt.Errorf("prefetch: %d bytes exceeds the %d byte limit", len(b), MaxPrefetchSize)
	}
	var a PrefetchArtifact
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("prefetch: %w", err)
	}
	if err := a.check(); err != nil {
		return nil, err
	}
	return &a, nil
}

// check applies ParsePrefetch's rules.
func (a *PrefetchArtifact) check() error {
	if a.Version != PrefetchVersion {
		return fmt.Errorf("prefetch: version %q, want %q", a.Version, PrefetchVersion)
	}
	if len(a.PrefetchSpans) == 0 {
		return fmt.Errorf("prefetch: %w", ErrEmptyPrefetch)
	}
	for i, r := range a.PrefetchSpans {
		if r.StartSpan < 0 || r.EndSpan < r.StartSpan || r.EndSpan > math.MaxInt32 {
			return fmt.Errorf("prefetch: prefetch_spans[%d]: bad range [%d, %d]", i, r.StartSpan, r.EndSpan)
		}
	}
	return nil
}

// Spans returns how many distinct spans the artifact names.
func (a *PrefetchArtifact) Spans() int {
	rs := slices.Clone(a.PrefetchSpans)
	sort.Slice(rs, func(i, j int) bool { return rs[i].StartSpan < rs[j].StartSpan })
	n, next := 0, ztoc.SpanID(0)
	for _, r := range rs {
		start := max(r.StartSpan, next)
		if r.EndSpan >= start {
			n += int(r.EndSpan-start) + 1
			next = r.EndSpan + 1
		}
	}
	return n
}

// SpanIDs returns the spans to fetch in order: ranges by ascending
// priority (equal priorities in artifact order), each range in ascending
// span order, every span once. A range past the layer's numSpans spans is
// an error (the artifact is not for this layer, or is corrupt).
func (a *PrefetchArtifact) SpanIDs(numSpans int) ([]ztoc.SpanID, error) {
	rs := slices.Clone(a.PrefetchSpans)
	for _, r := range rs {
		if int64(r.EndSpan) >= int64(numSpans) {
			return nil, fmt.Errorf("prefetch: range [%d, %d] is beyond the layer's %d spans", r.StartSpan, r.EndSpan, numSpans)
		}
	}
	sort.SliceStable(rs, func(i, j int) bool { return rs[i].Priority < rs[j].Priority })
	seen := make([]bool, numSpans)
	var out []ztoc.SpanID
	for _, r := range rs {
		for id := r.StartSpan; id <= r.EndSpan; id++ {
			if !seen[id] {
				seen[id] = true
				out = append(out, id)
			}
		}
	}
	return out, nil
}

// prefetchNameRE is what a prefetch name may look like: it ends up in
// annotations, file names and command lines.
var prefetchNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// ValidatePrefetchName checks a workload name for prefetch artifacts and
// access records: a letter or digit, then letters, digits, '.', '_' or
// '-', at most 128 characters.
func ValidatePrefetchName(name string) error {
	if len(name) > maxPrefetchNameLen || !prefetchNameRE.MatchString(name) {
		return fmt.Errorf("prefetch name %q: want letters, digits, '.', '_' or '-' (not first), at most %d characters", name, maxPrefetchNameLen)
	}
	return nil
}

// PrefetchNames returns the names of the index's prefetch artifacts in
// manifest order of first appearance ("" for SOCI's unnamed ones).
func (ix *Index) PrefetchNames() []string {
	var names []string
	for _, p := range ix.Prefetches {
		if !slices.Contains(names, p.Name) {
			names = append(names, p.Name)
		}
	}
	return names
}

// Prefetch returns the prefetch artifact named name for an image layer;
// false when the index has none.
func (ix *Index) Prefetch(name string, layer digest.Digest) (Prefetch, bool) {
	for _, p := range ix.Prefetches {
		if p.Name == name && p.LayerDigest == layer {
			return p, true
		}
	}
	return Prefetch{}, false
}

// SelectPrefetch picks the prefetch artifacts a runtime uses for an image:
// those named want when the index has any, else the first name
// (PrefetchNames). ok is false when the index has no prefetch artifact.
func SelectPrefetch(ix *Index, want string) (name string, ok bool) {
	names := ix.PrefetchNames()
	if len(names) == 0 {
		return "", false
	}
	if want != "" && slices.Contains(names, want) {
		return want, true
	}
	return names[0], true
}

// Supersedes returns the index v1 this index replaces
// (AnnotationSupersedes); "" when none or when the annotation is not a
// digest.
func (ix *Index) Supersedes() digest.Digest {
	d, err := digest.Parse(ix.Manifest.Annotations[AnnotationSupersedes])
	if err != nil {
		return ""
	}
	return d
}
