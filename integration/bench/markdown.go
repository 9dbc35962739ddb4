//go:build linux

package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spanpull/spanpull/soci"
)

func mb(b float64) string { return fmt.Sprintf("%.1f MB", b/1e6) }

func mib(b int64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

// markdown renders the section for BENCHMARKS.md.
func (rep *report) markdown() string {
	var b strings.Builder
	if len(rep.Cells) > 0 {
		rep.pullMarkdown(&b)
	}
	if len(rep.Reads) > 0 {
		rep.readMarkdown(&b)
	}
	if len(rep.Targets) > 0 {
		b.WriteString("\n### Targets set by the issues\n\n| target | goal | measured | met |\n|---|---|---|---|\n")
		for _, t := range rep.Targets {
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.Name, t.Goal, t.Measured, map[bool]string{true: "yes", false: "**no**"}[t.Met])
		}
	}
	rep.setupMarkdown(&b)
	if names := rep.chartNames(); len(names) > 0 {
		b.WriteString("\n")
		for _, n := range names {
			fmt.Fprintf(&b, "![%s](%s)\n", strings.TrimSuffix(n, ".png"), n)
		}
	}
	return b.String()
}

// pullMarkdown writes one table per image and link with every mode, then
// what the daemon fetched before the ready line.
func (rep *report) pullMarkdown(b *strings.Builder) {
	o := rep.Options
	fmt.Fprintf(b, "## Lazy pull vs full pull (scripts/bench-lazy.sh)\n\n")
	fmt.Fprintf(b, "Time from the start of the pull to the container's ready line (its first output line), and bytes the registry "+
		"sent by then, median of cold runs. Same registry, same run, the order of the modes rotating from run to run. "+
		"Links: tbf on both ends of a veth pair to a network namespace holding docker-registry, plus %g ms RTT from a "+
		"delay proxy (unshaped: no tbf, no delay). Bytes and requests are counted in that proxy for every mode (HTTP "+
		"responses, headers included); bytes before ready are its counter when the ready line appeared (the background "+
		"fill goes on after it). Span size: %s. Modes:\n\n", o.RTTms,
		map[bool]string{true: fmt.Sprintf("%d bytes (`indexer convert --span-size %d`, packs included)", o.SpanSize, o.SpanSize), false: fmt.Sprintf("the indexer's default, %d KiB", soci.DefaultSpanSize>>10)}[o.SpanSize > 0])
	for _, m := range o.Modes {
		fmt.Fprintf(b, "- **%s**: %s\n", m, modes[m].About)
	}
	settle := "off (-settle=false): peak RSS is read at the container's exit"
	if o.Settle {
		settle = "on: after each lazy and lazy+prefetch run the harness waits until the daemon reports the layer verified " +
			"(fill done, layer checked against its digests, unpacked as a local tree); \"settled\" is that time from the pull's start, " +
			"peak RSS (VmHWM) is read after it"
	}
	fmt.Fprintf(b, "\nSettling: %s.\n", settle)
	for _, c := range rep.Cells {
		fmt.Fprintf(b, "\n### %s image (%s compressed), %s\n\n", c.Workload, mb(float64(c.ImageBytes)), linkLabel(c.Link, o))
		b.WriteString("| mode | runs | ready (s) | x full | pull (s) | bytes before ready | % of image | range GETs before ready | bytes at exit | settled (s) | bytes settled | daemon peak RSS | fd holder RSS | daemon CPU (s) |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, m := range c.Modes {
			runs := fmt.Sprint(m.Runs)
			if m.Failed > 0 || m.Unsettled > 0 {
				runs += fmt.Sprintf(" (%d failed, %d unsettled)", m.Failed, m.Unsettled)
			}
			settled, bSettled := "-", "-"
			if m.Settled > 0 {
				settled, bSettled = fmt.Sprintf("%.1f", m.SettledSeconds), mb(float64(m.BytesSettled))
			}
			fmt.Fprintf(b, "| %s | %s | %.2f | %.2fx | %.2f | %s | %.1f%% | %.0f | %s | %s | %s | %s | %s | %.2f |\n",
				m.Mode, runs, m.ReadySeconds, m.TimeRatio, m.PullSeconds, mb(float64(m.BytesBeforeReady)), m.PercentBeforeReady,
				m.RangeGetsBefore, mb(float64(m.BytesAtExit)), settled, bSettled, mib(m.DaemonPeakRSS), mib(m.HolderPeakRSS), m.DaemonCPUSeconds)
		}
	}
	b.WriteString("\n### What the daemon had fetched by the ready line (lazy modes, medians)\n\n")
	b.WriteString("Index: the pack head (or zTOC) fetched at mount; windows: the pack's checkpoint windows; demand, prefetch and fill: " +
		"span bytes by fetch class; header checks: tar header bytes read to check files against their TOC entries (verify_files).\n\n")
	b.WriteString("| image | link | mode | index | windows | demand | prefetch | fill | header checks | requests |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, c := range rep.Cells {
		for _, m := range c.Modes {
			if !modes[m.Mode].Lazy {
				continue
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f |\n", c.Workload, linkLabel(c.Link, o), m.Mode,
				mb(m.IndexBytes), mb(m.WindowBytes), mb(m.DemandBytes), mb(m.PrefetchBytes), mb(m.FillBytes), mb(m.HeaderBytes), m.RequestsBefore)
		}
	}
}

// readMarkdown writes the read benchmark's table.
func (rep *report) readMarkdown(b *strings.Builder) {
	o := rep.Options
	b.WriteString("\n## Reading a fully fetched lazy layer (issue 9 item 4)\n\n")
	fill := "with the daemon's defaults"
	if o.ReadFastFill {
		fill = "unthrottled from mount (-read-fast-fill: fill_delay_seconds = 0; it only decides when the layer is complete)"
	}
	fmt.Fprintf(b, "The image pulled both ways at once, unshaped: in full into overlayfs, and lazily into spanpull, whose background "+
		"fill (%s) fetched the whole layer, after which the daemon verified it and unpacked it as a local tree (the harness waits for "+
		"`spanpull_resolver_layers{state=\"verified\"}`). Each is read through an active snapshot over the image (what `ctr run` mounts "+
		"for a container): **spanpull** is one prepared after the verification (overlayfs over the layer's local tree), **spanpull-fuse** "+
		"one prepared right after the lazy pull, as for a container started while the layer was lazy (its rootfs stacks the FUSE mount "+
		"for good; passthrough once verified; diagnostic). Page cache dropped before each pass (`echo 3 > drop_caches`), file systems taking turns to go first: **read all** "+
		"reads every regular file once, sequentially, in 1 MiB reads (a Go walker); **random** does %d preads of 4 KiB at 4 KiB-aligned "+
		"offsets, every block of up to %d files (chosen by size, the same on both) equally likely, files opened before the cache is dropped. "+
		"Medians of %d passes.\n\n", fill, o.RandomReads, sampleFiles, o.ReadRuns)
	b.WriteString("| image | file system | files | bytes | read all (s) | MB/s | x overlayfs | random 4 KiB median (us) | p99 (us) | x overlayfs |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range rep.ReadSums {
		for _, fs := range readFileSystems {
			if s.MBps[fs] == 0 {
				continue
			}
			t, l := s.ratios(fs)
			tr, lr := fmt.Sprintf("%.2fx", t), fmt.Sprintf("%.2fx", l)
			fmt.Fprintf(b, "| %s | %s | %d | %s | %.2f | %.0f | %s | %.0f | %.0f | %s |\n", s.Workload, fs, s.Files, mb(float64(s.Bytes)),
				float64(s.Bytes)/1e6/s.MBps[fs], s.MBps[fs], tr, s.MedianMicros[fs], s.P99Micros[fs], lr)
		}
	}
	b.WriteString("\n")
	for _, r := range rep.Reads {
		if r.Error != "" {
			fmt.Fprintf(b, "- %s: **failed**: %s\n", r.Workload, firstLine(r.Error))
			continue
		}
		fmt.Fprintf(b, "- %s: layer verified %.1f s after the lazy pull started (snapshot label `%s`); daemon peak RSS %s, fd holder %s; "+
			"%d daemon log lines about passthrough not in use\n", r.Workload, r.SettledSeconds, r.VerifiedLabel,
			mib(r.DaemonPeakRSS), mib(r.HolderPeakRSS), len(r.DaemonNotes))
	}
}

// setupMarkdown writes the images, the machine and the commands.
func (rep *report) setupMarkdown(b *strings.Builder) {
	b.WriteString("\n### Images\n\nOne gzip layer each, linux/amd64, built by scripts/debian-layer.sh:\n\n")
	for _, n := range slices.Sorted(maps.Keys(rep.Images)) {
		im := rep.Images[n]
		fmt.Fprintf(b, "- %s: %s compressed; command `%s`\n", n, mb(float64(im.Bytes)), strings.Join(quoteArgs(im.Command), " "))
	}
	m := rep.Machine
	b.WriteString("\n### Machine\n\n")
	fmt.Fprintf(b, "- kernel %s; CPU %s, %d cores; RAM %s\n", m.Kernel, m.CPU, m.Cores, m.RAM)
	fmt.Fprintf(b, "- %s; %s; %s; %s\n", m.Containerd, m.Runc, m.Go, m.Registry)
	fmt.Fprintf(b, "- spanpull %s; page cache %s\n", m.SpanpullRev, m.DropCacheNote)
	fmt.Fprintf(b, "- %s, took %.0f s\n", rep.Started.UTC().Format(time.RFC3339), rep.Seconds)

	b.WriteString("\n### Commands\n\n```\n")
	fmt.Fprintf(b, "# harness\n%s\n", rep.Command)
	fmt.Fprintf(b, "# REG=%s (the delay proxy in the registry's namespace), SOCK=containerd 1.6's socket, W=workload\n", rep.Registry)
	b.WriteString("# full, timed from before the pull to ctr run's first stdout line\n")
	b.WriteString("ctr -a $SOCK -n bench images pull --plain-http $REG/bench/$W:image\n")
	b.WriteString("ctr -a $SOCK -n bench run --rm $REG/bench/$W:image $ID $CMD\n")
	b.WriteString("# lazy (and the diagnostics, with their [remote] setting in the daemon's config)\n")
	b.WriteString("snapshotter pull -a $SOCK -n bench --plain-http $REG/bench/$W:image-soci\n")
	b.WriteString("ctr -a $SOCK -n bench run --rm --snapshotter spanpull $REG/bench/$W:image-soci $ID $CMD\n")
	b.WriteString("# lazy+prefetch: the same with $REG/bench/$W:image-soci-prefetch\n")
	b.WriteString("# before every run\n")
	b.WriteString("ctr tasks/containers rm; ctr images rm --sync (GC removes content and snapshots; checked empty)\n")
	b.WriteString("snapshotter serve restarted with an empty --root and the mode's config; proxy counters reset, its connections closed\n")
	b.WriteString("sync; echo 3 > /proc/sys/vm/drop_caches\n")
	b.WriteString("# image set-up (once, unshaped, straight to the registry)\n")
	b.WriteString("push the cached layer as a linux/amd64 OCI image (go-containerregistry), then\n")
	b.WriteString("indexer convert --plain-http [--span-size N] $REG/bench/$W:image $REG/bench/$W:image-soci\n")
	b.WriteString("snapshotter record run --plain-http --ready '^$READY_LINE$' -o rec.json $REG/bench/$W:image-soci -- $CMD\n")
	b.WriteString("tag image-soci as image-soci-prefetch; indexer prefetch attach --plain-http $REG/bench/$W:image-soci-prefetch rec.json\n")
	b.WriteString("# read benchmark: both pulls, wait for the layer's verification, then for each snapshotter\n")
	b.WriteString("ctr snapshots --snapshotter {overlayfs,spanpull} prepare --mounts KEY $CHAIN_ID; mount; read; umount; rm\n")
	b.WriteString("```\n")
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.ContainsAny(a, " \"'();,") {
			a = "'" + a + "'"
		}
		out[i] = a
	}
	return out
}
