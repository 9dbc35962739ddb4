package soci_test

import (
	"compress/gzip"
	"maps"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// TestCreateConfinedNames: a layer whose names containerd confines to the
// layer root (an absolute name, "./", ".." components) is indexed like
// any other. Its zTOC decodes, keeps the raw tar names (SOCI's format),
// serves every file, and ConfinedPath gives the paths containerd unpacks
// them to.
func TestCreateConfinedNames(t *testing.T) {
	const spanSize = 64 << 10
	names := map[string]string{"/absolute/file.txt": "absolute/file.txt", "./x": "x", "a/../../b": "b"}
	var entries []layertest.Entry
	files := map[string][]byte{}
	for i, n := range slices.Sorted(maps.Keys(names)) {
		files[n] = layertest.Random(uint64(200+i), 150000)
		entries = append(entries, layertest.Reg(n, 0o644, files[n]))
	}
	raw := layertest.Tar(t, entries...)
	l := socitest.NewLayer(socitest.OCIGzip, layertest.Gzip(t, raw, gzip.BestSpeed), digest.FromBytes(raw), files)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		img := socitest.PushImage(t, reg.Addr, "confined", "v1", "linux/amd64", false, l)
		res := create(t, reg.Addr+"/confined:v1", soci.Options{MinLayerSize: 1, SpanSize: spanSize})
		lr := layerResult(t, res, l.Desc.Digest)
		if lr.Status != soci.LayerIndexed {
			t.Fatalf("layer %+v, want indexed", lr)
		}
		subject := img.Desc
		socitest.CheckIndex(t, reg.Addr, "confined", res.Platforms[0].Index.Digest, index.V1, &subject,
			[]socitest.Want{{Layer: l, SpanSize: spanSize}})
		z := socitest.FetchZtoc(t, reg.Addr, "confined", lr.Ztoc)
		if len(z.Files) != len(names) {
			t.Fatalf("zTOC has %d entries, want %d", len(z.Files), len(names))
		}
		for _, f := range z.Files {
			clean, skip := ztoc.ConfinedPath(f.Name)
			if want, ok := names[f.Name]; !ok || clean != want || skip {
				t.Errorf("entry %q: ConfinedPath gives %q (skip %v), want %q", f.Name, clean, skip, want)
			}
		}
	})
}
