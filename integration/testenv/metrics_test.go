//go:build linux

package testenv

import (
	"strings"
	"testing"
)

// TestParseMetrics keeps counters, gauges and untyped samples by series
// and drops histogram series and other prefixes.
func TestParseMetrics(t *testing.T) {
	m, err := ParseMetrics(strings.NewReader(`# HELP spanpull_resolver_fetched_bytes_total x
# TYPE spanpull_resolver_fetched_bytes_total counter
spanpull_resolver_fetched_bytes_total{kind="span"} 1.2345e+06
spanpull_resolver_fetched_bytes_total{kind="ztoc"} 4096
# TYPE spanpull_layers_mounted gauge
spanpull_layers_mounted{mode="lazy",b="x"} 2
spanpull_resolver_spans_fetched_total 3
# TYPE spanpull_resolver_read_duration_seconds histogram
spanpull_resolver_read_duration_seconds_bucket{le="0.1"} 7
spanpull_resolver_read_duration_seconds_bucket{le="+Inf"} 7
spanpull_resolver_read_duration_seconds_sum 0.5
spanpull_resolver_read_duration_seconds_count 7
go_goroutines 12
`), "spanpull_")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		`spanpull_resolver_fetched_bytes_total{kind="span"}`: 1234500,
		`spanpull_resolver_fetched_bytes_total{kind="ztoc"}`: 4096,
		`spanpull_layers_mounted{b="x",mode="lazy"}`:         2,
		"spanpull_resolver_spans_fetched_total":              3,
	}
	if len(m) != len(want) {
		t.Errorf("got %v, want %v", m, want)
	}
	for k, v := range want {
		if got, ok := m[k]; !ok || got != v {
			t.Errorf("%s = %v (%v), want %v", k, got, ok, v)
		}
	}
	if _, err := ParseMetrics(strings.NewReader("spanpull_x{ 1\n"), ""); err == nil {
		t.Error("ParseMetrics accepted broken text")
	}
}
