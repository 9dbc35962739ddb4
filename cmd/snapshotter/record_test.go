package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/record"
)

// runCLI runs the snapshotter command in-process.
func runCLI(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := newRootCommand()
	var out, errOut bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	err = cmd.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

// TestRecordExport exports a daemon's record over HTTP to a file and to
// stdout, the metrics address from the flag or the daemon's config file.
func TestRecordExport(t *testing.T) {
	store := record.NewStore(record.Options{})
	defer store.Close()
	img := record.Image{Reference: "registry.example.com/app:1.2", Manifest: digest.FromString("m")}
	l := store.Layer(img, record.LayerInfo{Digest: digest.FromString("l"), Spans: 4})
	l.Span(2)
	l.File("usr/bin/app")
	mux := http.NewServeMux()
	mux.Handle(record.HandlerPath, record.Handler(store))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	dir := t.TempDir()

	out := filepath.Join(dir, "rec.json")
	if _, _, err := runCLI(t, "record", "export", "--metrics-address", addr, "--name", "web", "-o", out, img.Reference); err != nil {
		t.Fatal(err)
	}
	rec, err := record.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Name != "web" || rec.Image != img || len(rec.Layers) != 1 || rec.Layers[0].Spans[0].ID != 2 || rec.Layers[0].Files[0].Path != "/usr/bin/app" {
		t.Fatalf("exported %+v", rec)
	}

	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("metrics_address = \""+addr+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, _, err := runCLI(t, "record", "export", "--config", cfg, img.Manifest.String())
	if err != nil {
		t.Fatal(err)
	}
	if rec, err := record.Parse([]byte(stdout)); err != nil || rec.Name != record.DefaultName {
		t.Fatalf("export to stdout: %v %+v", err, rec)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--metrics-address", addr, "other:1"}, "pull and run other:1 with it first"},
		{[]string{"--config", filepath.Join(dir, "none.toml"), "x"}, "read config"},
		{[]string{"--config", writeFile(t, dir, "empty.toml", ""), "x"}, "none is configured (metrics_address)"},
		{[]string{"--metrics-address", addr, "--name", "a b", "x"}, "400"},
	} {
		if _, _, err := runCLI(t, append([]string{"record", "export"}, tc.args...)...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("record export %s: %v, want %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

func writeFile(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestRecordRunArgs: record run checks its arguments before it starts
// anything. (It runs end to end in integration.TestRecordRunPython.)
func TestRecordRunArgs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"img"}, "--ready is required"},
		{[]string{"--ready", "(", "img"}, "--ready: error parsing regexp"},
		{[]string{"--ready", "x", "--cmd", "a", "img", "--", "b"}, "not both"},
		{[]string{"--ready", "x"}, "requires at least 1 arg"},
	} {
		if _, _, err := runCLI(t, append([]string{"record", "run"}, tc.args...)...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("record run %s: %v, want %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
	if _, _, err := runCLI(t, "record", "nosuch"); err == nil || !strings.Contains(err.Error(), `unknown command "nosuch"`) {
		t.Errorf("record nosuch: %v", err)
	}
	stdout, _, err := runCLI(t, "record", "run", "--help")
	if err != nil || !strings.Contains(stdout, "run [flags] IMAGE [-- CMD [ARG...]]") {
		t.Errorf("record run --help: %v\n%s", err, stdout)
	}
}
