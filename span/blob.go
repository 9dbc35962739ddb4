package span

import (
	"context"
	"fmt"
	"io"
)

// BlobReader reads byte ranges of a layer's compressed blob. A Layer calls
// ReadRange once per span fetch, so over a registry each call is one HTTP
// range request (registry.BlobReader implements it), whose bytes the Layer
// verifies and inflates as they arrive. The range [off, off+n) lies inside
// the blob; the reader yields exactly its bytes or an error. The bytes
// need not be trusted: the Layer verifies them against the zTOC's chunk
// and span digests before it uses them.
type BlobReader interface {
	ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error)
}

// LocalBlob returns a BlobReader over a blob that is at hand, such as a
// layer file or a layer in memory. Local reads do not wait on a network,
// so ctx is only checked before each read.
func LocalBlob(r io.ReaderAt) BlobReader { return localBlob{r} }

type localBlob struct{ r io.ReaderAt }

func (b localBlob) ReadRange(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return io.NopCloser(ctxReader{ctx, io.NewSectionReader(b.r, off, n)}), nil
}

// ctxReader stops reading once ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// readBlob reads the blob's bytes [off, end) whole.
func (l *Layer) readBlob(ctx context.Context, off, end int64) ([]byte, error) {
	body, err := l.blob.ReadRange(ctx, off, end-off)
	if err == nil {
		defer body.Close()
		b := make([]byte, end-off)
		if _, err = io.ReadFull(body, b); err == nil {
			return b, nil
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	}
	return nil, fmt.Errorf("fetch compressed bytes %d-%d: %w", off, end-1, err)
}
