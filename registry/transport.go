package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Defaults of RetryPolicy and Options.StallTimeout.
const (
	DefaultMaxRetries   = 5
	DefaultMinBackoff   = 200 * time.Millisecond
	DefaultMaxBackoff   = 5 * time.Second
	DefaultStallTimeout = 30 * time.Second
)

// RetryPolicy bounds how often a request is retried after a transient
// failure: HTTP 408, 429 and 5xx, connection errors (reset, refused, EOF)
// before or during the response body, and stalls longer than the stall
// timeout (Options.StallTimeout).
// The wait doubles after each retry (with ±10% jitter), from MinBackoff up
// to MaxBackoff; a 429/503 Retry-After is honored up to MaxBackoff.
type RetryPolicy struct {
	// MaxRetries is the number of retries after the first attempt, shared
	// by all the failures of one request (including body resumptions).
	// Zero means DefaultMaxRetries; negative disables retries.
	MaxRetries int
	// MinBackoff is the wait before the first retry (default 200ms).
	MinBackoff time.Duration
	// MaxBackoff caps the wait between retries (default 5s).
	MaxBackoff time.Duration
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxRetries == 0 {
		p.MaxRetries = DefaultMaxRetries
	} else if p.MaxRetries < 0 {
		p.MaxRetries = 0
	}
	if p.MinBackoff <= 0 {
		p.MinBackoff = DefaultMinBackoff
	}
	if p.MaxBackoff <= 0 {
		p.MaxBackoff = DefaultMaxBackoff
	}
	if p.MaxBackoff < p.MinBackoff {
		p.MaxBackoff = p.MinBackoff
	}
	return p
}

// backoff returns the wait before retry number n (0-based).
func (p RetryPolicy) backoff(n int, resp *http.Response) time.Duration {
	if resp != nil && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable) {
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			return min(time.Duration(s)*time.Second, p.MaxBackoff)
		}
	}
	d := p.MinBackoff
	for i := 0; i < n && d < p.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, p.MaxBackoff)
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}

// ErrStalled is wrapped by errors of requests that made no progress (no
// response headers or body bytes) for longer than Options.StallTimeout.
var ErrStalled = errors.New("registry connection stalled")

// transport makes requests robust against transient failures. It retries
// whole requests on retryable statuses and connection errors, and resumes
// GET response bodies that break mid-way with a Range request for the
// missing bytes, so callers see one uninterrupted body (content digests are
// verified above it). A stall timer cancels attempts that make no progress.
type transport struct {
	base   http.RoundTripper
	policy RetryPolicy
	stall  time.Duration
}

// budget counts the retries left for one logical request.
type budget struct {
	mu   sync.Mutex
	used int
	max  int
}

func (b *budget) take() (int, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used >= b.max {
		return b.used, false
	}
	b.used++
	return b.used - 1, true
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	b := &budget{max: t.policy.MaxRetries}
	resp, err := t.do(req, b)
	if err != nil {
		return nil, err
	}
	if req.Method == http.MethodGet && (resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent) {
		if rb, ok := newResumingBody(t, req, resp, b); ok {
			resp.Body = rb
		}
	}
	return resp, nil
}

// do sends req until it gets a non-retryable answer or the budget runs out.
func (t *transport) do(req *http.Request, b *budget) (*http.Response, error) {
	ctx := req.Context()
	first := true
	for {
		areq := req
		if !first && req.Body != nil && req.Body != http.NoBody {
			body, err := req.GetBody()
			if err != nil {
				return nil, fmt.Errorf("rewind request body: %w", err)
			}
			areq = req.Clone(ctx)
			areq.Body = body
		}
		first = false
		resp, err := t.attempt(areq)
		if ctx.Err() != nil {
			if err == nil {
				resp.Body.Close()
			}
			return nil, ctx.Err()
		}
		retry := (err != nil && !isPermanent(err)) || (err == nil && retryableStatus(resp.StatusCode))
		rewindable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
		if !retry || !rewindable {
			return resp, err
		}
		n, ok := b.take()
		if !ok {
			if err != nil {
				return nil, fmt.Errorf("%w (gave up after %d retries)", err, b.max)
			}
			return resp, nil
		}
		wait := t.policy.backoff(n, resp)
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		if err := sleep(ctx, wait); err != nil {
			return nil, err
		}
	}
}

func retryableStatus(code int) bool {
	return code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500
}

func sleep(ctx context.Context, d time.Duration) error {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tm.C:
		return nil
	}
}

// attempt sends one request under a stall timer: it runs while the request
// is sent (restarted by upload progress) and until response headers arrive,
// then only during body reads; Close releases it.
func (t *transport) attempt(req *http.Request) (*http.Response, error) {
	if t.stall <= 0 {
		return t.base.RoundTrip(req)
	}
	ctx, cancel := context.WithCancel(req.Context())
	st := &stallTimer{cancel: cancel}
	st.timer = time.AfterFunc(t.stall, st.fire)
	areq := req.WithContext(ctx)
	if req.Body != nil && req.Body != http.NoBody {
		// Uploading counts as progress.
		areq.Body = &progressBody{rc: req.Body, st: st, d: t.stall}
	}
	resp, err := t.base.RoundTrip(areq)
	if err != nil {
		st.stop()
		if st.fired() {
			return nil, fmt.Errorf("%s %s: no response within %s: %w", req.Method, req.URL.Redacted(), t.stall, ErrStalled)
		}
		return nil, err
	}
	// Between body reads the caller may take its time; the timer runs
	// only while a read is waiting for the network.
	st.mu.Lock()
	st.answered = true
	st.mu.Unlock()
	st.timer.Stop()
	resp.Body = &stallBody{rc: resp.Body, st: st, d: t.stall, what: req.Method + " " + req.URL.Redacted()}
	return resp, nil
}

type stallTimer struct {
	timer    *time.Timer
	cancel   context.CancelFunc
	mu       sync.Mutex
	hit      bool
	answered bool // response headers arrived: uploads no longer restart the timer
}

func (s *stallTimer) fire() {
	s.mu.Lock()
	s.hit = true
	s.mu.Unlock()
	s.cancel()
}

func (s *stallTimer) fired() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hit
}

func (s *stallTimer) stop() {
	s.timer.Stop()
	s.cancel()
}

type stallBody struct {
	rc   io.ReadCloser
	st   *stallTimer
	d    time.Duration
	what string
}

func (b *stallBody) Read(p []byte) (int, error) {
	b.st.timer.Reset(b.d)
	n, err := b.rc.Read(p)
	b.st.timer.Stop()
	if err != nil && err != io.EOF && b.st.fired() {
		err = fmt.Errorf("%s: no data for %s: %w", b.what, b.d, ErrStalled)
	}
	return n, err
}

// progressBody resets the stall timer as a request body is sent.
type progressBody struct {
	rc io.ReadCloser
	st *stallTimer
	d  time.Duration
}

func (b *progressBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.st.mu.Lock()
		if !b.st.answered {
			b.st.timer.Reset(b.d)
		}
		b.st.mu.Unlock()
	}
	return n, err
}

func (b *progressBody) Close() error { return b.rc.Close() }

func (b *stallBody) Close() error {
	b.st.stop()
	return b.rc.Close()
}

// resumingBody continues a GET response body after a mid-body failure by
// requesting the remaining bytes with a Range header.
type resumingBody struct {
	t     *transport
	req   *http.Request
	b     *budget
	cur   io.ReadCloser
	start int64 // absolute offset of the first byte of the original body
	total int64 // expected length of the original body
	read  int64 // bytes delivered so far
	plain bool  // original answer was 200 (whole blob), not 206
}

// newResumingBody wraps resp.Body if its length is known, so a break can be
// detected and resumed; otherwise the body is left as it is.
func newResumingBody(t *transport, req *http.Request, resp *http.Response, b *budget) (*resumingBody, bool) {
	if resp.ContentLength <= 0 {
		return nil, false
	}
	rb := &resumingBody{t: t, req: req, b: b, cur: resp.Body, total: resp.ContentLength, plain: resp.StatusCode == http.StatusOK}
	if !rb.plain {
		start, _, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok {
			return nil, false
		}
		rb.start = start
	}
	return rb, true
}

func (r *resumingBody) Read(p []byte) (int, error) {
	for {
		if r.read >= r.total {
			return 0, io.EOF
		}
		if int64(len(p)) > r.total-r.read {
			p = p[:r.total-r.read]
		}
		n, err := r.cur.Read(p)
		r.read += int64(n)
		if err == nil || (err == io.EOF && r.read >= r.total) {
			if err == io.EOF && n > 0 {
				err = nil
			}
			return n, err
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if ctxErr := r.req.Context().Err(); ctxErr != nil {
			return n, err
		}
		if rerr := r.resume(err); rerr != nil {
			return n, rerr
		}
		if n > 0 {
			return n, nil
		}
	}
}

// resume replaces the broken body with the rest of the content.
func (r *resumingBody) resume(cause error) error {
	r.cur.Close()
	r.cur = io.NopCloser(strings.NewReader(""))
	retry, ok := r.b.take()
	if !ok {
		return fmt.Errorf("%s %s: body broken after %d of %d bytes (gave up after %d retries): %w",
			r.req.Method, r.req.URL.Redacted(), r.read, r.total, r.b.max, cause)
	}
	if err := sleep(r.req.Context(), r.t.policy.backoff(retry, nil)); err != nil {
		return err
	}
	from, to := r.start+r.read, r.start+r.total-1
	req := r.req.Clone(r.req.Context())
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", from, to))
	resp, err := r.t.do(req, r.b)
	if err != nil {
		return fmt.Errorf("resume %s %s at byte %d: %w (after: %v)", r.req.Method, r.req.URL.Redacted(), from, err, cause)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		s, e, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || s != from || e != to {
			resp.Body.Close()
			return fmt.Errorf("resume %s: asked bytes %d-%d, got Content-Range %q", r.req.URL.Redacted(), from, to, resp.Header.Get("Content-Range"))
		}
	case http.StatusOK:
		if !r.plain || resp.ContentLength != r.total {
			resp.Body.Close()
			return fmt.Errorf("resume %s: server ignored Range bytes=%d-%d", r.req.URL.Redacted(), from, to)
		}
		// Same whole content again: skip what was already delivered.
		if _, err := io.CopyN(io.Discard, resp.Body, r.read); err != nil {
			resp.Body.Close()
			return fmt.Errorf("resume %s: skip %d bytes: %w", r.req.URL.Redacted(), r.read, err)
		}
	default:
		resp.Body.Close()
		return fmt.Errorf("resume %s at byte %d: status %s", r.req.URL.Redacted(), from, resp.Status)
	}
	r.cur = resp.Body
	return nil
}

func (r *resumingBody) Close() error { return r.cur.Close() }

// parseContentRange parses "bytes <start>-<end>/<size|*>".
func parseContentRange(s string) (start, end int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, _, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, false
	}
	return start, end, true
}
