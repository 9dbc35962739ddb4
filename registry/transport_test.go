package registry

import (
	"net/http"
	"testing"
	"time"
)

func TestBackoffGrowsAndIsCapped(t *testing.T) {
	p := RetryPolicy{MinBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}.withDefaults()
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for n, w := range want {
		w *= time.Millisecond
		got := p.backoff(n, nil)
		if got < w*9/10 || got > w*11/10 {
			t.Errorf("backoff(%d) = %s, want %s ±10%%", n, got, w)
		}
	}
	resp := &http.Response{StatusCode: http.StatusTooManyRequests, Header: http.Header{"Retry-After": {"1"}}}
	if got := p.backoff(0, resp); got != time.Second {
		t.Errorf("Retry-After 1: %s", got)
	}
	resp.Header.Set("Retry-After", "3600")
	if got := p.backoff(0, resp); got != time.Second {
		t.Errorf("Retry-After capped: %s", got)
	}
	d := RetryPolicy{}.withDefaults()
	if d.MaxRetries != DefaultMaxRetries || d.MinBackoff != DefaultMinBackoff || d.MaxBackoff != DefaultMaxBackoff {
		t.Errorf("defaults %+v", d)
	}
	if n := (RetryPolicy{MaxRetries: -1}).withDefaults().MaxRetries; n != 0 {
		t.Errorf("negative MaxRetries -> %d", n)
	}
}

func TestParseContentRange(t *testing.T) {
	for in, want := range map[string][3]int64{
		"bytes 0-9/163":  {0, 9, 1},
		"bytes 5-5/*":    {5, 5, 1},
		"bytes 9-5/100":  {0, 0, 0},
		"bytes -1-5/100": {0, 0, 0},
		"bytes 1-2":      {0, 0, 0},
		"items 1-2/3":    {0, 0, 0},
		"":               {0, 0, 0},
	} {
		s, e, ok := parseContentRange(in)
		if ok != (want[2] == 1) || (ok && (s != want[0] || e != want[1])) {
			t.Errorf("parseContentRange(%q) = %d %d %v", in, s, e, ok)
		}
	}
}

func TestNormalizeReference(t *testing.T) {
	for in, want := range map[string]string{
		"alpine":                            "registry-1.docker.io/library/alpine",
		"alpine:3.20":                       "registry-1.docker.io/library/alpine:3.20",
		"user/app@sha256:abc":               "registry-1.docker.io/user/app@sha256:abc",
		"docker.io/library/alpine":          "registry-1.docker.io/library/alpine",
		"docker.io/alpine:3":                "registry-1.docker.io/library/alpine:3",
		"index.docker.io/x/y":               "registry-1.docker.io/x/y",
		"localhost/app":                     "localhost/app",
		"localhost:5000/app:v1":             "localhost:5000/app:v1",
		"127.0.0.1:5000/a/b":                "127.0.0.1:5000/a/b",
		"ghcr.io/org/app:tag":               "ghcr.io/org/app:tag",
		"public.ecr.aws/docker/library/foo": "public.ecr.aws/docker/library/foo",
	} {
		if got := normalizeReference(in); got != want {
			t.Errorf("normalizeReference(%q) = %q, want %q", in, got, want)
		}
	}
}
