//go:build linux

package main

import (
	"fmt"
	"strings"
)

// Modes of a pull run. The first three are what the issues set targets
// for, with the daemon's defaults; the last two are diagnostics, shown
// beside them to explain a figure, never instead of them.
const (
	modeFull         = "full"          // ctr image pull (overlayfs) + ctr run
	modeLazy         = "lazy"          // snapshotter pull + ctr run --snapshotter spanpull, daemon defaults
	modeLazyPrefetch = "lazy+prefetch" // lazy, of the image with its recorded start attached
	modeLazyNoFill   = "lazy-nofill"   // diagnostic: [remote] fill_rate_bytes = -1
	modeLazyNoVerify = "lazy-noverify" // diagnostic: [remote] verify_files = false
)

// allModes lists every mode in report order.
var allModes = []string{modeFull, modeLazy, modeLazyPrefetch, modeLazyNoFill, modeLazyNoVerify}

// modeInfo says how a mode pulls and which daemon settings it runs with.
type modeInfo struct {
	// Lazy pulls with the snapshotter; Prefetch pulls the image whose
	// index carries the recorded start.
	Lazy, Prefetch bool
	// Daemon are the settings the snapshotter runs with.
	Daemon daemonSettings
	// Diagnostic modes change a default; no target applies to them.
	Diagnostic bool
	// About says what the mode is, for the report.
	About string
}

// modes describes every mode by name.
var modes = map[string]modeInfo{
	modeFull: {About: "`ctr image pull` into overlayfs, then `ctr run`"},
	modeLazy: {Lazy: true,
		About: "`snapshotter pull` (SOCI index and pack from `indexer convert`), then `ctr run --snapshotter spanpull`; daemon defaults"},
	modeLazyPrefetch: {Lazy: true, Prefetch: true,
		About: "lazy, of the image with its start recorded once (`snapshotter record run`) and attached (`indexer prefetch attach`); daemon defaults"},
	modeLazyNoFill: {Lazy: true, Diagnostic: true, Daemon: daemonSettings{NoFill: true},
		About: "diagnostic: lazy with `[remote] fill_rate_bytes = -1` (no background fill): what the start alone fetches"},
	modeLazyNoVerify: {Lazy: true, Diagnostic: true, Daemon: daemonSettings{NoVerifyFiles: true},
		About: "diagnostic: lazy with `[remote] verify_files = false` (no per-file header check): the binding's cost"},
}

// parseModes checks a comma-separated list of modes and returns them in
// report order. Every lazy mode is measured against full, so full is
// always included.
func parseModes(s string) ([]string, error) {
	want := map[string]bool{modeFull: true}
	for _, m := range splitList(s) {
		if _, ok := modes[m]; !ok {
			return nil, fmt.Errorf("unknown mode %q (want %s)", m, strings.Join(allModes, ", "))
		}
		want[m] = true
	}
	var out []string
	for _, m := range allModes {
		if want[m] {
			out = append(out, m)
		}
	}
	return out, nil
}

// daemonSettings are the snapshotter settings a run changes from the
// daemon's defaults; the zero value is the defaults.
type daemonSettings struct {
	NoFill        bool // fill_rate_bytes = -1
	NoVerifyFiles bool // verify_files = false
	// FastFill starts the fill at mount, unthrottled (fill_delay_seconds
	// = 0, fill_rate_bytes = fastFillRate): only the read benchmark's
	// -read-fast-fill uses it, to reach a verified layer sooner.
	FastFill bool
}

// fastFillRate is the fill rate of daemonSettings.FastFill: far above any
// link here, so the fill is limited by the link alone.
const fastFillRate = 1 << 30

// daemonConfig is the snapshotter's config file for settings s: only what
// s changes is written, so everything else is the daemon's default.
// plainHTTP is the registry the runs pull from (the delay proxy).
func daemonConfig(plainHTTP string, s daemonSettings) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[remote]\n  plain_http = [%q]\n", plainHTTP)
	switch {
	case s.NoFill:
		b.WriteString("  fill_rate_bytes = -1\n")
	case s.FastFill:
		fmt.Fprintf(&b, "  fill_delay_seconds = 0\n  fill_rate_bytes = %d\n", fastFillRate)
	}
	if s.NoVerifyFiles {
		b.WriteString("  verify_files = false\n")
	}
	return b.String()
}

// containerID is a container name for a run: containerd allows letters,
// digits, '.', '_' and '-'.
func containerID(parts ...string) string {
	id := strings.Join(parts, "-")
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
			return r
		}
		return '_'
	}, id)
}
