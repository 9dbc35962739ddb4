//go:build linux

package main

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

var (
	colorFull = color.RGBA{R: 0x4c, G: 0x72, B: 0xb0, A: 0xff}
	colorLazy = color.RGBA{R: 0xdd, G: 0x84, B: 0x52, A: 0xff}
)

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
	if len(names) > 0 {
		names = append(names, "bytes.png")
	}
	return names
}

// charts draws the time to first line by link (lazy vs full), one chart
// per workload, and the bytes fetched per workload and link.
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
		cells := byWorkload[w]
		var labels, fullText, lazyText []string
		var full, lazy plotter.Values
		for _, c := range cells {
			labels = append(labels, linkLabel(c.Link, o))
			full, lazy = append(full, c.FullSeconds), append(lazy, c.LazySeconds)
			fullText = append(fullText, fmt.Sprintf("%.1f s", c.FullSeconds))
			lazyText = append(lazyText, fmt.Sprintf("%.1f s (%.2fx)", c.LazySeconds, c.TimeRatio))
		}
		title := fmt.Sprintf("%s image (%.0f MB): time from pull start to first output line", w, float64(rep.Images[w].Bytes)/1e6)
		if err := barChart(filepath.Join(dir, "time-"+w+".png"), title, "seconds (median)", labels,
			[2]plotter.Values{full, lazy}, [2][]string{fullText, lazyText}); err != nil {
			return err
		}
	}
	var labels, fullText, lazyText []string
	var full, lazy plotter.Values
	for _, w := range order {
		for _, c := range byWorkload[w] {
			l := c.Link
			if l != "unshaped" {
				l = fmt.Sprintf("%s+%gms", l, o.RTTms)
			}
			labels = append(labels, w+"\n"+l)
			full, lazy = append(full, float64(c.FullBytes)/1e6), append(lazy, float64(c.LazyBytes)/1e6)
			fullText = append(fullText, fmt.Sprintf("%.0f MB", float64(c.FullBytes)/1e6))
			lazyText = append(lazyText, fmt.Sprintf("%.0f MB (%.0f%%)", float64(c.LazyBytes)/1e6, c.LazyPercent))
		}
	}
	if len(labels) == 0 {
		return nil
	}
	return barChart(filepath.Join(dir, "bytes.png"), "Bytes fetched from the registry (lazy: % of the compressed image)", "MB (median)",
		labels, [2]plotter.Values{full, lazy}, [2][]string{fullText, lazyText})
}

// barChart draws full and lazy (vals[0], vals[1]) side by side per label,
// each bar labelled with its text.
func barChart(path, title, ylabel string, labels []string, vals [2]plotter.Values, text [2][]string) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Y.Min = 0
	w := vg.Points(22)
	if len(labels) > 6 {
		w = vg.Points(14)
	}
	var top float64
	for i, vals := range vals {
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return fmt.Errorf("chart %s: %w", path, err)
		}
		bars.LineStyle.Width = 0
		bars.Color = colorFull
		name := "full pull (overlayfs)"
		bars.Offset = -w / 2
		if i == 1 {
			bars.Color, name, bars.Offset = colorLazy, "lazy (spanpull)", w/2
		}
		p.Add(bars)
		p.Legend.Add(name, bars)
		var xys plotter.XYs
		for j, v := range vals {
			xys = append(xys, plotter.XY{X: float64(j), Y: v})
			top = max(top, v)
		}
		lbl, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: text[i]})
		if err != nil {
			return fmt.Errorf("chart %s: %w", path, err)
		}
		for k := range lbl.TextStyle {
			lbl.TextStyle[k].XAlign = -0.5
			lbl.TextStyle[k].Font.Size = vg.Points(8)
		}
		lbl.Offset = vg.Point{X: bars.Offset, Y: vg.Points(2)}
		p.Add(lbl)
	}
	p.Y.Max = top * 1.3 // room for the labels and the legend
	p.Legend.Top = true
	p.NominalX(labels...)
	p.Y.Tick.Marker = plainTicks{}
	width := vg.Length(max(6, 1.3*float64(len(labels)))) * vg.Inch
	c := vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(width, 4*vg.Inch), vgimg.UseDPI(144))}
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
