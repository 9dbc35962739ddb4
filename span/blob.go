package span

import (
	"context"
	"io"
)

// BlobReader reads byte ranges of a layer's compressed blob. A Layer calls
// ReadAt once per span fetch, so over a registry each call is one HTTP
// range request (registry.BlobReader implements it). ReadAt follows
// io.ReaderAt: it returns fewer than len(p) bytes only with an error
// (io.EOF at the end of the blob). The bytes need not be trusted: the
// Layer verifies them against the zTOC's span digests.
type BlobReader interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// LocalBlob returns a BlobReader over a blob that is at hand, such as a
// layer file or a layer in memory. Local reads do not wait on a network,
// so ctx is only checked before each read.
func LocalBlob(r io.ReaderAt) BlobReader { return localBlob{r} }

type localBlob struct{ r io.ReaderAt }

func (b localBlob) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return b.r.ReadAt(p, off)
}
