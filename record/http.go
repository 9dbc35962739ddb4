package record

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/containerd/log"

	"github.com/spanpull/spanpull/index"
)

// A daemon serves its records over HTTP on its metrics address:
//
//	GET /record?image=REF[&name=NAME]
//
// answers 200 with the record of the image REF (a reference as pulled, or
// the image manifest digest) in the file format, named NAME (default
// "default"); 404 with header X-Spanpull-Record: none when the daemon has
// no record of the image; 400 for a request without image or with a bad
// name. A 404 without that header comes from a daemon that serves no
// records at all.
const (
	// HandlerPath is where Handler is served.
	HandlerPath = "/record"
	// noRecordHeader marks Handler's "no record" answers.
	noRecordHeader = "X-Spanpull-Record"
)

// ErrNotRecording says that a daemon serves no access records: it is
// older than recording, or [record] disable is set.
var ErrNotRecording = errors.New("the daemon serves no access records (recording is off, or the daemon predates it)")

// Source is where Handler finds records; *Store is one.
type Source interface {
	// Record returns the record of image (reference or manifest digest)
	// named name, or an error wrapping ErrNoRecord.
	Record(image, name string) (*Record, error)
}

// Handler serves the records of src on HandlerPath (see above).
func Handler(src Source) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		image, name := r.URL.Query().Get("image"), r.URL.Query().Get("name")
		if image == "" {
			http.Error(w, "missing query parameter image", http.StatusBadRequest)
			return
		}
		if name != "" {
			if err := index.ValidatePrefetchName(name); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
		}
		rec, err := src.Record(image, name)
		if errors.Is(err, ErrNoRecord) {
			w.Header().Set(noRecordHeader, "none")
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		var b []byte
		if err == nil {
			b, err = rec.Marshal()
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
}

// Export fetches the record of image (a reference as pulled, or the image
// manifest digest) from the daemon whose metrics address is addr
// ("host:port" or an http:// URL), named name ("" for DefaultName). It
// returns an error wrapping ErrNoRecord when the daemon has none for the
// image, ErrNotRecording when it serves none at all.
func Export(ctx context.Context, addr, image, name string) (*Record, error) {
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	q := url.Values{"image": {image}}
	if name != "" {
		q.Set("name", name)
	}
	u := strings.TrimSuffix(base, "/") + HandlerPath + "?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("export record: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("export record from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("export record from %s: %w", addr, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound && resp.Header.Get(noRecordHeader) != "":
		return nil, fmt.Errorf("daemon at %s: %s: %w", addr, image, ErrNoRecord)
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("daemon at %s: %w", addr, ErrNotRecording)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("export record from %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(b)))
	}
	r, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("export record from %s: %w", addr, err)
	}
	return r, nil
}

// LogReady logs, at info level, that the record of img is complete and
// how to get it: the hint the daemon gives when an image's record freezes
// (call it from Options.OnFrozen).
func LogReady(logger *log.Entry, img Image) {
	ref := img.String()
	logger.WithField("image", ref).WithField("manifest", img.Manifest).
		Infof("access record ready for %s: snapshotter record export %s", ref, ref)
}
