//go:build linux

package main

import (
	"fmt"
	"strings"
	"time"
)

// cost is a rough model of one workload on this kind of machine (2 cores,
// virtual disk), from earlier runs: enough to say whether a matrix takes
// minutes or hours, no more.
type cost struct {
	imageMB, tarMB float64
	// runSeconds is the command's own time with a warm file system.
	runSeconds float64
}

var costs = map[string]cost{
	"python": {imageMB: 64, tarMB: 185, runSeconds: 0.5},
	"large":  {imageMB: 371, tarMB: 1263, runSeconds: 4},
}

// Constants of the model.
const (
	coldSeconds   = 5.0   // images removed, daemon restarted, caches dropped
	unpackMBps    = 100.0 // containerd unpacking into overlayfs, tar MB/s
	verifyMBps    = 150.0 // the daemon verifying and unpacking a filled layer, tar MB/s
	diskMBps      = 150.0 // reading every file with a cold page cache
	fillRateMBps  = 8.4   // resolver.DefaultFillRate, 8 MiB/s
	fillDelay     = 5.0   // resolver.DefaultFillDelay
	lazyShare     = 0.3   // share of the image a start fetches
	setupSeconds  = 60.0  // build, registry, containerd
	recordSeconds = 15.0  // record run and attach, beside the start itself
)

// estimate is the expected duration of the benchmark o asks for.
func estimate(o options) time.Duration {
	total := setupSeconds
	for _, w := range o.Workloads {
		c := costs[w]
		total += c.imageMB/200 + c.tarMB/300 // push, index
		if o.has(benchPull) && contains(o.Modes, modeLazyPrefetch) {
			total += recordSeconds + 3*c.runSeconds
		}
		if o.has(benchPull) {
			for _, l := range o.Links {
				mbps := 1e9 / 8 / 1e6 // unshaped: about a gigabit
				if bits, err := parseRate(l); err == nil {
					mbps = bits / 8 / 1e6
				}
				runs := float64(o.runsFor(w, l))
				for _, m := range o.Modes {
					total += runs * (coldSeconds + c.runCost(o, m, mbps))
				}
			}
		}
		if o.has(benchRead) {
			fill := fillDelay + c.imageMB/fillRateMBps
			if o.ReadFastFill {
				fill = c.imageMB / 120
			}
			total += coldSeconds + c.imageMB/120 + c.tarMB/unpackMBps + fill + c.tarMB/verifyMBps
			total += float64(o.ReadRuns) * 2 * (c.tarMB/diskMBps + float64(o.RandomReads)*0.0005 + 2)
		}
	}
	return time.Duration(total * float64(time.Second))
}

// runCost is one run of mode m on a link of mbps MB/s, after the cold
// start.
func (c cost) runCost(o options, m string, mbps float64) float64 {
	mi := modes[m]
	if !mi.Lazy {
		return c.imageMB/mbps + c.tarMB/unpackMBps + c.runSeconds + 1
	}
	ready := 2*c.runSeconds + lazyShare*c.imageMB/mbps
	if !o.Settle || mi.Diagnostic {
		return ready + c.runSeconds
	}
	fill := fillDelay + c.imageMB/min(mbps, fillRateMBps)
	return max(ready, fill) + c.tarMB/verifyMBps
}

// describeEstimate says what the benchmark will run and how long it is
// expected to take.
func describeEstimate(o options) string {
	var runs int
	for _, w := range o.Workloads {
		for _, l := range o.Links {
			runs += o.runsFor(w, l) * len(o.Modes)
		}
	}
	if !o.has(benchPull) {
		runs = 0
	}
	return fmt.Sprintf("benchmarks %s; workloads %s; links %s; modes %s; %d pull runs; expected to take about %v (rough model, 2 cores)",
		strings.Join(o.Bench, ","), strings.Join(o.Workloads, ","), strings.Join(o.Links, ","), strings.Join(o.Modes, ","),
		runs, estimate(o).Round(time.Minute))
}
