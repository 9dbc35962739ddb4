//go:build linux

package main

import (
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// TestDaemonConfig checks each mode's config file parses and changes only
// the setting the mode is about.
func TestDaemonConfig(t *testing.T) {
	type remote struct {
		PlainHTTP     []string `toml:"plain_http"`
		FillRateBytes *int64   `toml:"fill_rate_bytes"`
		FillDelay     *int     `toml:"fill_delay_seconds"`
		VerifyFiles   *bool    `toml:"verify_files"`
	}
	for _, m := range allModes {
		var cfg struct{ Remote remote }
		text := daemonConfig("198.18.0.2:5001", modes[m].Daemon)
		if err := toml.Unmarshal([]byte(text), &cfg); err != nil {
			t.Fatalf("%s: %v\n%s", m, err, text)
		}
		r := cfg.Remote
		if len(r.PlainHTTP) != 1 || r.PlainHTTP[0] != "198.18.0.2:5001" || r.FillDelay != nil {
			t.Errorf("%s: %+v", m, r)
		}
		if (r.FillRateBytes != nil) != (m == modeLazyNoFill) || (r.FillRateBytes != nil && *r.FillRateBytes != -1) {
			t.Errorf("%s: fill_rate_bytes %v", m, r.FillRateBytes)
		}
		if (r.VerifyFiles != nil) != (m == modeLazyNoVerify) || (r.VerifyFiles != nil && *r.VerifyFiles) {
			t.Errorf("%s: verify_files %v", m, r.VerifyFiles)
		}
	}
	if text := daemonConfig("r:1", daemonSettings{FastFill: true}); !strings.Contains(text, "fill_delay_seconds = 0\n") {
		t.Errorf("fast fill config:\n%s", text)
	}
}

func TestContainerID(t *testing.T) {
	if got := containerID("bench", "large", "100mbit", modeLazyPrefetch, "2"); got != "bench-large-100mbit-lazy_prefetch-2" {
		t.Errorf("containerID = %q", got)
	}
}

// TestRandomSample checks the sample is reproducible, stays inside its
// files at aligned offsets, and bounds the files it opens.
func TestRandomSample(t *testing.T) {
	var files []fileInfo
	for i := range 1000 {
		files = append(files, fileInfo{path: strings.Repeat("f", i%7+1) + string(rune('a'+i%26)), size: int64(i * 1000)})
	}
	a, b := randomSample(files, 3000), randomSample(files, 3000)
	if len(a.reads) != 3000 || len(a.files) != sampleFiles {
		t.Fatalf("%d reads over %d files", len(a.reads), len(a.files))
	}
	size := map[string]int64{}
	for _, f := range files {
		size[f.path] = f.size
	}
	for i, r := range a.reads {
		if r != b.reads[i] || a.files[r.file] != b.files[r.file] {
			t.Fatal("two samples with the same seed differ")
		}
		if r.off%readSize != 0 || r.off+readSize > size[a.files[r.file]] {
			t.Fatalf("read at %d of %s (%d bytes)", r.off, a.files[r.file], size[a.files[r.file]])
		}
	}
	if s := randomSample([]fileInfo{{path: "small", size: 100}}, 10); len(s.reads) != 0 {
		t.Errorf("reads in files under 4 KiB: %+v", s)
	}
}

func TestPercentile(t *testing.T) {
	v := []float64{5, 1, 4, 2, 3, 6, 7, 8, 9, 10}
	if p := percentile(v, 0.5); p != 5 {
		t.Errorf("median %v", p)
	}
	if p := percentile(v, 0.99); p != 10 {
		t.Errorf("p99 %v", p)
	}
	if p := percentile(nil, 0.5); p != 0 {
		t.Errorf("percentile of nothing %v", p)
	}
}

// TestEstimate checks the model grows with what is asked for.
func TestEstimate(t *testing.T) {
	full, _ := parseFlags(nil)
	smoke, _ := parseFlags([]string{"-smoke"})
	if e := estimate(smoke); e < 20*time.Second || e > 3*time.Minute {
		t.Errorf("smoke estimated at %v", e)
	}
	if e := estimate(full); e < 30*time.Minute || e > 6*time.Hour {
		t.Errorf("full matrix estimated at %v", e)
	}
	if !strings.Contains(describeEstimate(full), "pull runs") {
		t.Error(describeEstimate(full))
	}
}
