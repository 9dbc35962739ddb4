package registrytest

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// FaultProxy is a reverse proxy in front of a real registry that injects
// faults on demand: error statuses, connections reset in the middle of a
// response body, latency, and a basic-auth challenge. It exists because a
// real registry cannot be made to fail transiently at a chosen moment, and
// the retry, resume, timeout and auth paths of the client must be exercised
// against real registry responses otherwise.
type FaultProxy struct {
	// Addr is the proxy's "127.0.0.1:port"; use it as the registry host.
	Addr string

	upstream string
	rt       http.RoundTripper

	mu       sync.Mutex
	faults   Faults
	statusN  int
	resetN   int
	dropN    int
	requests []string
	log      []Request
}

// Request is one request a FaultProxy handled, for tests that look at
// who asked for what (RequestLog).
type Request struct {
	Method, Path, Query string
	// Range is the Range header ("" for whole-content requests).
	Range     string
	UserAgent string
	// Outcome is what the proxy did: the upstream status or the fault.
	Outcome string
}

// Faults configures a FaultProxy. The zero value forwards everything.
type Faults struct {
	// Match selects the requests faults apply to (nil: all requests).
	// Basic auth, when set, applies to all requests regardless.
	Match func(*http.Request) bool
	// Status, if non-zero, is answered (with a registry-style JSON error)
	// instead of forwarding, to the next StatusCount matching requests
	// (negative: all of them).
	Status      int
	StatusCount int
	// ResetAfter is the number of response body bytes forwarded before the
	// connection is reset (TCP RST) for the next ResetCount matching
	// requests whose body is longer (negative count: all of them). Zero
	// disables resets.
	ResetAfter int64
	ResetCount int
	// StallReset makes the resets above hang first: after ResetAfter bytes
	// the proxy sends nothing more until the client gives up (or a minute
	// passes), like a registry that stops answering mid-transfer.
	StallReset bool
	// DropCount matching requests (negative: all) get their connection
	// reset before any response is sent.
	DropCount int
	// Latency delays every matching request before it is handled.
	Latency time.Duration
	// StripRange removes the Range header from matching requests, like a
	// server or proxy without range support.
	StripRange bool
	// Corrupt flips the first body byte of matching responses (the
	// registry's headers, including Docker-Content-Digest, stay intact).
	Corrupt bool
	// User and Password, if User is set, are required as HTTP basic auth
	// on every request; others get 401 with a Basic challenge.
	User, Password string
	// Token switches the auth above to distribution token auth: requests
	// need "Bearer <token>", the challenge names the realm
	// http://<proxy>/token, which hands out the token for basic auth with
	// User and Password.
	Token bool
}

// tokenFor is the bearer token the proxy issues and accepts.
func tokenFor(user string) string { return "registrytest-token-" + user }

// StartFaultProxy starts a FaultProxy forwarding to the registry at
// upstream ("host:port", plain HTTP), stopped in Cleanup.
func StartFaultProxy(t testing.TB, upstream string) *FaultProxy {
	t.Helper()
	p := &FaultProxy{upstream: upstream, rt: &http.Transport{Proxy: nil, DisableCompression: true}}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	p.Addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// Set replaces the fault configuration and resets its counters.
func (p *FaultProxy) Set(f Faults) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults = f
	p.statusN = f.StatusCount
	p.resetN = f.ResetCount
	p.dropN = f.DropCount
}

// Requests returns "METHOD path[?query] [range] -> outcome" for every
// request seen so far.
func (p *FaultProxy) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.requests...)
}

// CountRequests counts the requests seen so far whose log line contains s.
func (p *FaultProxy) CountRequests(s string) int {
	n := 0
	for _, r := range p.Requests() {
		if strings.Contains(r, s) {
			n++
		}
	}
	return n
}

func (p *FaultProxy) note(r *http.Request, outcome string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	line := r.Method + " " + r.URL.Path
	if r.URL.RawQuery != "" {
		line += "?" + r.URL.RawQuery
	}
	if rg := r.Header.Get("Range"); rg != "" {
		line += " [" + rg + "]"
	}
	p.requests = append(p.requests, line+" -> "+outcome)
	p.log = append(p.log, Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery,
		Range: r.Header.Get("Range"), UserAgent: r.UserAgent(), Outcome: outcome})
}

// RequestLog returns every request seen so far, in order.
func (p *FaultProxy) RequestLog() []Request {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Request(nil), p.log...)
}

// decide takes the fault decisions for one request under the lock.
func (p *FaultProxy) decide(r *http.Request) (f Faults, match, drop, status, reset bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f = p.faults
	match = f.Match == nil || f.Match(r)
	if !match {
		return f, false, false, false, false
	}
	if p.dropN != 0 {
		if p.dropN > 0 {
			p.dropN--
		}
		return f, true, true, false, false
	}
	if f.Status != 0 && p.statusN != 0 {
		status = true
		if p.statusN > 0 {
			p.statusN--
		}
	}
	if !status && f.ResetAfter > 0 && p.resetN != 0 {
		reset = true
	}
	return f, match, false, status, reset
}

func (p *FaultProxy) consumeReset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.resetN > 0 {
		p.resetN--
	}
}

// ServeHTTP applies the fault rule that matches r (authentication,
// latency, a dropped connection, an injected status) and forwards the
// rest to the upstream registry, corrupting or cutting its answer when the
// rule says so.
func (p *FaultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f, match, drop, status, reset := p.decide(r)
	if f.User != "" && !p.authorize(w, r, f) {
		return
	}
	if match && f.Latency > 0 {
		select {
		case <-time.After(f.Latency):
		case <-r.Context().Done():
			p.note(r, "client gone during latency")
			return
		}
	}
	if drop {
		p.note(r, "dropped (injected)")
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				if tc, ok := conn.(*net.TCPConn); ok {
					tc.SetLinger(0)
				}
				conn.Close()
			}
		}
		return
	}
	if status {
		p.note(r, fmt.Sprintf("%d (injected)", f.Status))
		writeError(w, f.Status, "UNAVAILABLE", "injected fault")
		return
	}

	out, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+p.upstream+r.URL.RequestURI(), r.Body)
	if err != nil {
		p.note(r, "bad request: "+err.Error())
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	out.Header = r.Header.Clone()
	out.Header.Del("Authorization")
	if match && f.StripRange {
		out.Header.Del("Range")
	}
	out.Host = r.Host // upstream builds Location URLs for this host
	out.ContentLength = r.ContentLength
	if r.ContentLength == 0 {
		out.Body = nil
	}
	resp, err := p.rt.RoundTrip(out)
	if err != nil {
		p.note(r, "upstream error: "+err.Error())
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()

	if reset && r.Method == http.MethodGet && resp.ContentLength > f.ResetAfter {
		p.consumeReset()
		p.note(r, fmt.Sprintf("%d reset after %d bytes", resp.StatusCode, f.ResetAfter))
		p.resetMidBody(w, resp, f.ResetAfter, f.StallReset)
		return
	}
	p.note(r, strconv.Itoa(resp.StatusCode))
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	w.WriteHeader(resp.StatusCode)
	var body io.Reader = resp.Body
	if match && f.Corrupt {
		body = &flipFirst{r: resp.Body}
	}
	io.Copy(w, body)
}

// authorize plays the registry's authentication for rule f (basic, or a
// bearer token from /token): it answers the token requests and the
// unauthenticated ones itself and reports whether r may go on.
func (p *FaultProxy) authorize(w http.ResponseWriter, r *http.Request, f Faults) bool {
	u, pw, basicOK := r.BasicAuth()
	basicOK = basicOK && u == f.User && pw == f.Password
	if f.Token && r.URL.Path == "/token" {
		if !basicOK {
			p.note(r, "401 (token)")
			writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "bad credentials for token")
			return false
		}
		p.note(r, "200 (token)")
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"token":%q,"expires_in":300}`, tokenFor(f.User))
		return false
	}
	ok := basicOK
	challenge := `Basic realm="registrytest"`
	if f.Token {
		ok = r.Header.Get("Authorization") == "Bearer "+tokenFor(f.User)
		challenge = fmt.Sprintf(`Bearer realm="http://%s/token",service="registrytest"`, r.Host)
	}
	if !ok {
		p.note(r, "401 (auth)")
		w.Header().Set("WWW-Authenticate", challenge)
		writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
	}
	return ok
}

// flipFirst inverts the first byte read through it.
type flipFirst struct {
	r    io.Reader
	done bool
}

func (f *flipFirst) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if n > 0 && !f.done {
		p[0] ^= 0xff
		f.done = true
	}
	return n, err
}

// resetMidBody writes the response head and the first n body bytes on the
// raw connection, then closes it with SO_LINGER 0 so the client sees a
// TCP reset, as with a crashing registry or a flaky load balancer.
func (p *FaultProxy) resetMidBody(w http.ResponseWriter, resp *http.Response, n int64, stall bool) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "cannot hijack", http.StatusInternalServerError)
		return
	}
	conn, buf, err := hj.Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	h := resp.Header.Clone()
	h.Del("Transfer-Encoding")
	h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	fmt.Fprintf(buf, "HTTP/1.1 %s\r\n", resp.Status)
	h.Write(buf)
	buf.WriteString("\r\n")
	io.CopyN(buf, resp.Body, n)
	buf.Flush()
	if stall {
		// The client closes its end when it gives up: wait for that.
		conn.SetReadDeadline(time.Now().Add(time.Minute))
		io.Copy(io.Discard, conn)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`, code, msg)
}

// MatchBlobGET matches GET requests for blobs (not manifests), the
// requests lazy reads and layer downloads make.
func MatchBlobGET(r *http.Request) bool {
	return r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
}
