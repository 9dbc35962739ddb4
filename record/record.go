// Package record is spanpull's access record: which spans and files of each
// lazily pulled layer a container start read first, in order, and when.
// The bytes a start needs are the same on every node, so a record made
// once (by a node's daemon, or in CI by "snapshotter record run") is
// published as SOCI prefetch artifacts ("indexer prefetch attach"), and
// every later start fetches those spans ahead, in parallel with its own
// work.
//
// The package has three parts: the record file format (Record: JSON,
// versioned, validated on read), the in-memory recorder a daemon feeds
// from its FUSE filesystems and span engine (Store, LayerRecorder: cheap
// on the hot path, frozen after a window), and the transport that gets a
// record out of a running daemon (Handler on the daemon's metrics address,
// Export on the client side).
//
// # File format
//
//	{
//	  "version": 1,
//	  "name": "default",
//	  "image": {"reference": "registry.example.com/app:1.2", "manifest": "sha256:..."},
//	  "layers": [
//	    {
//	      "digest": "sha256:...",
//	      "spans": [{"id": 12, "at_us": 1830}, {"id": 3, "at_us": 2410}],
//	      "files": [{"path": "/usr/bin/python3.11", "at_us": 1790}]
//	    }
//	  ]
//	}
//
// version is Version. name is the workload the record is for (the prefetch
// artifacts' name; ValidatePrefetchName's rules). image names the image by
// the reference it was pulled as and the digest of its image manifest (the
// platform's manifest, not an image index). layers are the lazily mounted
// layers in mount order; per layer, spans are span IDs of the layer's zTOC
// and files are cleaned absolute paths in the layer, each listed once, in
// first-access order, with at_us the microseconds since the layer was
// mounted (non-decreasing). Unknown fields are an error.
package record

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/ztoc"
)

// Version is the record format version this package writes and reads.
const Version = 1

// DefaultName is the name of a record nobody named: the workload of a
// node's ordinary starts.
const DefaultName = "default"

// MaxSize bounds the record bytes Parse accepts (a record of 100,000
// entries is about 4 MB).
const MaxSize = 64 << 20

// Record is the access record of one start of one image.
type Record struct {
	// Version is the format version (Version).
	Version int `json:"version"`
	// Name is the workload the record is for.
	Name string `json:"name"`
	// Image is the image the container ran.
	Image Image `json:"image"`
	// Layers are the lazily mounted layers, in mount order.
	Layers []Layer `json:"layers"`
}

// Image names the image a record was made with.
type Image struct {
	// Reference is the reference the image was pulled as.
	Reference string `json:"reference"`
	// Manifest is the digest of the image manifest (the platform's).
	Manifest digest.Digest `json:"manifest"`
}

// String returns the reference, or the manifest digest when there is none.
func (i Image) String() string {
	if i.Reference != "" {
		return i.Reference
	}
	return i.Manifest.String()
}

// Layer is what one layer served first.
type Layer struct {
	// Digest is the layer blob's digest.
	Digest digest.Digest `json:"digest"`
	// Spans are the spans read, in first-access order.
	Spans []Span `json:"spans"`
	// Files are the files opened or read, in first-access order.
	Files []File `json:"files"`
}

// Span is the first access of one span.
type Span struct {
	ID ztoc.SpanID `json:"id"`
	// AtMicros is the time since the layer's mount, in microseconds.
	AtMicros int64 `json:"at_us"`
}

// File is the first access of one file.
type File struct {
	// Path is the file's cleaned absolute path in the layer (CleanPath).
	Path string `json:"path"`
	// AtMicros is the time since the layer's mount, in microseconds.
	AtMicros int64 `json:"at_us"`
}

// SpanIDs returns the layer's spans in first-access order.
func (l Layer) SpanIDs() []ztoc.SpanID {
	ids := make([]ztoc.SpanID, len(l.Spans))
	for i, s := range l.Spans {
		ids[i] = s.ID
	}
	return ids
}

// CleanPath returns the form of a tar entry name or path a record holds:
// absolute, cleaned, "/" for the root.
func CleanPath(name string) string { return path.Clean("/" + name) }

// Empty reports whether no span of any layer was read: such a record
// prefetches nothing.
func (r *Record) Empty() bool {
	for _, l := range r.Layers {
		if len(l.Spans) > 0 {
			return false
		}
	}
	return true
}

// Validate checks everything the file format says (see the package
// documentation); the error names the first offending field.
func (r *Record) Validate() error {
	if r.Version != Version {
		return fmt.Errorf("record: version %d, this build reads version %d", r.Version, Version)
	}
	if err := index.ValidatePrefetchName(r.Name); err != nil {
		return fmt.Errorf("record: name: %w", err)
	}
	if r.Image.Reference == "" {
		return errors.New("record: image.reference is empty")
	}
	if err := r.Image.Manifest.Validate(); err != nil {
		return fmt.Errorf("record: image.manifest %q: %w", r.Image.Manifest, err)
	}
	seen := make(map[digest.Digest]bool, len(r.Layers))
	for i, l := range r.Layers {
		if err := l.validate(); err != nil {
			return fmt.Errorf("record: layers[%d] (%s): %w", i, l.Digest, err)
		}
		if seen[l.Digest] {
			return fmt.Errorf("record: layers[%d]: layer %s listed twice", i, l.Digest)
		}
		seen[l.Digest] = true
	}
	return nil
}

func (l Layer) validate() error {
	if err := l.Digest.Validate(); err != nil {
		return fmt.Errorf("digest: %w", err)
	}
	spans := newOrderCheck[ztoc.SpanID]("spans", len(l.Spans))
	for i, s := range l.Spans {
		if s.ID < 0 {
			return fmt.Errorf("spans[%d]: negative span ID %d", i, s.ID)
		}
		if err := spans.next(i, s.ID, fmt.Sprintf("span %d", s.ID), s.AtMicros); err != nil {
			return err
		}
	}
	files := newOrderCheck[string]("files", len(l.Files))
	for i, f := range l.Files {
		if f.Path == "" || CleanPath(f.Path) != f.Path {
			return fmt.Errorf("files[%d]: path %q is not a cleaned absolute path", i, f.Path)
		}
		if err := files.next(i, f.Path, f.Path, f.AtMicros); err != nil {
			return err
		}
	}
	return nil
}

// orderCheck checks the rule a layer's span and file lists share: each
// entry names a key once, at a time no earlier than the entry before.
type orderCheck[K comparable] struct {
	list string // the list's JSON name, for errors
	seen map[K]bool
	last int64
}

func newOrderCheck[K comparable](list string, n int) *orderCheck[K] {
	return &orderCheck[K]{list: list, seen: make(map[K]bool, n)}
}

// next checks entry i of the list, with key (named name in errors) at
// atMicros.
func (c *orderCheck[K]) next(i int, key K, name string, atMicros int64) error {
	switch {
	case c.seen[key]:
		return fmt.Errorf("%s[%d]: %s listed twice", c.list, i, name)
	case atMicros < c.last:
		return fmt.Errorf("%s[%d]: at_us %d before the previous entry's %d", c.list, i, atMicros, c.last)
	}
	c.seen[key], c.last = true, atMicros
	return nil
}

// Parse decodes and validates a record.
func Parse(b []byte) (*Record, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("record: %d bytes exceeds the %d byte limit", len(b), MaxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r Record
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("record: %w", err)
	}
	if dec.More() {
		return nil, errors.New("record: trailing data after the JSON object")
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

// Marshal validates r and returns it as indented JSON with a final
// newline; empty lists are written as [].
func (r *Record) Marshal() ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	out := *r
	out.Layers = make([]Layer, len(r.Layers))
	for i, l := range r.Layers {
		if l.Spans == nil {
			l.Spans = []Span{}
		}
		if l.Files == nil {
			l.Files = []File{}
		}
		out.Layers[i] = l
	}
	if out.Layers == nil {
		out.Layers = []Layer{}
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("record: %w", err)
	}
	return append(b, '\n'), nil
}

// ReadFile reads and validates the record file at name.
func ReadFile(name string) (*Record, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	r, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return r, nil
}

// WriteFile writes r to the file name, whole or not at all.
func WriteFile(name string, r *Record) error {
	b, err := r.Marshal()
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Dir(name), filepath.Base(name), b)
}
