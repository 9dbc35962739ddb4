//go:build linux

package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// seriesColors colour the bars of a chart's series, in order.
var seriesColors = []color.RGBA{
	{R: 0x4c, G: 0x72, B: 0xb0, A: 0xff}, // full / overlayfs
	{R: 0xdd, G: 0x84, B: 0x52, A: 0xff}, // lazy / spanpull
	{R: 0x55, G: 0xa8, B: 0x68, A: 0xff}, // lazy+prefetch
	{R: 0x93, G: 0x93, B: 0x93, A: 0xff}, // diagnostics
	{R: 0xc4, G: 0xc4, B: 0xc4, A: 0xff},
}

// chartNames lists the PNGs charts writes, in order.
func (rep *report) chartNames() []string {
	var names []string
	seen := map[string]bool{}
	for _, c := range rep.Cells {
		if !seen[c.Workload] {
			seen[c.Workload] = true
			names = append(names, "time-"+c.Workload+".png")
		}
	}
	if len(rep.Cells) > 0 {
		names = append(names, "bytes.png")
	}
	if len(rep.ReadSums) > 0 {
		names = append(names, "read.png")
	}
	return names
}

// series is one bar per group, each with its label.
type series struct {
	name   string
	values plotter.Values
	labels []string
}

// charts draws the time to ready by link and mode, one chart per
// workload; the bytes before ready by workload, link and mode; and the
// read benchmark's throughput.
func (rep *report) charts(dir string) error {
	o := rep.Options
	byWorkload := map[string][]cell{}
	var order []string
	for _, c := range rep.Cells {
		if _, ok := byWorkload[c.Workload]; !ok {
			order = append(order, c.Workload)
		}
		byWorkload[c.Workload] = append(byWorkload[c.Workload], c)
	}
	for _, w := range order {
		var groups []string
		for _, c := range byWorkload[w] {
			groups = append(groups, linkLabel(c.Link, o))
		}
		ss := modeSeries(o.Modes, byWorkload[w], func(m modeCell) (float64, string) {
			if m.Mode == modeFull {
				return m.ReadySeconds, fmt.Sprintf("%.1f s", m.ReadySeconds)
			}
			return m.ReadySeconds, fmt.Sprintf("%.1f s (%.2fx)", m.ReadySeconds, m.TimeRatio)
		})
		title := fmt.Sprintf("%s image (%.0f MB): time from pull start to ready line", w, float64(rep.Images[w].Bytes)/1e6)
		if err := barChart(filepath.Join(dir, "time-"+w+".png"), title, "seconds (median)", groups, ss); err != nil {
			return err
		}
	}
	if len(rep.Cells) > 0 {
		var groups []string
		for _, c := range rep.Cells {
			l := c.Link
			if l != "unshaped" {
				l = fmt.Sprintf("%s+%gms", l, o.RTTms)
			}
			groups = append(groups, c.Workload+"\n"+l)
		}
		ss := modeSeries(o.Modes, rep.Cells, func(m modeCell) (float64, string) {
			return float64(m.BytesBeforeReady) / 1e6, fmt.Sprintf("%.0f MB (%.0f%%)", float64(m.BytesBeforeReady)/1e6, m.PercentBeforeReady)
		})
		if err := barChart(filepath.Join(dir, "bytes.png"), "Bytes fetched from the registry before the ready line (% of the compressed image)",
			"MB (median)", groups, ss); err != nil {
			return err
		}
	}
	return rep.readChart(dir)
}

// modeSeries makes one series per mode over cells, with value and label
// from f (zero for a cell without the mode).
func modeSeries(ms []string, cells []cell, f func(modeCell) (float64, string)) []series {
	var ss []series
	for _, m := range ms {
		s := series{name: m}
		for _, c := range cells {
			mc, ok := c.mode(m)
			v, l := 0.0, ""
			if ok {
				v, l = f(mc)
			}
			s.values, s.labels = append(s.values, v), append(s.labels, l)
		}
		ss = append(ss, s)
	}
	return ss
}

// readChart draws the read benchmark's throughput, overlayfs against
// spanpull, per workload.
func (rep *report) readChart(dir string) error {
	if len(rep.ReadSums) == 0 {
		return nil
	}
	var groups []string
	ss := []series{{name: "overlayfs (full pull)"}, {name: "spanpull, started once verified (local tree)"},
		{name: "spanpull, started while lazy (FUSE, passthrough)"}}
	for _, s := range rep.ReadSums {
		groups = append(groups, s.Workload)
		for i, fs := range readFileSystems {
			label := fmt.Sprintf("%.0f MB/s", s.MBps[fs])
			if t, _ := s.ratios(fs); fs != fsOverlay {
				label += fmt.Sprintf(" (%.2fx)", t)
			}
			ss[i].values, ss[i].labels = append(ss[i].values, s.MBps[fs]), append(ss[i].labels, label)
		}
	}
	return barChart(filepath.Join(dir, "read.png"), "Reading every file once, page cache dropped", "MB/s (median)", groups, ss)
}

// barChart draws the series side by side in each group, each bar
// labelled.
func barChart(path, title, ylabel string, groups []string, ss []series) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	w := vg.Points(max(8, 60/float64(len(ss))))
	if len(groups)*len(ss) > 12 {
		w = vg.Points(max(6, 40/float64(len(ss))))
	}
	var top float64
	for i, s := range ss {
		bars, err := plotter.NewBarChart(s.values, w)
		if err != nil {
			return fmt.Errorf("chart %s: %w", path, err)
		}
		bars.LineStyle.Width = 0
		bars.Color = seriesColors[min(i, len(seriesColors)-1)]
		bars.Offset = w * vg.Length(float64(i)-float64(len(ss)-1)/2)
		p.Add(bars)
		p.Legend.Add(s.name, bars)
		var xys plotter.XYs
		for j, v := range s.values {
			xys = append(xys, plotter.XY{X: float64(j), Y: v})
			top = max(top, v)
		}
		lbl, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: s.labels})
		if err != nil {
			return fmt.Errorf("chart %s: %w", path, err)
		}
		for k := range lbl.TextStyle {
			lbl.TextStyle[k].XAlign = draw.XLeft // along the rotated text: it starts at the bar's top
			lbl.TextStyle[k].YAlign = draw.YCenter
			lbl.TextStyle[k].Rotation = math.Pi / 2
			lbl.TextStyle[k].Font.Size = vg.Points(7)
		}
		lbl.Offset = vg.Point{X: bars.Offset, Y: vg.Points(3)}
		p.Add(lbl)
	}
	p.Y.Max = top * 1.7 // room for the rotated labels and the legend
	p.Legend.Top = true
	p.NominalX(groups...)
	p.X.Min, p.X.Max = -0.5, float64(len(groups))-0.5 // room for the outer bars
	p.Y.Tick.Marker = plainTicks{}
	width := vg.Length(max(6, 0.35*float64(len(groups)*len(ss))+1)) * vg.Inch
	c := vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(width, 4.5*vg.Inch), vgimg.UseDPI(144))}
	p.Draw(draw.New(c))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := c.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("chart %s: %w", path, err)
	}
	return f.Close()
}

// plainTicks are the default ticks labelled without trailing zeros.
type plainTicks struct{}

func (plainTicks) Ticks(lo, hi float64) []plot.Tick {
	ticks := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ticks {
		if ticks[i].Label != "" {
			ticks[i].Label = fmt.Sprintf("%g", ticks[i].Value)
		}
	}
	return ticks
}
