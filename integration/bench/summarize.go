//go:build linux

package main

// Series of the daemon's fetch counters the report breaks bytes down by.
const (
	metricIndexBytes    = `spanpull_resolver_fetched_bytes_total{kind="ztoc"}`
	metricWindowBytes   = `spanpull_resolver_fetched_bytes_total{kind="window"}`
	metricDemandBytes   = `spanpull_resolver_class_fetched_bytes_total{class="demand"}`
	metricPrefetchBytes = `spanpull_resolver_class_fetched_bytes_total{class="prefetch"}`
	metricFillBytes     = `spanpull_resolver_class_fetched_bytes_total{class="fill"}`
	metricHeaderBytes   = `spanpull_resolver_header_check_bytes_total`
)

// failedRuns counts the pull runs and read benchmarks that failed or did
// not settle.
func (rep *report) failedRuns() int {
	n := 0
	for _, r := range rep.Runs {
		if r.failed() {
			n++
		}
	}
	for _, r := range rep.Reads {
		if r.Error != "" {
			n++
		}
	}
	return n
}

// summarize computes the cells (medians of the successful runs), the read
// summaries, and checks the targets.
func (rep *report) summarize(o options) {
	rep.Cells = nil
	for _, w := range o.Workloads {
		for _, l := range o.Links {
			c := cell{Workload: w, Link: l, ImageBytes: rep.Images[w].Bytes}
			for _, m := range o.Modes {
				if mc, ok := rep.modeCell(w, l, m, c.ImageBytes); ok {
					c.Modes = append(c.Modes, mc)
				}
			}
			if full, ok := c.mode(modeFull); ok && full.ReadySeconds > 0 {
				for i := range c.Modes {
					if c.Modes[i].Runs > 0 {
						c.Modes[i].TimeRatio = c.Modes[i].ReadySeconds / full.ReadySeconds
					}
				}
			}
			if len(c.Modes) > 0 {
				rep.Cells = append(rep.Cells, c)
			}
		}
	}
	rep.ReadSums = nil
	for _, r := range rep.Reads {
		if s, ok := summarizeRead(r); ok {
			rep.ReadSums = append(rep.ReadSums, s)
		}
	}
	rep.Targets = rep.targets(o)
}

// modeCell summarizes the runs of one workload, link and mode; false when
// there are none.
func (rep *report) modeCell(w, l, m string, imageBytes int64) (modeCell, bool) {
	mc := modeCell{Mode: m}
	var ready, pull, exit, before, atExit, reqs, rgBefore, rgExit, settled, bSettled, cpu []float64
	var index, window, demand, prefetch, fill, header []float64
	seen := false
	for _, r := range rep.Runs {
		if r.Workload != w || r.Link != l || r.Mode != m {
			continue
		}
		seen = true
		if r.Error != "" {
			mc.Failed++
			continue
		}
		if r.SettleError != "" {
			mc.Unsettled++ // its figures up to the exit still count
		}
		mc.Runs++
		ready, pull, exit = append(ready, r.ReadySeconds), append(pull, r.PullSeconds), append(exit, r.ExitSeconds)
		before, atExit = append(before, float64(r.Before.Down)), append(atExit, float64(r.Exit.Down))
		reqs, rgBefore, rgExit = append(reqs, float64(r.Before.Requests)), append(rgBefore, float64(r.Before.RangeGets)), append(rgExit, float64(r.Exit.RangeGets))
		if r.Settled != nil {
			mc.Settled++
			settled, bSettled = append(settled, r.SettledSeconds), append(bSettled, float64(r.Settled.Down))
		}
		if r.MetricsAtReady != nil {
			index, window = append(index, r.MetricsAtReady[metricIndexBytes]), append(window, r.MetricsAtReady[metricWindowBytes])
			demand, prefetch = append(demand, r.MetricsAtReady[metricDemandBytes]), append(prefetch, r.MetricsAtReady[metricPrefetchBytes])
			fill, header = append(fill, r.MetricsAtReady[metricFillBytes]), append(header, r.MetricsAtReady[metricHeaderBytes])
		}
		if modes[m].Lazy {
			cpu = append(cpu, r.DaemonCPUSeconds)
			mc.DaemonPeakRSS, mc.HolderPeakRSS = max(mc.DaemonPeakRSS, r.DaemonPeakRSS), max(mc.HolderPeakRSS, r.HolderPeakRSS)
		}
	}
	mc.ReadySeconds, mc.PullSeconds, mc.ExitSeconds = median(ready), median(pull), median(exit)
	mc.BytesBeforeReady, mc.BytesAtExit = int64(median(before)), int64(median(atExit))
	mc.RequestsBefore, mc.RangeGetsBefore, mc.RangeGetsAtExit = median(reqs), median(rgBefore), median(rgExit)
	mc.SettledSeconds, mc.BytesSettled = median(settled), int64(median(bSettled))
	mc.IndexBytes, mc.WindowBytes, mc.DemandBytes = median(index), median(window), median(demand)
	mc.PrefetchBytes, mc.FillBytes, mc.HeaderBytes = median(prefetch), median(fill), median(header)
	mc.DaemonCPUSeconds = median(cpu)
	if imageBytes > 0 {
		mc.PercentBeforeReady = 100 * float64(mc.BytesBeforeReady) / float64(imageBytes)
	}
	return mc, seen
}

// summarizeRead takes the medians of a read benchmark's passes; false
// when it has none.
func summarizeRead(r readResult) (readSum, bool) {
	s := readSum{Workload: r.Workload, Files: r.Files, Bytes: r.Bytes,
		MBps: map[string]float64{}, MedianMicros: map[string]float64{}, P99Micros: map[string]float64{}}
	for _, fs := range readFileSystems {
		var mbps, med, p99 []float64
		for _, p := range r.Passes {
			if p.FS == fs {
				mbps, med, p99 = append(mbps, p.MBps), append(med, p.MedianMicros), append(p99, p.P99Micros)
			}
		}
		if len(mbps) == 0 {
			if fs == fsSpanpullFUSE {
				continue // a run from before the diagnostic
			}
			return s, false
		}
		s.Passes = len(mbps)
		s.MBps[fs], s.MedianMicros[fs], s.P99Micros[fs] = median(mbps), median(med), median(p99)
	}
	s.ThroughputRatio, s.LatencyRatio = s.ratios(fsSpanpull)
	return s, true
}

// ratios returns file system fs's throughput and median latency over
// overlayfs's (0 where there is no figure).
func (s readSum) ratios(fs string) (throughput, latency float64) {
	if s.MBps[fsOverlay] > 0 {
		throughput = s.MBps[fs] / s.MBps[fsOverlay]
	}
	if s.MedianMicros[fsOverlay] > 0 {
		latency = s.MedianMicros[fs] / s.MedianMicros[fsOverlay]
	}
	return throughput, latency
}
