//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
)

// delayProxy is a TCP proxy that adds a fixed one-way delay to each
// direction without limiting throughput, and counts the bytes it carries.
// The kernel here has no netem, so round-trip time on the shaped link comes
// from this proxy: every chunk read from one side is written to the other
// at its arrival time plus the delay. Counting in the proxy measures lazy
// and full pulls the same way (all their registry traffic passes through it).
type delayProxy struct {
	upstream string
	delay    atomic.Int64 // one-way delay, nanoseconds
	up       atomic.Int64 // bytes client -> upstream
	down     atomic.Int64 // bytes upstream -> client
	conns    atomic.Int64 // accepted connections
	requests atomic.Int64 // HTTP requests clients sent
	ranged   atomic.Int64 // of which GETs with a Range header

	mu   sync.Mutex
	live map[net.Conn]struct{}
}

// proxyStats is what the control endpoint reports.
type proxyStats struct {
	// Up counts bytes sent to the registry (requests), Down bytes received
	// from it (responses, headers included).
	Up, Down int64
	// Conns counts accepted client connections.
	Conns int64
	// Requests counts the HTTP requests clients sent, RangeGets the GETs
	// among them that asked for a byte range (span, window and chunk
	// fetches; a full pull asks for none).
	Requests, RangeGets int64
	// DelayMS is the current one-way delay.
	DelayMS float64
}

func newDelayProxy(upstream string, oneWay time.Duration) *delayProxy {
	p := &delayProxy{upstream: upstream, live: map[net.Conn]struct{}{}}
	p.delay.Store(int64(oneWay))
	return p
}

func (p *delayProxy) stats() proxyStats {
	return proxyStats{
		Up: p.up.Load(), Down: p.down.Load(), Conns: p.conns.Load(),
		Requests: p.requests.Load(), RangeGets: p.ranged.Load(),
		DelayMS: float64(p.delay.Load()) / 1e6,
	}
}

// reset zeroes the counters and closes the connections still open, so that
// the next run starts cold (no keep-alive connection carried over).
func (p *delayProxy) reset() {
	p.mu.Lock()
	for c := range p.live {
		c.Close()
	}
	p.mu.Unlock()
	p.up.Store(0)
	p.down.Store(0)
	p.conns.Store(0)
	p.requests.Store(0)
	p.ranged.Store(0)
}

func (p *delayProxy) track(c net.Conn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.live[c] = struct{}{}
	} else {
		delete(p.live, c)
	}
}

// serve accepts connections on l until it is closed.
func (p *delayProxy) serve(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		p.conns.Add(1)
		go p.handle(c)
	}
}

func (p *delayProxy) handle(client net.Conn) {
	up, err := net.DialTimeout("tcp", p.upstream, 10*time.Second)
	if err != nil {
		client.Close()
		return
	}
	p.track(client, true)
	p.track(up, true)
	reqs := p.parseRequests()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(up, client, &p.up, reqs) }()
	go func() { defer wg.Done(); p.pipe(client, up, &p.down, nil) }()
	wg.Wait()
	p.track(client, false)
	p.track(up, false)
	client.Close()
	up.Close()
}

// chunk is data read from one side, due on the other at due; a nil data
// with eof set forwards the end of the stream.
type chunk struct {
	data []byte
	due  time.Time
	eof  bool
}

// pipe copies src to dst, each chunk delayed by the proxy's delay after it
// was read. A reader goroutine timestamps chunks into a queue; this
// goroutine writes each when it is due, so reads go on while earlier data
// waits: the delay adds latency, not a throughput limit (up to the queue's
// budget in flight). The count is taken when a chunk is written. A non-nil
// observe sees every chunk as it is read and is closed at the end of src.
func (p *delayProxy) pipe(dst, src net.Conn, count *atomic.Int64, observe io.WriteCloser) {
	q := make(chan chunk, 4096)
	// At most inFlight bytes wait in the queue: enough for 10 Gbit/s at a
	// 10 ms one-way delay, while a slow (shaped) receiver still pushes
	// back on the sender instead of the proxy buffering a whole image.
	const inFlight = 16 << 20
	budget := semaphore.NewWeighted(inFlight)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 && observe != nil {
				_, _ = observe.Write(buf[:n])
			}
			if n > 0 {
				_ = budget.Acquire(context.Background(), int64(n))
				q <- chunk{data: buf[:n], due: time.Now().Add(time.Duration(p.delay.Load()))}
			}
			if err != nil {
				if observe != nil {
					_ = observe.Close()
				}
				q <- chunk{eof: true, due: time.Now().Add(time.Duration(p.delay.Load()))}
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if failed {
			budget.Release(int64(len(c.data)))
			continue // drain so the reader never blocks forever
		}
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		if c.eof {
			if tc, ok := dst.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			} else {
				dst.Close()
			}
			continue
		}
		n, err := dst.Write(c.data)
		budget.Release(int64(len(c.data)))
		count.Add(int64(n))
		if err != nil {
			failed = true
			src.Close() // unblock the reader
			dst.Close()
		}
	}
}

// requestParser counts the HTTP/1.1 requests in the bytes a client sends
// (registries are reached over plain HTTP here): its goroutine parses what
// Write is given and ends when Close is called, which waits for it.
type requestParser struct {
	pw   *io.PipeWriter
	done chan struct{}
}

// parseRequests starts a parser that counts into p's request counters.
// A stream it cannot parse is drained, never blocking the proxy.
func (p *delayProxy) parseRequests() *requestParser {
	pr, pw := io.Pipe()
	rp := &requestParser{pw: pw, done: make(chan struct{})}
	go func() {
		defer close(rp.done)
		br := bufio.NewReader(pr)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				break
			}
			p.requests.Add(1)
			if req.Method == http.MethodGet && req.Header.Get("Range") != "" {
				p.ranged.Add(1)
			}
			_, err = io.Copy(io.Discard, req.Body)
			req.Body.Close()
			if err != nil {
				break
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	return rp
}

// Write hands the parser bytes the client sent.
func (rp *requestParser) Write(b []byte) (int, error) { return rp.pw.Write(b) }

// Close ends the stream and waits for the parser to finish.
func (rp *requestParser) Close() error {
	err := rp.pw.Close()
	<-rp.done
	return err
}

// controlHandler serves the proxy's control API: GET /stats, POST /reset,
// POST /delay?oneway=DURATION.
func (p *delayProxy) controlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(p.stats())
	})
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, _ *http.Request) {
		p.reset()
		_ = json.NewEncoder(w).Encode(p.stats())
	})
	mux.HandleFunc("POST /delay", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("oneway"))
		if err != nil || d < 0 {
			http.Error(w, fmt.Sprintf("bad oneway delay %q", r.URL.Query().Get("oneway")), http.StatusBadRequest)
			return
		}
		p.delay.Store(int64(d))
		_ = json.NewEncoder(w).Encode(p.stats())
	})
	return mux
}

// proxyMain is the "proxy" subcommand: the harness runs itself with it
// under "ip netns exec", so the proxy listens and dials inside the
// registry's network namespace. Its control API is on a unix socket (a
// path, reachable from every network namespace).
func proxyMain(args []string) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	listen := fs.String("listen", "", "host:port to accept clients on")
	upstream := fs.String("upstream", "", "host:port to forward to")
	control := fs.String("control", "", "unix socket for the control API")
	oneWay := fs.Duration("oneway", 0, "initial one-way delay (RTT/2)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *listen == "" || *upstream == "" || *control == "" {
		return errors.New("proxy: -listen, -upstream and -control are required")
	}
	p := newDelayProxy(*upstream, *oneWay)
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	_ = os.Remove(*control)
	cl, err := net.Listen("unix", *control)
	if err != nil {
		return fmt.Errorf("proxy control: %w", err)
	}
	srv := &http.Server{Handler: p.controlHandler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(cl) }()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	err = p.serve(l)
	_ = srv.Close()
	p.reset()
	return err
}

// proxyClient talks to a proxy's control API.
type proxyClient struct {
	hc *http.Client
}

func newProxyClient(sock string) *proxyClient {
	return &proxyClient{hc: &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}}
}

func (c *proxyClient) call(ctx context.Context, method, path string) (proxyStats, error) {
	var s proxyStats
	req, err := http.NewRequestWithContext(ctx, method, "http://proxy"+path, nil)
	if err != nil {
		return s, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return s, fmt.Errorf("proxy control %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return s, fmt.Errorf("proxy control %s %s: %s: %s", method, path, resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return s, fmt.Errorf("proxy control %s %s: %w", method, path, err)
	}
	return s, nil
}

func (c *proxyClient) Stats(ctx context.Context) (proxyStats, error) {
	return c.call(ctx, http.MethodGet, "/stats")
}

func (c *proxyClient) Reset(ctx context.Context) error {
	_, err := c.call(ctx, http.MethodPost, "/reset")
	return err
}

func (c *proxyClient) SetDelay(ctx context.Context, oneWay time.Duration) error {
	_, err := c.call(ctx, http.MethodPost, "/delay?oneway="+oneWay.String())
	return err
}

// serveHTTP serves h on l until l is closed.
func serveHTTP(l net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.Serve(l); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
