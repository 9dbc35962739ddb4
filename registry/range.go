package registry

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	orasreg "oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/errcode"
)

// ReadAt reads len(p) bytes of a blob at offset off with one HTTP GET
// carrying an exact Range header (bytes=off-(off+len(p)-1)). It follows
// io.ReaderAt: fewer bytes only at the end of the blob, with io.EOF. A
// server that ignores Range gets ErrRangeUnsupported rather than a silent
// full download. The bytes are not digest-checked here (a range has no
// digest): callers verify spans against the zTOC's span digests.
func (r *Repository) ReadAt(ctx context.Context, desc ocispec.Descriptor, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", r.at(desc.Digest.String()), off)
	}
	if off >= desc.Size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	want := int64(len(p))
	var eof error
	if off+want > desc.Size {
		want = desc.Size - off
		eof = io.EOF
	}
	var n int
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		var err error
		n, err = r.readAt(ctx, e, desc, p[:want], off)
		return err
	})
	if err != nil {
		return 0, err
	}
	return n, eof
}

// readAt reads len(p) bytes of blob desc at off from host e, with one
// range request.
func (r *Repository) readAt(ctx context.Context, e *endpoint, desc ocispec.Descriptor, p []byte, off int64) (int, error) {
	body, err := r.openRange(ctx, e, desc, off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	defer body.Close()
	n, err := io.ReadFull(body, p)
	if err != nil {
		return n, err
	}
	// Refuse a body longer than the range: the server is not doing what
	// its headers say.
	var extra [1]byte
	if _, err := body.Read(extra[:]); err != io.EOF {
		return 0, err
	}
	return n, nil
}

// ReadRange returns the n bytes of a blob at offset off as they arrive,
// from one HTTP GET carrying an exact Range header: a reader can use the
// first bytes while the rest are on their way. The range must lie inside
// the blob. Hosts are tried in order until one answers the request; an
// error while reading the body is the reader's (wrapped like ReadAt's,
// io.ErrUnexpectedEOF for a body cut short, an error for a longer one).
// The bytes are not digest-checked here.
func (r *Repository) ReadRange(ctx context.Context, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n <= 0 || off+n > desc.Size {
		return nil, fmt.Errorf("read %s: range of %d bytes at %d is outside the blob (%d bytes)", r.at(desc.Digest.String()), n, off, desc.Size)
	}
	var body io.ReadCloser
	err := r.each(ctx, docker.HostCapabilityPull, func(e *endpoint) error {
		var err error
		body, err = r.openRange(ctx, e, desc, off, n)
		return err
	})
	return body, err
}

// openRange sends the range request for n bytes of blob desc at off to
// host e and returns its body, which yields exactly those bytes.
func (r *Repository) openRange(ctx context.Context, e *endpoint, desc ocispec.Descriptor, off, n int64) (io.ReadCloser, error) {
	end := off + n - 1
	ref := orasreg.Reference{Registry: e.repo.Reference.Registry, Repository: e.repo.Reference.Repository, Reference: desc.Digest.String()}
	ctx = auth.AppendRepositoryScope(ctx, ref, auth.ActionPull)
	url := fmt.Sprintf("%s://%s/v2/%s/blobs/%s", e.scheme, ref.Host(), ref.Repository, desc.Digest)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.at(desc.Digest.String()), err)
	}
	rng := fmt.Sprintf("bytes=%d-%d", off, end)
	req.Header.Set("Range", rng)
	resp, err := e.client.Do(req)
	if err != nil {
		return nil, r.wrap("read "+rng+" of", desc.Digest.String(), err)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusOK:
		resp.Body.Close()
		return nil, fmt.Errorf("read %s of %s from %s: %w (status 200)", rng, r.at(desc.Digest.String()), e.host, ErrRangeUnsupported)
	default:
		defer resp.Body.Close()
		return nil, r.wrap("read "+rng+" of", desc.Digest.String(), errResponse(resp))
	}
	if s, e, ok := parseContentRange(resp.Header.Get("Content-Range")); !ok || s != off || e != end {
		resp.Body.Close()
		return nil, fmt.Errorf("read %s of %s: server sent Content-Range %q", rng, r.at(desc.Digest.String()), resp.Header.Get("Content-Range"))
	}
	return &rangeBody{body: resp.Body, left: n, what: "read " + rng + " of", digest: desc.Digest.String(), r: r}, nil
}

// rangeBody is the body of a range response: exactly left more bytes,
// its errors wrapped with the range and the blob.
type rangeBody struct {
	body   io.ReadCloser
	left   int64
	what   string
	digest string
	r      *Repository
}

func (b *rangeBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		// Refuse a body longer than the range: the server is not doing
		// what its headers say.
		var extra [1]byte
		if m, _ := b.body.Read(extra[:]); m > 0 {
			return 0, fmt.Errorf("%s %s: server sent more bytes than the range", b.what, b.r.at(b.digest))
		}
		return 0, io.EOF
	}
	n, err := b.body.Read(p[:min(int64(len(p)), b.left)])
	b.left -= int64(n)
	switch {
	case err == io.EOF && b.left > 0:
		return n, b.r.wrap(b.what, b.digest, io.ErrUnexpectedEOF)
	case err == io.EOF:
		return n, nil
	case err != nil:
		return n, b.r.wrap(b.what, b.digest, err)
	}
	return n, nil
}

func (b *rangeBody) Close() error { return b.body.Close() }

// errResponse turns a non-success response into oras-go's error type, so
// wrap classifies it like the other operations' errors.
func errResponse(resp *http.Response) error {
	var body struct {
		Errors errcode.Errors `json:"errors"`
	}
	_ = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&body)
	return &errcode.ErrorResponse{Method: resp.Request.Method, URL: resp.Request.URL, StatusCode: resp.StatusCode, Errors: body.Errors}
}

// BlobReader reads byte ranges of one blob, each ReadAt one HTTP range
// request (see Repository.ReadAt). It is the compressed-blob reader that
// span.Layer fetches spans with (it implements span.BlobReader).
type BlobReader struct {
	r    *Repository
	desc ocispec.Descriptor
}

// BlobReader returns a BlobReader over blob desc, whose size it trusts.
func (r *Repository) BlobReader(desc ocispec.Descriptor) (*BlobReader, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("blob reader %s: bad digest %q: %w", r.name, desc.Digest, err)
	}
	if desc.Size < 0 {
		return nil, fmt.Errorf("blob reader %s: negative size %d", r.at(desc.Digest.String()), desc.Size)
	}
	return &BlobReader{r: r, desc: desc}, nil
}

// ReadAt reads len(p) bytes of the blob at off under ctx, following
// io.ReaderAt's rules for short reads.
func (b *BlobReader) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return b.r.ReadAt(ctx, b.desc, p, off)
}

// ReadRange returns the n bytes of the blob at off as they arrive, from
// one range request (see Repository.ReadRange).
func (b *BlobReader) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	return b.r.ReadRange(ctx, b.desc, off, n)
}

// Size is the blob size from its descriptor.
func (b *BlobReader) Size() int64 { return b.desc.Size }
