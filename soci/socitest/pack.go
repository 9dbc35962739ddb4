package socitest

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/ztoc"
)

// CheckSOCIReadable checks index manifest bytes b against every rule
// SOCI-FORMAT.md (§1.8–1.10) states for SOCI's readers, so that upstream
// SOCI reads the index whatever spanpull adds to it:
//
//   - b is exactly encoding/json of the decoded ocispec.Manifest (SOCI
//     re-marshals a fetched index and commits it under the original
//     digest), with no top-level artifactType;
//   - an OCI image manifest, schema 2, whose config is the `{}` blob with a
//     SOCI index artifact type as media type; a subject holding only media
//     type, digest and size (v1), none for v2; a build tool annotation;
//   - layers: the zTOC descriptors first (application/octet-stream, with
//     the image layer digest and media type annotations and a decimal span
//     size when present), in the order of imageLayers (the image
//     manifest's layer digests) when given; then the prefetch descriptors;
//     then anything else, which must carry no com.amazon.soci annotation
//     (the runtime binds blobs to layers only through the layer digest
//     annotation) and neither a zTOC's nor a prefetch's media type.
//
// It returns the decoded manifest.
func CheckSOCIReadable(t testing.TB, b []byte, imageLayers []digest.Digest) ocispec.Manifest {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("SOCI index: %v", err)
	}
	if re, err := json.Marshal(m); err != nil || !bytes.Equal(re, b) {
		t.Errorf("SOCI index bytes are not json.Marshal of the decoded ocispec.Manifest (SOCI re-marshals it):\n got %s\nwant %s", b, re)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		t.Fatal(err)
	}
	if _, ok := top["artifactType"]; ok {
		t.Errorf("SOCI index has a top-level artifactType")
	}
	if m.SchemaVersion != 2 || m.MediaType != ocispec.MediaTypeImageManifest {
		t.Errorf("SOCI index: schema %d, media type %q", m.SchemaVersion, m.MediaType)
	}
	v1 := m.Config.MediaType == index.MediaTypeIndexV1
	if !v1 && m.Config.MediaType != index.MediaTypeIndexV2 || m.Config.Digest != index.EmptyConfigDigest || m.Config.Size != index.EmptyConfigSize {
		t.Errorf("SOCI index config %+v", m.Config)
	}
	if s := m.Subject; v1 && (s == nil || s.MediaType == "" || s.Digest == "" || s.Size <= 0 || s.Platform != nil || s.Annotations != nil || s.ArtifactType != "" || s.URLs != nil) {
		t.Errorf("SOCI index v1 subject %+v", s)
	} else if !v1 && s != nil {
		t.Errorf("SOCI index v2 has a subject")
	}
	if m.Annotations[index.AnnotationBuildToolIdentifier] == "" {
		t.Errorf("SOCI index has no %s annotation", index.AnnotationBuildToolIdentifier)
	}
	checkSOCILayers(t, m.Layers, imageLayers)
	return m
}

// checkSOCILayers checks the order and annotations of an index's layers
// (see CheckSOCIReadable).
func checkSOCILayers(t testing.TB, layers []ocispec.Descriptor, imageLayers []digest.Digest) {
	t.Helper()
	const ztocs, prefetches, others = 0, 1, 2
	part, next := ztocs, 0
	for i, d := range layers {
		kind := others
		switch d.MediaType {
		case index.MediaTypeZtoc:
			kind = ztocs
		case index.MediaTypePrefetch:
			kind = prefetches
		}
		if kind < part {
			t.Errorf("layers[%d] (%s) follows a later kind of descriptor: zTOCs, then prefetches, then the rest", i, d.MediaType)
		}
		part = kind
		layer := d.Annotations[index.AnnotationImageLayerDigest]
		switch kind {
		case ztocs:
			if _, err := strconv.ParseInt(d.Annotations[index.AnnotationSpanSize], 10, 64); err != nil && d.Annotations[index.AnnotationSpanSize] != "" {
				t.Errorf("zTOC descriptor %d: span size %q", i, d.Annotations[index.AnnotationSpanSize])
			}
			if digest.Digest(layer).Validate() != nil || d.Annotations[index.AnnotationImageLayerMediaType] == "" {
				t.Errorf("zTOC descriptor %d: annotations %v", i, d.Annotations)
			}
			if imageLayers != nil {
				for next < len(imageLayers) && imageLayers[next].String() != layer {
					next++
				}
				if next == len(imageLayers) {
					t.Errorf("zTOC descriptor %d: layer %s is not an image layer, or out of image-layer order", i, layer)
				}
			}
		case prefetches:
			if digest.Digest(layer).Validate() != nil {
				t.Errorf("prefetch descriptor %d: annotations %v", i, d.Annotations)
			}
		default:
			for k := range d.Annotations {
				if strings.HasPrefix(k, "com.amazon.soci.") {
					t.Errorf("layers[%d] (%s) carries SOCI annotation %s", i, d.MediaType, k)
				}
			}
		}
	}
}

// Packs returns the pack descriptors (heads and windows) of an index.
func Packs(m ocispec.Manifest) []ocispec.Descriptor {
	var out []ocispec.Descriptor
	for _, d := range m.Layers {
		if d.MediaType == index.MediaTypePackHead || d.MediaType == index.MediaTypePackWindows {
			out = append(out, d)
		}
	}
	return out
}

// checkPacks checks the packs of index b in addr/repo, which lists the
// zTOCs of want: either none (packs turned off) or one per zTOC, whose head
// describes the zTOC, whose windows restore it byte for byte, and whose
// chunk table (if any) matches the layer's bytes.
func checkPacks(t testing.TB, addr, repo string, b []byte, want []Want) {
	t.Helper()
	ix, err := index.Parse(b)
	if err != nil {
		t.Fatalf("index.Parse: %v", err)
	}
	if len(ix.Packs) == 0 {
		return
	}
	for _, w := range want {
		zd, _ := ix.Ztoc(w.Layer.Desc.Digest)
		head, windows, ok := ix.Pack(w.Layer.Desc.Digest)
		if !ok {
			t.Errorf("layer %s: zTOC %s has no pack, others do", w.Layer.Desc.Digest, zd.Digest)
			continue
		}
		h, err := ztoc.UnmarshalPackHead(Blob(t, addr, repo, head.Digest))
		if err != nil {
			t.Fatalf("pack head %s: %v", head.Digest, err)
		}
		var wb []byte
		if windows.Digest != "" {
			wb = Blob(t, addr, repo, windows.Digest)
		}
		if _, zb, err := h.Restore(wb); err != nil || !bytes.Equal(zb, Blob(t, addr, repo, zd.Digest)) {
			t.Errorf("layer %s: pack does not restore zTOC %s (%v)", w.Layer.Desc.Digest, zd.Digest, err)
		}
		if err := checkChunks(h.Ztoc, w.Layer.Data); err != nil {
			t.Errorf("layer %s: pack head %s: %v", w.Layer.Desc.Digest, head.Digest, err)
		}
	}
}

// checkChunks checks every chunk digest of z against the layer blob.
func checkChunks(z *ztoc.Ztoc, blob []byte) error {
	if z.Chunks == nil {
		return nil
	}
	spans, err := z.Spans()
	if err != nil {
		return err
	}
	for i, s := range spans {
		start := s.CompressedStart
		for k, c := range z.Chunks[i] {
			sum := sha256.Sum256(blob[start:c.CompressedEnd])
			if d := digest.NewDigestFromBytes(digest.SHA256, sum[:]); d != c.Digest {
				return fmt.Errorf("span %d chunk %d: digest %s, the layer's bytes hash to %s", i, k, c.Digest, d)
			}
			start = c.CompressedEnd
		}
	}
	return nil
}
