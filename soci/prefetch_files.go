package soci

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/ztoc"
)

// OCI whiteouts (image-spec layer.md): ".wh.NAME" deletes NAME of the
// layers below; ".wh..wh..opq" hides everything below in its directory.
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// fileLayer is an indexed layer with its TOC indexed by cleaned path.
type fileLayer struct {
	*loadedLayer
	names     map[string]int  // cleaned path -> index of its last entry
	whiteouts map[string]bool // paths this layer deletes from the layers below
	opaque    map[string]bool // directories this layer makes opaque
}

func newFileLayer(l *loadedLayer) *fileLayer {
	f := &fileLayer{loadedLayer: l, names: make(map[string]int, len(l.z.Files)),
		whiteouts: make(map[string]bool), opaque: make(map[string]bool)}
	for i, e := range l.z.Files {
		p := ztoc.CleanPath(e.Name)
		f.names[p] = i
		dir, base := path.Split(p)
		dir = ztoc.CleanPath(dir)
		switch {
		case base == whiteoutOpaque:
			f.opaque[dir] = true
		case strings.HasPrefix(base, whiteoutPrefix):
			f.whiteouts[ztoc.CleanPath(path.Join(dir, strings.TrimPrefix(base, whiteoutPrefix)))] = true
		}
	}
	return f
}

// fileOrders resolves the paths of a SOCI-style file list against the
// indexed layers of t, top-most first, and returns per layer the spans of
// each file's tar header and data, in list order (each span once).
func fileOrders(ctx context.Context, repo *registry.Repository, t *attachTarget, paths []string) (map[digest.Digest][]ztoc.SpanID, error) {
	var layers []*fileLayer // top-most first
	for _, d := range slices.Backward(t.manifest.Layers) {
		if _, ok := t.ix.Ztoc(d.Digest); !ok {
			continue
		}
		l, err := loadLayer(ctx, repo, t, d.Digest)
		if err != nil {
			return nil, err
		}
		layers = append(layers, newFileLayer(l))
	}
	out := make(map[digest.Digest][]ztoc.SpanID)
	seen := make(map[digest.Digest]map[ztoc.SpanID]bool)
	var problems []string
	for _, p := range paths {
		l, i, err := resolvePath(layers, ztoc.CleanPath(p))
		var first, last ztoc.SpanID
		if err == nil {
			first, last, err = entrySpans(l, i)
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", p, err))
			continue
		}
		d := l.desc.Digest
		if seen[d] == nil {
			seen[d] = make(map[ztoc.SpanID]bool)
		}
		for id := first; id <= last; id++ {
			if !seen[d][id] {
				seen[d][id] = true
				out[d] = append(out[d], id)
			}
		}
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%d of %d listed files cannot be prefetched:\n  %s", len(problems), len(paths), strings.Join(problems, "\n  "))
	}
	return out, nil
}

// resolvePath finds the entry of cleaned path p that the image shows: in
// the top-most layer that has it, unless a layer above deleted it or made
// one of its directories opaque.
func resolvePath(layers []*fileLayer, p string) (*fileLayer, int, error) {
	for _, l := range layers {
		if i, ok := l.names[p]; ok {
			return l, i, nil
		}
		for a := p; ; a = ztoc.CleanPath(path.Dir(a)) {
			if l.whiteouts[a] {
				return nil, 0, fmt.Errorf("deleted by a whiteout in layer %s", l.desc.Digest)
			}
			if a != p && l.opaque[a] {
				return nil, 0, fmt.Errorf("hidden by opaque directory /%s in layer %s", a, l.desc.Digest)
			}
			if a == "." {
				break
			}
		}
	}
	return nil, 0, fmt.Errorf("no indexed layer has it")
}

// entrySpans returns the first and last span of the tar stream region of
// entry i of l, a regular file (or a hardlink to one): its header blocks
// (from the end of the previous entry's data, rounded up to a tar block,
// which a runtime reads to check the header) through its data.
func entrySpans(l *fileLayer, i int) (first, last ztoc.SpanID, err error) {
	z := l.z
	e := &z.Files[i]
	if e.Type == ztoc.TypeHardlink {
		target, err := z.Lookup(e.Name)
		if err != nil {
			return 0, 0, err
		}
		for j := range z.Files {
			if &z.Files[j] == target {
				i = j
			}
		}
		e = target
	}
	if e.Type != ztoc.TypeReg {
		return 0, 0, fmt.Errorf("a %s in layer %s, not a regular file", e.Type, l.desc.Digest)
	}
	var start int64
	if i > 0 {
		prev := &z.Files[i-1]
		n, err := prev.StoredSize()
		if err != nil {
			return 0, 0, err
		}
		start = (prev.UncompressedOffset + n + 511) &^ 511
	}
	n, err := e.StoredSize()
	if err != nil {
		return 0, 0, err
	}
	end := max(e.UncompressedOffset+n-1, start)
	first, ok1 := ztoc.SpanForOffset(l.spans, start)
	last, ok2 := ztoc.SpanForOffset(l.spans, end)
	if !ok1 || !ok2 {
		return 0, 0, fmt.Errorf("tar region [%d, %d] is outside layer %s", start, end, l.desc.Digest)
	}
	return first, last, nil
}
