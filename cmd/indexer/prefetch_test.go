package main

// The prefetch attach command's input, output and errors, and the prefetch
// table of index info. What attach does in the registry is tested on the
// engine, in package soci.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/ztoc"
)

// writeRecord writes a record of img's first layer reading spans.
func writeRecord(t *testing.T, name string, manifest, layer digest.Digest, spans ...ztoc.SpanID) string {
	t.Helper()
	l := record.Layer{Digest: layer, Files: []record.File{{Path: "/x", AtMicros: 1}}}
	for i, id := range spans {
		l.Spans = append(l.Spans, record.Span{ID: id, AtMicros: int64(10 * i)})
	}
	rec := &record.Record{Version: record.Version, Name: name, Image: record.Image{Reference: "some/where:1", Manifest: manifest}, Layers: []record.Layer{l}}
	path := filepath.Join(t.TempDir(), name+".json")
	if err := record.WriteFile(path, rec); err != nil {
		t.Fatal(err)
	}
	return path
}

var attachIndexLine = regexp.MustCompile(`(?m)^index    (sha256:[0-9a-f]{64})  SOCI index (v1|v2) with prefetch "([^"]+)" \(manifest (sha256:[0-9a-f]{12}); replaces (sha256:[0-9a-f]{12})\)$`)

// TestPrefetchAttachV1 attaches a record and a file list to a v1-indexed
// image and checks the text, -q and --json outputs and index info's table.
func TestPrefetchAttachV1(t *testing.T) {
	layer := socitest.GzipLayer(91, 600<<10, socitest.OCIGzip)
	addr := startReferrers(t)
	img := socitest.PushImage(t, addr, "app", "v1", "linux/amd64", false, layer)
	ref := addr + "/app:v1"
	rep := itReport(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--span-size", fmt.Sprint(128<<10), ref)
	old := rep.Platforms[0].Index

	rec := writeRecord(t, "web", img.Desc.Digest, layer.Desc.Digest, 2, 3, 0)
	out := itMustRun(t, "prefetch", "attach", "--plain-http", ref, rec)
	m := attachIndexLine.FindStringSubmatch(out.Stdout)
	if m == nil || m[2] != "v1" || m[3] != "web" || m[4] != short(img.Desc.Digest) || m[5] != short(old) {
		t.Fatalf("attach output:\n%s", out.Stdout)
	}
	if want := "layer " + layer.Desc.Digest.String() + "  2 ranges, 3 spans"; !strings.Contains(out.Stdout, want) {
		t.Errorf("attach output lacks %q:\n%s", want, out.Stdout)
	}

	// index info: the manifest on stdout, the prefetch table on stderr.
	info := itMustRun(t, "index", "info", "--plain-http", ref)
	var manifest map[string]any
	if err := json.Unmarshal([]byte(info.Stdout), &manifest); err != nil {
		t.Fatalf("index info stdout is not the manifest alone: %v\n%s", err, info.Stdout)
	}
	if !regexp.MustCompile(`(?m)^web +` + layer.Desc.Digest.String() + ` +2 +3 +sha256:`).MatchString(info.Stderr) {
		t.Errorf("index info prefetch table:\n%s", info.Stderr)
	}

	// A hand-written file list, as another workload: -q prints the index.
	paths := filepath.Join(t.TempDir(), "paths.txt")
	var name string
	for n := range layer.Files {
		name = n
		break
	}
	if err := os.WriteFile(paths, []byte("# boot files\n\n/"+name+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out = itMustRun(t, "prefetch", "attach", "--plain-http", "-q", "--files", paths, ref)
	idx, err := digest.Parse(strings.TrimSpace(out.Stdout))
	if err != nil {
		t.Fatalf("attach -q printed %q", out.Stdout)
	}
	info = itMustRun(t, "index", "info", "--plain-http", ref+"@"+idx.String())
	for _, want := range []string{"\nweb ", "\ndefault "} {
		if !strings.Contains(info.Stderr, want) {
			t.Errorf("index info table lacks %q:\n%s", want, info.Stderr)
		}
	}

	// index ls: one index (the newest), its prefetch artifacts counted
	// apart from its zTOCs.
	ls := itMustRun(t, "index", "ls", "--plain-http", "--json", ref)
	var entries []indexEntry
	if err := json.Unmarshal([]byte(ls.Stdout), &entries); err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Digest != idx || entries[0].Ztocs != 1 || entries[0].Prefetches != 2 || strings.Join(entries[0].PrefetchNames, ",") != "web,default" {
		t.Errorf("index ls --json: %+v", entries)
	}
	if ls := itMustRun(t, "index", "ls", "--plain-http", ref); !strings.Contains(ls.Stdout, " 2 (web,default) ") {
		t.Errorf("index ls table lacks the prefetch column:\n%s", ls.Stdout)
	}

	// --json, and --name overriding the record's.
	out = itMustRun(t, "prefetch", "attach", "--plain-http", "--json", "--name", "batch", ref, rec)
	var r attachReport
	dec := json.NewDecoder(strings.NewReader(out.Stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		t.Fatalf("--json: %v\n%s", err, out.Stdout)
	}
	if r.Name != "batch" || r.Version != "v1" || r.Previous != idx || r.Image != "" || len(r.Prefetches) != 1 || r.Prefetches[0].Ranges != 2 || r.Prefetches[0].Spans != 3 {
		t.Errorf("report %+v", r)
	}
}

// TestPrefetchAttachV2: the image digest changes, -q prints it, and the
// tag names it.
func TestPrefetchAttachV2(t *testing.T) {
	layer := socitest.GzipLayer(92, 300<<10, socitest.OCIGzip)
	addr := startReferrers(t)
	socitest.PushImage(t, addr, "app", "src", "linux/amd64", false, layer)
	ref := addr + "/app:soci"
	itMustRun(t, "convert", "--plain-http", "--no-cache", "--min-layer-size", "1000", "--platform", "linux/amd64", addr+"/app:src", ref)
	b, _, _ := socitest.Manifest(t, addr, "app", "soci")
	var idx struct {
		Manifests []struct{ Digest digest.Digest }
	}
	json.Unmarshal(b, &idx)
	rec := writeRecord(t, "default", idx.Manifests[0].Digest, layer.Desc.Digest, 0)

	out := itMustRun(t, "prefetch", "attach", "--plain-http", "--platform", "linux/amd64", ref, rec)
	tagged, _, _ := socitest.Manifest(t, addr, "app", "soci")
	if !strings.Contains(out.Stdout, "image    "+digest.FromBytes(tagged).String()+"  new SOCI-enabled image digest") || digest.FromBytes(tagged) == digest.FromBytes(b) {
		t.Errorf("attach v2 output:\n%s", out.Stdout)
	}
	out = itMustRun(t, "prefetch", "attach", "--plain-http", "--platform", "linux/amd64", "-q", "--name", "other", ref, rec)
	if !strings.Contains(out.Stderr, "same layers") {
		t.Errorf("no note about the record's older manifest:\n%s", out.Stderr)
	}
	tagged, _, _ = socitest.Manifest(t, addr, "app", "soci")
	if strings.TrimSpace(out.Stdout) != digest.FromBytes(tagged).String() {
		t.Errorf("attach -q printed %q, the tag names %s", out.Stdout, digest.FromBytes(tagged))
	}
}

// TestPrefetchAttachErrors: wrong arguments and bad inputs fail with an
// error that says what is wrong.
func TestPrefetchAttachErrors(t *testing.T) {
	layer := socitest.GzipLayer(93, 200<<10, socitest.OCIGzip)
	addr := startReferrers(t)
	img := socitest.PushImage(t, addr, "app", "v1", "linux/amd64", false, layer)
	ref := addr + "/app:v1"
	itMustRun(t, "create", "--plain-http", "--no-cache", "--min-layer-size", "1000", ref)
	rec := writeRecord(t, "web", img.Desc.Digest, layer.Desc.Digest, 0)
	bad := filepath.Join(t.TempDir(), "bad.json")
	os.WriteFile(bad, []byte(`{"version": 7}`), 0o644)
	empty := filepath.Join(t.TempDir(), "empty.txt")
	os.WriteFile(empty, []byte("# nothing\n"), 0o644)
	other := writeRecord(t, "web", digest.FromString("other"), layer.Desc.Digest, 0)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{ref}, "name a RECORD.json or give --files"},
		{[]string{"--files", empty, ref, rec}, "not both"},
		{[]string{"--files", empty, ref}, "lists no path"},
		{[]string{ref, bad}, bad + ": record: version 7"},
		{[]string{ref, filepath.Join(t.TempDir(), "missing.json")}, "no such file"},
		{[]string{"--name", "a/b", ref, rec}, "prefetch name"},
		{[]string{"-q", "--json", ref, rec}, "exclude each other"},
		{[]string{"--platform", "nope/x/y/z", ref, rec}, "--platform"},
		{[]string{ref, other}, "the record is for image manifest"},
	} {
		out := itRun(t, append([]string{"prefetch", "attach", "--plain-http"}, tc.args...)...)
		if out.Err == nil || !strings.Contains(out.Err.Error(), tc.want) {
			t.Errorf("prefetch attach %s: %v, want %q", strings.Join(tc.args, " "), out.Err, tc.want)
		}
	}
}
