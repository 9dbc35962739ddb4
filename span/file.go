package span

import (
	"context"
	"fmt"
	"io"

	"github.com/spanpull/spanpull/ztoc"
)

// WriteFile writes the contents of regular file f (an entry of the layer's
// zTOC) to w, reading each span the file covers once; holes of sparse
// files are written as zeros. It returns how many bytes it wrote: on an
// error, they are a correct prefix of the file.
func (l *Layer) WriteFile(ctx context.Context, w io.Writer, f *ztoc.FileMetadata) (int64, error) {
	if f.Type != ztoc.TypeReg {
		return 0, fmt.Errorf("%s is a %s, not a regular file", f.Name, f.Type)
	}
	frags, err := f.Fragments()
	if err != nil {
		return 0, err
	}
	cw := &countingWriter{w: w}
	var pos int64 // logical file position
	for _, fr := range frags {
		end := fr.StreamOffset + fr.Length
		if fr.StreamOffset < 0 || end > l.z.UncompressedArchiveSize {
			return cw.n, fmt.Errorf("%s: data [%d, %d) is outside the archive", f.Name, fr.StreamOffset, end)
		}
		if err := writeZeros(cw, fr.Offset-pos); err != nil {
			return cw.n, err
		}
		if err := l.writeRange(ctx, cw, fr.StreamOffset, end); err != nil {
			return cw.n, fmt.Errorf("%s: %w", f.Name, err)
		}
		pos = fr.Offset + fr.Length
	}
	return cw.n, writeZeros(cw, f.UncompressedSize-pos)
}

// writeRange writes the uncompressed bytes [from, to) of the stream to w,
// span by span, so that each span is fetched (or read from the cache) once.
func (l *Layer) writeRange(ctx context.Context, w io.Writer, from, to int64) error {
	var buf []byte
	for pos := from; pos < to; {
		s, err := l.spanAt(pos)
		if err != nil {
			return err
		}
		stop := min(to, s.UncompressedEnd)
		if int64(cap(buf)) < stop-pos {
			buf = make([]byte, stop-pos)
		}
		dst := buf[:stop-pos]
		if err := l.readSpan(ctx, s, dst, pos-s.UncompressedStart, false); err != nil {
			return err
		}
		if _, err := w.Write(dst); err != nil {
			return err
		}
		pos = stop
	}
	return nil
}

// writeZeros writes n zero bytes to w: the holes of a sparse file.
func writeZeros(w io.Writer, n int64) error {
	var zeros [32 << 10]byte
	for n > 0 {
		c := min(n, int64(len(zeros)))
		if _, err := w.Write(zeros[:c]); err != nil {
			return err
		}
		n -= c
	}
	return nil
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
