package main

// The convert command's output, flags and exit status. What convert does
// in the registry is tested on the engine, in package soci.

import (
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/soci/socitest"
)

// TestConvertOutput: the text output ends with the pushed image's line, a
// re-run says the layer was reused, -q prints digests only and --json
// names the target and its digest.
func TestConvertOutput(t *testing.T) {
	amd := socitest.GzipLayer(81, 300<<10, socitest.DockerGzip)
	addr := startReferrers(t)
	socitest.PushImage(t, addr, "src", "single", "linux/amd64", true, amd)
	args := []string{"convert", "--plain-http", "--cache-dir", t.TempDir(), "--min-layer-size", "100000", addr + "/src:single", addr + "/dst:single-soci"}

	out := itMustRun(t, args...)
	tagged, _, _ := socitest.Manifest(t, addr, "dst", "single-soci")
	if !itHasLine(out.Stdout, "indexed", amd.Desc.Digest) || !strings.HasSuffix(out.Stdout, "image    "+digest.FromBytes(tagged).String()+"  "+addr+"/dst:single-soci\n") ||
		!strings.Contains(out.Stdout, "SOCI index v2 for linux/amd64") {
		t.Errorf("convert output:\n%s", out.Stdout)
	}
	out = itMustRun(t, args...)
	if !strings.Contains(out.Stdout, "reused   "+short(amd.Desc.Digest)) || !strings.Contains(out.Stdout, "image    sha256:") {
		t.Errorf("convert re-run output:\n%s", out.Stdout)
	}
	// -q prints digests only, one per line.
	out = itMustRun(t, append(args, "-q")...)
	for _, line := range strings.Split(strings.TrimSuffix(out.Stdout, "\n"), "\n") {
		if _, err := digest.Parse(line); err != nil {
			t.Errorf("convert -q printed %q", line)
		}
	}
	rep := itReport(t, args...)
	if rep.Image != addr+"/src:single" || rep.Target != addr+"/dst:single-soci" || rep.TargetDigest != digest.FromBytes(tagged) || len(rep.Platforms) != 1 {
		t.Errorf("report %+v", rep)
	}
}

// TestConvertErrors: DST without tag, and a source whose platforms all
// fail (nothing indexable) must fail without pushing an image.
func TestConvertErrors(t *testing.T) {
	addr := startReferrers(t)
	small := socitest.GzipLayer(90, 10<<10, socitest.OCIGzip)
	socitest.PushImage(t, addr, "src", "v1", "linux/amd64", false, small)
	if out := itRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), addr+"/src:v1", addr+"/dst"); out.Err == nil || !strings.Contains(out.Err.Error(), "DST") || !strings.Contains(out.Err.Error(), "tag") {
		t.Errorf("DST without tag: %v", out.Err)
	}
	out := itRun(t, "convert", "--plain-http", "--cache-dir", t.TempDir(), addr+"/src:v1", addr+"/dst:soci")
	if out.Err == nil || !strings.Contains(out.Err.Error(), "1 of 1 platforms failed") {
		t.Errorf("convert of an image with no indexable layer: %v\n%s", out.Err, out.Stdout)
	}
	if _, _, ok := socitest.Manifest(t, addr, "dst", "soci"); ok {
		t.Error("convert pushed an image though nothing was indexed")
	}
}
