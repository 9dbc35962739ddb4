package record

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// A daemon's records travel through Handler and Export unchanged; the two
// kinds of 404 are told apart.
func TestHandlerExport(t *testing.T) {
	s := NewStore(Options{})
	defer s.Close()
	l := s.Layer(testImage, LayerInfo{Digest: testLayer1, Spans: 8})
	l.Span(4)
	l.File("usr/bin/python3")
	mux := http.NewServeMux()
	mux.Handle(HandlerPath, Handler(s))
	srv := httptest.NewServer(mux)
	defer srv.Close()
	ctx := context.Background()

	want, _ := s.Record(testImage.Reference, "web")
	for _, addr := range []string{srv.URL, strings.TrimPrefix(srv.URL, "http://")} {
		got, err := Export(ctx, addr, testImage.Reference, "web")
		if err != nil {
			t.Fatal(err)
		}
		if got.Name != "web" || len(got.Layers) != 1 || got.Layers[0].Spans[0] != want.Layers[0].Spans[0] || got.Layers[0].Files[0].Path != "/usr/bin/python3" {
			t.Fatalf("exported %+v", got)
		}
	}
	if _, err := Export(ctx, srv.URL, "other:1", ""); !errors.Is(err, ErrNoRecord) {
		t.Fatalf("export of an unknown image: %v, want ErrNoRecord", err)
	}
	if _, err := Export(ctx, srv.URL, testImage.Reference, "a b"); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("bad name: %v", err)
	}
	for _, path := range []string{HandlerPath, HandlerPath + "?name=x"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("GET %s: %s", path, resp.Status)
		}
	}
	resp, err := http.Post(srv.URL+HandlerPath+"?image=x", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST: %s", resp.Status)
	}

	// A daemon that does not serve records.
	bare := httptest.NewServer(http.NewServeMux())
	defer bare.Close()
	if _, err := Export(ctx, bare.URL, testImage.Reference, ""); !errors.Is(err, ErrNotRecording) {
		t.Fatalf("export from a daemon without records: %v, want ErrNotRecording", err)
	}
}

func TestLogReady(t *testing.T) {
	var buf bytes.Buffer
	l := logrus.New()
	l.SetOutput(&buf)
	LogReady(logrus.NewEntry(l), testImage)
	want := "access record ready for registry.example.com/app:1.2: snapshotter record export registry.example.com/app:1.2"
	if !strings.Contains(buf.String(), want) {
		t.Fatalf("logged %q, want %q", buf.String(), want)
	}
}
