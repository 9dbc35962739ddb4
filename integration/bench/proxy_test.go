//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startUpstream serves blob to every connection after reading one byte
// (a request), then closes the connection.
func startUpstream(t *testing.T, blob []byte) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil {
					return
				}
				_, _ = c.Write(blob)
			}()
		}
	}()
	return l.Addr().String()
}

func startProxy(t *testing.T, upstream string, oneWay time.Duration) (*delayProxy, string) {
	t.Helper()
	p := newDelayProxy(upstream, oneWay)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.serve(l) }()
	t.Cleanup(func() {
		l.Close()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		p.reset()
	})
	return p, l.Addr().String()
}

// fetch sends one byte and reads the whole answer, timing the first byte.
func fetch(t *testing.T, addr string) (data []byte, ttfb, total time.Duration) {
	t.Helper()
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte{'x'}); err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 1)
	if _, err := io.ReadFull(c, first); err != nil {
		t.Fatal(err)
	}
	ttfb = time.Since(start)
	rest, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return append(first, rest...), ttfb, time.Since(start)
}

// TestDelayProxy checks the proxy delays each direction by the one-way
// delay (a request-response takes one RTT more), does not cap throughput
// at one chunk per delay, forwards the bytes unchanged and counts them.
func TestDelayProxy(t *testing.T) {
	blob := make([]byte, 32<<20)
	if _, err := rand.Read(blob); err != nil {
		t.Fatal(err)
	}
	up := startUpstream(t, blob)
	const oneWay = 40 * time.Millisecond
	p, addr := startProxy(t, up, oneWay)

	got, ttfb, total := fetch(t, addr)
	if !bytes.Equal(got, blob) {
		t.Fatalf("proxy changed the bytes: got %d bytes, want %d", len(got), len(blob))
	}
	if ttfb < 2*oneWay {
		t.Errorf("first byte after %v, want at least one RTT (%v)", ttfb, 2*oneWay)
	}
	// 32 MiB arrives in 64 KiB chunks or fewer: were every chunk to wait
	// out the delay after the previous one, this would take 20 s or more.
	if total > 2*oneWay+3*time.Second {
		t.Errorf("32 MiB took %v through a %v one-way delay: the delay limits throughput", total, oneWay)
	}
	s := p.stats()
	if s.Down != int64(len(blob)) || s.Up != 1 || s.Conns != 1 {
		t.Errorf("stats %+v, want down %d, up 1, 1 connection", s, len(blob))
	}

	// No delay: the first byte comes right away.
	p.delay.Store(0)
	p.reset()
	if _, ttfb, _ := fetch(t, addr); ttfb > oneWay {
		t.Errorf("first byte after %v with no delay", ttfb)
	}
	if s := p.stats(); s.Down != int64(len(blob)) || s.Conns != 1 {
		t.Errorf("stats after reset %+v, want the one new fetch only", s)
	}
}

// TestProxyControl drives the control API over its unix socket, as the
// harness does with the proxy in the registry's network namespace.
func TestProxyControl(t *testing.T) {
	up := startUpstream(t, []byte("hello"))
	p, addr := startProxy(t, up, 0)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srvDone := make(chan struct{})
	go func() {
		defer close(srvDone)
		_ = serveHTTP(l, p.controlHandler())
	}()
	t.Cleanup(func() { l.Close(); <-srvDone })
	c := newProxyClient(sock)
	ctx := context.Background()
	if err := c.SetDelay(ctx, 15*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if got := time.Duration(p.delay.Load()); got != 15*time.Millisecond {
		t.Errorf("delay %v after SetDelay(15ms)", got)
	}
	if _, err := c.call(ctx, "POST", "/delay?oneway=-1s"); err == nil {
		t.Error("a negative delay was accepted")
	}
	fetch(t, addr)
	s, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Down != 5 || s.Up != 1 || s.DelayMS != 15 {
		t.Errorf("stats %+v, want down 5, up 1, 15 ms", s)
	}
	if err := c.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if s, _ := c.Stats(ctx); s.Down != 0 || s.Conns != 0 {
		t.Errorf("stats after reset %+v", s)
	}
}

// TestParseFlags checks the smoke configuration and bad flags.
func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{"-smoke"})
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Workloads) != 1 || o.Workloads[0] != "python" || len(o.Links) != 1 || o.Links[0] != "unshaped" || o.Runs != 1 {
		t.Errorf("smoke options %+v", o)
	}
	if len(o.Modes) != len(allModes) || len(o.Bench) != 2 || o.Settle || !o.ReadFastFill || o.ReadRuns != 1 {
		t.Errorf("smoke options %+v: want every mode, both benchmarks, no settling, one fast-filled read pass", o)
	}
	o, err = parseFlags([]string{"-runs", "3", "-slow-runs", "1"})
	if err != nil {
		t.Fatal(err)
	}
	if o.runsFor("large", "20mbit") != 1 || o.runsFor("large", "100mbit") != 3 || o.runsFor("python", "20mbit") != 3 {
		t.Errorf("runsFor with -slow-runs 1: %d %d %d", o.runsFor("large", "20mbit"), o.runsFor("large", "100mbit"), o.runsFor("python", "20mbit"))
	}
	o, err = parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.runsFor("large", "20mbit") != 0 || !o.Settle || len(o.Links) != 3 || len(o.Workloads) != 2 || !o.has(benchRead) {
		t.Errorf("defaults %+v: want the large image skipped at 20mbit, settling, both images, three links, the read benchmark", o)
	}
	o, err = parseFlags([]string{"-modes", "lazy+prefetch", "-mode", "pull"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(o.Modes, ",") != "full,lazy+prefetch" || o.has(benchRead) {
		t.Errorf("-modes lazy+prefetch -mode pull: %v %v", o.Modes, o.Bench)
	}
	for _, bad := range [][]string{{"-links", "fast"}, {"-workloads", "nope"}, {"-runs", "0"}, {"extra"},
		{"-modes", "lazy,eager"}, {"-mode", "write"}, {"-random-reads", "0"}, {"-settle-timeout", "0s"}} {
		if _, err := parseFlags(bad); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
}

// TestProxyCountsRequests sends plain and ranged requests through the
// proxy on one keep-alive connection, as the daemon does, and checks the
// counts.
func TestProxyCountsRequests(t *testing.T) {
	blob := bytes.Repeat([]byte("0123456789"), 1000)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "blob", time.Time{}, bytes.NewReader(blob))
	}))
	t.Cleanup(srv.Close)
	p, addr := startProxy(t, srv.Listener.Addr().String(), 0)
	hc := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
	t.Cleanup(hc.CloseIdleConnections)
	get := func(method, rng string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+addr+"/v2/blob", nil)
		if err != nil {
			t.Fatal(err)
		}
		if rng != "" {
			req.Header.Set("Range", rng)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get(http.MethodHead, "")
	get(http.MethodGet, "")
	for i := range 3 {
		get(http.MethodGet, fmt.Sprintf("bytes=%d-%d", 100*i, 100*i+99))
	}
	hc.CloseIdleConnections()
	// The counts are taken as the requests pass; wait for the last one.
	deadline := time.Now().Add(5 * time.Second)
	for p.stats().Requests < 5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s := p.stats(); s.Requests != 5 || s.RangeGets != 3 || s.Conns != 1 {
		t.Errorf("stats %+v, want 5 requests, 3 range GETs, 1 connection", s)
	}
	p.reset()
	if s := p.stats(); s.Requests != 0 || s.RangeGets != 0 {
		t.Errorf("stats after reset %+v", s)
	}
}
