package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
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
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/ztoc"
)

// TestIndexInspect runs index ls/info and ztoc info/ls/get-file on
// REF@sha256:... against both registries, for v1 indexes (create) and v2
// indexes (convert).
func TestIndexInspect(t *testing.T) {
	shared := socitest.GzipLayer(100, 150<<10, socitest.OCIGzip)
	amd := socitest.TarLayer(101, 200<<10)
	arm := socitest.GzipLayer(102, 180<<10, socitest.OCIGzip)
	socitest.EachRegistry(t, func(t *testing.T, reg socitest.Registry) {
		r := reg.Addr + "/img"
		a, b := socitest.PushMultiPlatform(t, reg.Addr, "img", "multi", false, []socitest.Layer{shared, amd}, []socitest.Layer{shared, arm})
		socitest.PushImage(t, reg.Addr, "img", "plain", "linux/amd64", false, arm)

		// No index yet: ls lists nothing, info says so.
		out := itMustRun(t, "index", "ls", "--plain-http", r+":multi")
		if lines := strings.Split(strings.TrimSpace(out.Stdout), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], "DIGEST") {
			t.Errorf("index ls before create:\n%s", out.Stdout)
		}
		if out := itRun(t, "index", "info", "--plain-http", r+":plain"); out.Err == nil || !strings.Contains(out.Err.Error(), "has none") {
			t.Errorf("index info of an image without index: %v", out.Err)
		}

		rep := itReport(t, "create", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "1000", "--all-platforms", r+":multi")
		idxA, idxB := rep.Platforms[0].Index, rep.Platforms[1].Index

		out = itMustRun(t, "index", "ls", "--plain-http", "--json", r+":multi")
		var entries []indexEntry
		if err := json.Unmarshal([]byte(out.Stdout), &entries); err != nil {
			t.Fatalf("index ls --json: %v\n%s", err, out.Stdout)
		}
		sort.Slice(entries, func(i, j int) bool { return entries[i].Platform < entries[j].Platform })
		want := []indexEntry{
			{Digest: idxA, Version: "v1", Platform: "linux/amd64", Manifest: a.Desc.Digest, Ztocs: 2},
			{Digest: idxB, Version: "v1", Platform: "linux/arm64", Manifest: b.Desc.Digest, Ztocs: 2},
		}
		if len(entries) != 2 {
			t.Fatalf("index ls: %+v", entries)
		}
		for i := range want {
			for _, l := range rep.Platforms[i].Layers {
				want[i].Size += l.ZtocSize
				want[i].PackSize += l.PackHeadSize + l.PackWindowsSize
				if l.PackHead == "" {
					t.Errorf("layer %s: no pack head in the report", l.Digest)
				}
				want[i].Packs++
				if l.PackWindows != "" {
					want[i].Packs++
				}
			}
			if !reflect.DeepEqual(entries[i], want[i]) {
				t.Errorf("index ls entry %d: %+v, want %+v", i, entries[i], want[i])
			}
		}
		out = itMustRun(t, "index", "ls", "--plain-http", r+":multi")
		lines := strings.Split(strings.TrimSpace(out.Stdout), "\n")
		if len(lines) != 3 || !strings.Contains(out.Stdout, idxA.String()) || !strings.Contains(out.Stdout, idxB.String()) {
			t.Errorf("index ls table:\n%s", out.Stdout)
		}

		// index info: ambiguous for the index, exact for a manifest or
		// the index digest.
		if out := itRun(t, "index", "info", "--plain-http", r+":multi"); out.Err == nil || !strings.Contains(out.Err.Error(), "2 SOCI indexes") {
			t.Errorf("index info of a two-index image: %v", out.Err)
		}
		idxBytes, _, _ := socitest.Manifest(t, reg.Addr, "img", idxA.String())
		var pretty bytes.Buffer
		json.Indent(&pretty, idxBytes, "", "  ")
		pretty.WriteByte('\n')
		for _, ref := range []string{r + "@" + a.Desc.Digest.String(), r + "@" + idxA.String()} {
			out := itMustRun(t, "index", "info", "--plain-http", ref)
			if out.Stdout != pretty.String() {
				t.Errorf("index info %s:\n%s\nwant:\n%s", ref, out.Stdout, pretty.String())
			}
		}
		// It shows the packs: a head per zTOC, after the zTOCs.
		for _, l := range rep.Platforms[0].Layers {
			for _, want := range []string{`"mediaType": "` + index.MediaTypePackHead + `"`, `"digest": "` + l.PackHead.String() + `"`,
				`"` + index.AnnotationPackZtocDigest + `": "` + l.Ztoc.String() + `"`} {
				if !strings.Contains(pretty.String(), want) {
					t.Errorf("index info does not show %s", want)
				}
			}
		}
		if out := itRun(t, "index", "info", "--plain-http", idxA.String()); out.Err == nil {
			t.Error("index info with a bare digest: no error")
		}
		if out := itRun(t, "index", "info", "--plain-http", r+"@sha256:"+strings.Repeat("0", 64)); out.Err == nil || !strings.Contains(out.Err.Error(), "not found") {
			t.Errorf("index info of a missing manifest: %v", out.Err)
		}

		// ztoc info / ls / get-file straight from the registry.
		var m ocispec.Manifest
		json.Unmarshal(idxBytes, &m)
		zd := m.Layers[1] // the tar layer of amd64
		if zd.Annotations[index.AnnotationImageLayerDigest] != amd.Desc.Digest.String() {
			t.Fatalf("index layer 1 is %v", zd.Annotations)
		}
		out = itMustRun(t, "ztoc", "info", "--plain-http", r+"@"+zd.Digest.String())
		var info ztocInfo
		if err := json.Unmarshal([]byte(out.Stdout), &info); err != nil {
			t.Fatalf("ztoc info: %v", err)
		}
		z := socitest.FetchZtoc(t, reg.Addr, "img", zd)
		if info.Version != ztoc.Version || info.Size != zd.Size || info.SpanSize != soci.DefaultSpanSize || info.NumFiles != len(z.Files) ||
			len(info.Files) != len(z.Files) || info.BuildTool != z.BuildToolIdentifier {
			t.Errorf("ztoc info: %+v (zTOC has %d files)", info, len(z.Files))
		}
		out = itMustRun(t, "ztoc", "ls", "--plain-http", r+"@"+zd.Digest.String())
		if n := strings.Count(out.Stdout, "\n"); n != len(z.Files) {
			t.Errorf("ztoc ls: %d lines, zTOC has %d entries", n, len(z.Files))
		}
		names := make([]string, 0, len(amd.Files))
		for name := range amd.Files {
			names = append(names, name)
			if !strings.Contains(out.Stdout, " "+name+"\n") {
				t.Errorf("ztoc ls does not list %s", name)
			}
		}
		sort.Strings(names)
		for _, name := range names[:3] {
			out := itMustRun(t, "ztoc", "get-file", "--plain-http", r+"@"+zd.Digest.String(), r+"@"+amd.Desc.Digest.String(), name)
			if out.Stdout != string(amd.Files[name]) {
				t.Errorf("ztoc get-file %s: %d bytes, want %d", name, len(out.Stdout), len(amd.Files[name]))
			}
		}
		// A layer that is not the zTOC's, a blob that is no zTOC, a
		// missing blob.
		if out := itRun(t, "ztoc", "get-file", "--plain-http", r+"@"+zd.Digest.String(), r+"@"+arm.Desc.Digest.String(), names[0]); out.Err == nil {
			t.Error("get-file with the wrong layer: no error")
		}
		if out := itRun(t, "ztoc", "info", "--plain-http", r+"@"+amd.Desc.Digest.String()); out.Err == nil || !strings.Contains(out.Err.Error(), "zTOC") {
			t.Errorf("ztoc info of a layer blob: %v", out.Err)
		}
		if out := itRun(t, "ztoc", "info", "--plain-http", r+"@sha256:"+strings.Repeat("1", 64)); out.Err == nil {
			t.Error("ztoc info of a missing blob: no error")
		}

		// v2: convert, then the converted image lists its v2 indexes.
		crep := itReport(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "1000", "--all-platforms", r+":multi", r+":multi-soci")
		out = itMustRun(t, "index", "ls", "--plain-http", "--json", r+":multi-soci")
		entries = nil
		if err := json.Unmarshal([]byte(out.Stdout), &entries); err != nil {
			t.Fatal(err)
		}
		conv, _, _ := socitest.Manifest(t, reg.Addr, "img", "multi-soci")
		var ci ocispec.Index
		json.Unmarshal(conv, &ci)
		if len(entries) != 2 || len(ci.Manifests) != 4 {
			t.Fatalf("index ls of the converted image: %+v", entries)
		}
		for i, e := range entries {
			if e.Version != "v2" || e.Digest != crep.Platforms[i].Index || e.Manifest != ci.Manifests[i].Digest || e.Ztocs != 2 || e.Platform != crep.Platforms[i].Platform {
				t.Errorf("v2 entry %d: %+v (image index %+v)", i, e, ci.Manifests)
			}
		}
		if out := itRun(t, "index", "info", "--plain-http", r+"@"+ci.Manifests[0].Digest.String()); out.Err == nil {
			t.Errorf("index info of a rewritten manifest (no v1 referrer): no error:\n%s", out.Stdout)
		}
		out = itMustRun(t, "index", "info", "--plain-http", r+"@"+entries[1].Digest.String())
		var v2 ocispec.Manifest
		if err := json.Unmarshal([]byte(out.Stdout), &v2); err != nil || v2.Config.MediaType != index.MediaTypeIndexV2 || v2.Subject != nil {
			t.Errorf("index info of a v2 index: %v\n%s", err, out.Stdout)
		}
	})
}

// TestDebianLayerFromRegistry indexes a real Debian root filesystem layer
// in docker-registry and checks that the pushed zTOC reproduces every
// regular file GNU tar extracts from the layer, reading the layer straight
// from the registry with range requests: all files in bulk through the
// ztoc and registry packages, and a sample through `ztoc get-file`.
func TestDebianLayerFromRegistry(t *testing.T) {
	path := layertest.DebianLayer(t)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// GNU tar's extraction, while the layer is pushed and indexed.
	dir := t.TempDir()
	tarDone := make(chan error, 1)
	go func() {
		out, err := exec.Command("tar", "-xpf", path, "-C", dir, "--numeric-owner").CombinedOutput()
		if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		tarDone <- err
	}()
	sum, err := exec.Command("sh", "-c", "gzip -dc <"+path+" | sha256sum").Output()
	if err != nil {
		t.Fatal(err)
	}
	layer := socitest.NewLayer(socitest.OCIGzip, data, digest.Digest("sha256:"+strings.Fields(string(sum))[0]), nil)
	addr := registrytest.StartDistribution(t)
	img := socitest.PushImage(t, addr, "debian", "bookworm", "linux/amd64", false, layer)
	ref := addr + "/debian"

	rep := itReport(t, "create", "--plain-http", "--cache-dir", t.TempDir(), ref+":bookworm")
	if len(rep.Platforms) != 1 || len(rep.Platforms[0].Layers) != 1 || rep.Platforms[0].Layers[0].Status != "indexed" {
		t.Fatalf("report %+v", rep)
	}
	idxBytes, _, _ := socitest.Manifest(t, addr, "debian", rep.Platforms[0].Index.String())
	var m ocispec.Manifest
	json.Unmarshal(idxBytes, &m)
	// The zTOC, then its pack: head and windows (the layer has many spans).
	socitest.CheckSOCIReadable(t, idxBytes, []digest.Digest{layer.Desc.Digest})
	if len(m.Layers) != 3 || len(socitest.Packs(m)) != 2 || m.Subject == nil || m.Subject.Digest != img.Desc.Digest {
		t.Fatalf("index %s", idxBytes)
	}
	zd := m.Layers[0]
	z := socitest.FetchZtoc(t, addr, "debian", zd)

	repo, err := registry.New(ref, registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	blob, err := repo.BlobReader(layer.Desc)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := span.NewLayer(layer.Desc.Digest, z, blob, span.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	// The whole tar stream, one range request and one inflate per span.
	stream := make([]byte, z.UncompressedArchiveSize)
	for _, s := range zr.Spans() {
		if n, err := zr.ReadAt(ctx, stream[s.UncompressedStart:s.UncompressedEnd], s.UncompressedStart); err != nil && !(err == io.EOF && s.UncompressedStart+int64(n) == s.UncompressedEnd) {
			t.Fatalf("span %d: %d bytes, %v", s.ID, n, err)
		}
	}
	if err := <-tarDone; err != nil {
		t.Fatalf("GNU tar: %v", err)
	}
	last := map[string]int{}
	for i := range z.Files {
		last[ztoc.CleanPath(z.Files[i].Name)] = i
	}
	local, err := span.NewLayer(layer.Desc.Digest, z, span.LocalBlob(bytes.NewReader(data)), span.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	var regs []*ztoc.FileMetadata
	for name, i := range last {
		f := &z.Files[i]
		if f.Type != ztoc.TypeReg {
			continue
		}
		regs = append(regs, f)
		want, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		var got []byte
		if _, sparse := f.PAXRecords[ztoc.SparseMapRecord]; sparse {
			var b bytes.Buffer
			if _, err := local.WriteFile(ctx, &b, f); err != nil {
				t.Errorf("%s: %v", name, err)
			}
			got = b.Bytes()
		} else {
			got = stream[f.UncompressedOffset : f.UncompressedOffset+f.UncompressedSize]
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: the zTOC gives %d bytes that differ from GNU tar's %d", name, len(got), len(want))
		}
	}
	// Every regular file GNU tar made is one the zTOC knows.
	extracted := 0
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			extracted++
			rel, _ := filepath.Rel(dir, p)
			if i, ok := last[rel]; !ok || (z.Files[i].Type != ztoc.TypeReg && z.Files[i].Type != ztoc.TypeHardlink) {
				t.Errorf("GNU tar extracted %s, which is no regular file in the zTOC", rel)
			}
		}
		return nil
	})
	t.Logf("%d regular files compared (GNU tar extracted %d regular files), %d spans, zTOC %d bytes", len(regs), extracted, z.NumSpans(), zd.Size)
	if len(regs) < 1000 {
		t.Errorf("only %d regular files in the Debian layer's zTOC", len(regs))
	}

	// A sample through the CLI: the largest files, files across spans,
	// and a stride over the rest.
	sort.Slice(regs, func(i, j int) bool { return regs[i].Name < regs[j].Name })
	bySize := append([]*ztoc.FileMetadata(nil), regs...)
	sort.Slice(bySize, func(i, j int) bool { return bySize[i].UncompressedSize > bySize[j].UncompressedSize })
	sample := bySize[:4]
	spans := zr.Spans()
	for _, f := range regs {
		first, _ := ztoc.SpanForOffset(spans, f.UncompressedOffset)
		lastSpan, _ := ztoc.SpanForOffset(spans, f.UncompressedOffset+max(f.UncompressedSize-1, 0))
		if lastSpan != first && len(sample) < 8 {
			sample = append(sample, f)
		}
	}
	for i := 0; len(sample) < 20; i += len(regs) / 12 {
		sample = append(sample, regs[i%len(regs)])
	}
	for _, f := range sample {
		out := itRun(t, "ztoc", "get-file", "--plain-http", ref+"@"+zd.Digest.String(), ref+"@"+layer.Desc.Digest.String(), f.Name)
		want, _ := os.ReadFile(filepath.Join(dir, ztoc.CleanPath(f.Name)))
		if out.Err != nil || out.Stdout != string(want) {
			t.Errorf("get-file %s: %v, %d bytes, want %d", f.Name, out.Err, len(out.Stdout), len(want))
		}
	}
}
