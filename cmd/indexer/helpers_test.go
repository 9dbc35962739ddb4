package main

// Helpers of the create/convert/index tests: the indexer runs in-process on
// images that socitest builds and pushes, and its output is checked.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/registry/registrytest"
)

// itOutput is the outcome of one in-process indexer run.
type itOutput struct {
	Stdout, Stderr string
	Err            error
	Elapsed        time.Duration
}

// itRun runs the indexer in-process with args, bounded by two minutes.
func itRun(t testing.TB, args ...string) itOutput {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := newRootCommand()
	var stdout, stderr bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	start := time.Now()
	err := cmd.ExecuteContext(ctx)
	out := itOutput{Stdout: stdout.String(), Stderr: stderr.String(), Err: err, Elapsed: time.Since(start)}
	t.Logf("indexer %s (%s): err=%v\n%s%s", strings.Join(args, " "), out.Elapsed.Round(time.Millisecond), err, itClip(out.Stdout), itClip(out.Stderr))
	return out
}

// itClip shortens output for the test log (get-file prints whole files).
func itClip(s string) string {
	const limit = 4 << 10
	if len(s) <= limit {
		return s
	}
	return fmt.Sprintf("%s... [%d more bytes]\n", strings.ToValidUTF8(s[:limit], "?"), len(s)-limit)
}

// itMustRun is itRun that fails the test when the command fails.
func itMustRun(t testing.TB, args ...string) itOutput {
	t.Helper()
	out := itRun(t, args...)
	if out.Err != nil {
		t.Fatalf("indexer %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), out.Err, out.Stdout, out.Stderr)
	}
	return out
}

// itReport runs a create or convert with --json and decodes the report.
func itReport(t testing.TB, args ...string) runReport {
	t.Helper()
	out := itMustRun(t, append(args, "--json")...)
	var rep runReport
	dec := json.NewDecoder(strings.NewReader(out.Stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("--json output does not parse: %v\n%s", err, out.Stdout)
	}
	return rep
}

// itHasLine reports whether the human output has the line of a layer with
// the given status ("indexed", "reused", "skipped").
func itHasLine(out, status string, d digest.Digest) bool {
	prefix := fmt.Sprintf("%-9s%s  ", status, short(d))
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, prefix) {
			return true
		}
	}
	return false
}

func itLineOf(out string, d digest.Digest) string {
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, short(d)+"  ") {
			return line
		}
	}
	return ""
}

var itIndexLine = regexp.MustCompile(`(?m)^index    (sha256:[0-9a-f]{64})  SOCI index (v1|v2) for (\S+) \(manifest (sha256:[0-9a-f]{12}), (\d+) of (\d+) layers\)$`)

func startReferrers(t *testing.T) string {
	t.Helper()
	return registrytest.StartReferrersRegistry(t)
}
