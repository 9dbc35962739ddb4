package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/soci"
)

// runReport is the --json output of create and convert.
type runReport struct {
	Image  string `json:"image"`
	Target string `json:"target,omitempty"`
	// TargetDigest is the digest of the SOCI-enabled image convert pushed.
	TargetDigest digest.Digest     `json:"targetDigest,omitempty"`
	Platforms    []*platformResult `json:"platforms"`
	// version is the SOCI index version the command pushes, for the text
	// output.
	version string
}

// platformResult reports one platform manifest of the image.
type platformResult struct {
	Platform string         `json:"platform"`
	Manifest digest.Digest  `json:"manifest"`
	Index    digest.Digest  `json:"index,omitempty"`
	Layers   []*layerResult `json:"layers"`
	Error    string         `json:"error,omitempty"`
}

// layerResult reports what happened to one layer.
type layerResult struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	// Status is "indexed", "reused", "skipped" or "failed".
	Status   string        `json:"status"`
	Reason   string        `json:"reason,omitempty"`
	Ztoc     digest.Digest `json:"ztoc,omitempty"`
	ZtocSize int64         `json:"ztocSize,omitempty"`
	// PackHead and PackWindows are the zTOC's pack blobs (no windows
	// blob when the layer needs no window).
	PackHead        digest.Digest `json:"packHead,omitempty"`
	PackHeadSize    int64         `json:"packHeadSize,omitempty"`
	PackWindows     digest.Digest `json:"packWindows,omitempty"`
	PackWindowsSize int64         `json:"packWindowsSize,omitempty"`
	Spans           int           `json:"spans,omitempty"`
	Seconds         float64       `json:"seconds,omitempty"`
}

// fill returns rep with the engine's result.
func (rep runReport) fill(res *soci.Result, minLayerSize int64) runReport {
	rep.TargetDigest = res.Image.Digest
	rep.Platforms = make([]*platformResult, len(res.Platforms))
	for i, p := range res.Platforms {
		r := &platformResult{Platform: platforms.Format(p.Platform), Manifest: p.Manifest.Digest, Index: p.Index.Digest}
		if p.Err != nil {
			r.Error = p.Err.Error()
		}
		if p.Layers != nil {
			r.Layers = make([]*layerResult, len(p.Layers))
			for j, l := range p.Layers {
				r.Layers[j] = newLayerResult(l, minLayerSize)
			}
		}
		rep.Platforms[i] = r
	}
	return rep
}

func newLayerResult(l soci.LayerResult, minLayerSize int64) *layerResult {
	r := &layerResult{Digest: l.Layer.Digest, MediaType: l.Layer.MediaType, Size: l.Layer.Size, Status: string(l.Status),
		Ztoc: l.Ztoc.Digest, ZtocSize: l.Ztoc.Size, Spans: l.Spans, Seconds: l.Duration.Seconds(),
		PackHead: l.Pack.Head.Digest, PackHeadSize: l.Pack.Head.Size, PackWindows: l.Pack.Windows.Digest, PackWindowsSize: l.Pack.Windows.Size}
	switch {
	case l.Status == soci.LayerSkipped && errors.Is(l.Reason, soci.ErrLayerTooSmall):
		r.Reason = fmt.Sprintf("%s is below --min-layer-size %s", humanBytes(l.Layer.Size), humanBytes(minLayerSize))
	case l.Status == soci.LayerSkipped && l.Reason != nil:
		r.Reason = l.Reason.Error()
	case l.Status == soci.LayerReused && l.FromCache:
		r.Reason = "zTOC from the local cache"
	case l.Status == soci.LayerReused:
		r.Reason = "zTOC already in the registry"
	}
	return r
}

// finish prints the per-platform summary and fails when any platform did.
func finish(cmd *cobra.Command, o indexFlags, rep runReport) error {
	out := cmd.OutOrStdout()
	var failed []string
	for _, r := range rep.Platforms {
		if r.Error != "" {
			failed = append(failed, fmt.Sprintf("%s: %s", r.Platform, r.Error))
		}
	}
	switch {
	case o.JSON:
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	case o.Quiet && rep.TargetDigest != "":
		fmt.Fprintln(out, rep.TargetDigest)
	case o.Quiet:
		for _, r := range rep.Platforms {
			if r.Index != "" {
				fmt.Fprintln(out, r.Index)
			}
		}
	default:
		printIndexLines(out, rep)
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d platforms failed:\n  %s", len(failed), len(rep.Platforms), strings.Join(failed, "\n  "))
	}
	if rep.TargetDigest != "" && !o.Quiet && !o.JSON {
		fmt.Fprintf(out, "image    %s  %s\n", rep.TargetDigest, rep.Target)
	}
	return nil
}

// printIndexLines prints one line per SOCI index pushed.
func printIndexLines(out io.Writer, rep runReport) {
	for _, r := range rep.Platforms {
		if r.Index == "" {
			continue
		}
		n := 0
		for _, l := range r.Layers {
			if l != nil && l.Ztoc != "" {
				n++
			}
		}
		fmt.Fprintf(out, "index    %s  SOCI index %s for %s (manifest %s, %d of %d layers)\n", r.Index, rep.version, r.Platform, short(r.Manifest), n, len(r.Layers))
	}
}

// layerPrinter is the soci.Observer of create and convert: it prints a line
// per layer as layers finish (unless -q or --json) and draws the progress
// line of the layers being indexed on a terminal.
type layerPrinter struct {
	// mu serializes lines: layers finish concurrently and out may be any
	// io.Writer (cobra's SetOut).
	mu           sync.Mutex
	out          io.Writer
	lines        bool
	minLayerSize int64
	progress     *progress
}

func newLayerPrinter(stdout, stderr io.Writer, o indexFlags) *layerPrinter {
	lines := !o.Quiet && !o.JSON
	return &layerPrinter{out: stdout, lines: lines, minLayerSize: o.MinLayerSize, progress: newProgress(stderr, lines && isTerminal(stderr))}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func (p *layerPrinter) LayerStarted(l ocispec.Descriptor) func(int64) {
	return p.progress.start(l.Digest, l.Size).Store
}

func (p *layerPrinter) LayerStopped(l ocispec.Descriptor) { p.progress.finish(l.Digest) }

func (p *layerPrinter) LayerDone(l soci.LayerResult) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if l.CacheErr != nil {
		fmt.Fprintf(p.out, "warning: %v\n", l.CacheErr)
	}
	if !p.lines {
		return
	}
	p.progress.clear()
	r := newLayerResult(l, p.minLayerSize)
	switch l.Status {
	case soci.LayerIndexed:
		fmt.Fprintf(p.out, "indexed  %s  %s in %.1fs (%s/s), %d spans -> ztoc %s (%s)\n", short(r.Digest), humanBytes(r.Size), r.Seconds,
			humanBytes(int64(float64(r.Size)/max(r.Seconds, 1e-3))), r.Spans, short(r.Ztoc), humanBytes(r.ZtocSize))
	case soci.LayerReused:
		fmt.Fprintf(p.out, "reused   %s  %s: %s -> ztoc %s\n", short(r.Digest), humanBytes(r.Size), r.Reason, short(r.Ztoc))
	case soci.LayerSkipped:
		fmt.Fprintf(p.out, "skipped  %s  %s: %s\n", short(r.Digest), humanBytes(r.Size), r.Reason)
	}
}

func (p *layerPrinter) close() { p.progress.close() }

func short(d digest.Digest) string {
	if len(d) > 19 {
		return string(d[:19])
	}
	return string(d)
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
