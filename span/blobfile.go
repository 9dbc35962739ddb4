package span

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/spanpull/spanpull/ztoc"
)

// errIncomplete is returned (wrapped) by OpenBlob for a layer that is not
// Complete.
var errIncomplete = errors.New("not every byte of the blob is cached")

// OpenBlob streams the layer's compressed blob, in order, from the disk
// cache, for the pass that verifies the whole layer against its digest.
// The layer must be Complete; the entries are not evicted until the
// reader is closed.
func (l *Layer) OpenBlob(ctx context.Context) (io.ReadCloser, error) {
	if !l.Complete() {
		return nil, fmt.Errorf("%sopen blob: %w", l.prefix, errIncomplete)
	}
	r := &blobReader{ctx: ctx, cache: l.cache}
	var pos int64
	add := func(id ztoc.SpanID, start, end int64) error {
		if end <= pos {
			return nil
		}
		k := entryKey{l.digest, id}
		unpin, err := l.cache.pin(k)
		if err != nil {
			return err
		}
		r.unpins = append(r.unpins, unpin)
		r.parts = append(r.parts, blobPart{key: k, skip: pos - start, end: end - start})
		pos = end
		return nil
	}
	err := add(headerID, 0, l.spans[0].CompressedStart)
	for _, s := range l.spans {
		if err == nil {
			err = add(s.ID, s.CompressedStart, s.CompressedEnd)
		}
	}
	if err == nil && pos != l.z.CompressedArchiveSize {
		err = fmt.Errorf("the spans end at %d, the blob at %d", pos, l.z.CompressedArchiveSize)
	}
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("%sopen blob: %w", l.prefix, err)
	}
	return r, nil
}

// blobPart is bytes [skip, end) of a cache entry.
type blobPart struct {
	key       entryKey
	skip, end int64
}

// blobReader reads the parts of a blob one after the other.
type blobReader struct {
	ctx    context.Context
	cache  *Cache
	parts  []blobPart
	unpins []func()
	cur    *io.SectionReader
	f      io.Closer
}

func (r *blobReader) Read(p []byte) (int, error) {
	for {
		if err := r.ctx.Err(); err != nil {
			return 0, err
		}
		if r.cur == nil {
			if len(r.parts) == 0 {
				return 0, io.EOF
			}
			part := r.parts[0]
			r.parts = r.parts[1:]
			f, err := r.cache.open(part.key)
			if err != nil {
				return 0, err
			}
			if f.Size() < part.end {
				f.Close()
				return 0, fmt.Errorf("cached %s of %s has %d bytes, want %d", describe(part.key.id), part.key.layer, f.Size(), part.end)
			}
			r.cur, r.f = io.NewSectionReader(f, part.skip, part.end-part.skip), f
		}
		n, err := r.cur.Read(p)
		if err == io.EOF {
			r.f.Close()
			r.cur, r.f = nil, nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

// Close releases the entries.
func (r *blobReader) Close() error {
	if r.f != nil {
		r.f.Close()
		r.cur, r.f = nil, nil
	}
	for _, unpin := range r.unpins {
		unpin()
	}
	r.unpins = nil
	return nil
}
