package recordrun

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/spanpull/spanpull/internal/proc"
)

// The ready pattern matches whole lines, also across writes and as an
// unfinished line; output is copied and its tail kept.
func TestReadyWatch(t *testing.T) {
	var out bytes.Buffer
	w := newReadyWatch(regexp.MustCompile(`^listening on :\d+$`), &out)
	isReady := func() bool {
		select {
		case <-w.ready:
			return true
		default:
			return false
		}
	}
	w.Write([]byte("starting\nlisten"))
	w.Write([]byte("ing on :80"))
	if !isReady() {
		t.Fatal("an unfinished matching line did not count")
	}
	w2 := newReadyWatch(regexp.MustCompile(`^ok$`), &out)
	w2.Write([]byte("not ok\nok-ish\n"))
	select {
	case <-w2.ready:
		t.Fatal("matched a line that is not the pattern")
	default:
	}
	w2.Write([]byte(strings.Repeat("x", 3*tailSize) + "\nok\n"))
	<-w2.ready
	if tail := w2.outputTail(); len(tail) > tailSize || !strings.HasSuffix(tail, "\nok\n") {
		t.Fatalf("tail of %d bytes ending %q", len(tail), tail[max(0, len(tail)-10):])
	}
	if !strings.HasPrefix(out.String(), "starting\nlistening on :80not ok\n") {
		t.Fatalf("output not copied: %.40q", out.String())
	}
	// Concurrent writers (stdout and stderr), run with -race.
	w3 := newReadyWatch(regexp.MustCompile(`^done$`), &bytes.Buffer{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 100 {
				w3.Write([]byte("line\n"))
			}
		})
	}
	wg.Wait()
	w3.Write([]byte("done\n"))
	<-w3.ready
}

func TestContainerdConfig(t *testing.T) {
	cfg := containerdConfig(2, "/r", "/r/c.sock", "/r/s.sock")
	var parsed struct {
		Version         int
		Root, State     string
		DisabledPlugins []string `toml:"disabled_plugins"`
		GRPC            struct{ Address string }
		TTRPC           struct{ Address string }
		ProxyPlugins    map[string]struct{ Type, Address string } `toml:"proxy_plugins"`
	}
	if err := toml.Unmarshal([]byte(cfg), &parsed); err != nil {
		t.Fatalf("%v\n%s", err, cfg)
	}
	if parsed.Version != 2 || parsed.Root != "/r/containerd-root" || parsed.State != "/r/containerd-state" || parsed.GRPC.Address != "/r/c.sock" ||
		parsed.TTRPC.Address != "/r/c.sock.ttrpc" || len(parsed.DisabledPlugins) != 1 || parsed.ProxyPlugins["spanpull"].Address != "/r/s.sock" ||
		parsed.ProxyPlugins["spanpull"].Type != "snapshot" {
		t.Fatalf("config %+v\n%s", parsed, cfg)
	}
}

func TestContainerdMajor(t *testing.T) {
	dir := t.TempDir()
	for out, want := range map[string]int{
		"containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3": 1,
		"containerd github.com/containerd/containerd/v2 v2.2.9 abcdef":                2,
		"something else": 1,
	} {
		bin := filepath.Join(dir, "containerd")
		if err := os.WriteFile(bin, []byte("#!/bin/sh\necho '"+out+"'\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		if got := containerdMajor(bin); got != want {
			t.Errorf("containerd --version %q: major %d, want %d", out, got, want)
		}
	}
	if got := containerdMajor(filepath.Join(dir, "missing")); got != 1 {
		t.Errorf("missing binary: %d", got)
	}
}

func TestOptionsDefaults(t *testing.T) {
	if _, err := (Options{Ready: regexp.MustCompile("x")}).withDefaults(); err == nil {
		t.Error("no image: no error")
	}
	if _, err := (Options{Image: "x"}).withDefaults(); err == nil || !strings.Contains(err.Error(), "ready pattern") {
		t.Errorf("no ready pattern: %v", err)
	}
	o, err := Options{Image: "x", Ready: regexp.MustCompile("x")}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Executable()
	if o.Timeout != DefaultTimeout || o.PullTimeout != DefaultPullTimeout || o.Containerd != DefaultContainerd || o.Snapshotter != exe || o.Name != "default" || o.Log == nil || o.Output == nil {
		t.Fatalf("defaults %+v", o)
	}
}

// A process stopped by SIGTERM is not an error; one that ignores it is
// killed after the grace period.
func TestProcessStop(t *testing.T) {
	dir := t.TempDir()
	p, err := proc.Start(dir, "sleeper", exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	if err := stop(p, 5*time.Second); err != nil {
		t.Fatalf("stop: %v", err)
	}
	p, err = proc.Start(dir, "stubborn", exec.Command("sh", "-c", "trap '' TERM; echo up; sleep 60"))
	if err != nil {
		t.Fatal(err)
	}
	if err := proc.WaitReady(context.Background(), p, 5*time.Second, func() error {
		if !strings.Contains(p.LogTail(100), "up") {
			return os.ErrNotExist
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := stop(p, 200*time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("stop of a process ignoring SIGTERM: %v", err)
	}
}
