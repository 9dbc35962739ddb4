package socitest

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
)

// Proxy is a reverse proxy in front of a registry that records every
// request ("METHOD requestURI -> status"), to count blob uploads.
type Proxy struct {
	Addr string
	mu   sync.Mutex
	reqs []string
	// corrupt maps a blob digest to the offset (in the blob) of the byte
	// flipped in the bodies of GETs of that blob.
	corrupt map[digest.Digest]int64
}

// Corrupt makes the proxy flip the byte at offset off of blob d in every
// GET of d that returns it, whole or in a range (headers, including
// Docker-Content-Digest, stay intact).
func (p *Proxy) Corrupt(d digest.Digest, off int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.corrupt[d] = off
}

// flipAt flips the byte at offset at of the stream.
type flipAt struct {
	io.ReadCloser
	pos, at int64
}

func (f *flipAt) Read(b []byte) (int, error) {
	n, err := f.ReadCloser.Read(b)
	if f.at >= f.pos && f.at < f.pos+int64(n) {
		b[f.at-f.pos] ^= 0xff
	}
	f.pos += int64(n)
	return n, err
}

func StartProxy(t testing.TB, upstream string) *Proxy {
	t.Helper()
	p := &Proxy{corrupt: map[digest.Digest]int64{}}
	target, err := url.Parse("http://" + upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target) // keeps the Host header: Location URLs name the proxy
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		var start int64
		switch {
		case r.Method != http.MethodGet:
			return nil
		case resp.StatusCode == http.StatusOK && r.Header.Get("Range") == "":
		case resp.StatusCode == http.StatusPartialContent:
			if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-", &start); err != nil {
				return nil
			}
		default:
			return nil
		}
		_, d, ok := strings.Cut(r.URL.Path, "/blobs/")
		if !ok {
			return nil
		}
		p.mu.Lock()
		off, ok := p.corrupt[digest.Digest(d)]
		p.mu.Unlock()
		if ok {
			resp.Body = &flipAt{ReadCloser: resp.Body, pos: start, at: off}
		}
		return nil
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		rp.ServeHTTP(rec, r)
		p.mu.Lock()
		p.reqs = append(p.reqs, fmt.Sprintf("%s %s -> %d", r.Method, r.URL.RequestURI(), rec.status))
		p.mu.Unlock()
	})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	p.Addr = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// Requests returns the recorded requests.
func (p *Proxy) Requests() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.reqs...)
}

// Uploads returns the digests of blobs whose bytes were uploaded through
// the proxy to repo (the digest= of the closing PUT of an upload session;
// PATCH bodies end in the same PUT), in order.
func (p *Proxy) Uploads(repo string) []digest.Digest {
	var out []digest.Digest
	for _, r := range p.Requests() {
		method, rest, _ := strings.Cut(r, " ")
		uri, _, _ := strings.Cut(rest, " ")
		if method != http.MethodPut || !strings.HasPrefix(uri, "/v2/"+repo+"/blobs/uploads/") {
			continue
		}
		u, err := url.Parse(uri)
		if err != nil {
			continue
		}
		out = append(out, digest.Digest(u.Query().Get("digest")))
	}
	return out
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
