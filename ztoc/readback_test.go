package ztoc

import (
	"fmt"
	"io"
)

// cfReader reads a layer's tar stream and its files back through the
// layer's zTOC with the package's primitives alone (Spans, VerifySpan,
// InflateRange, Fragments): the tests' check that a zTOC serves reads.
// It is a test oracle over a blob in memory; package span is the engine
// that serves reads.
type cfReader struct {
	z     *Ztoc
	spans []Span
	blob  []byte
}

func cfNewReader(z *Ztoc, blob []byte) (*cfReader, error) {
	spans, err := z.Spans()
	if err != nil {
		return nil, err
	}
	return &cfReader{z: z, spans: spans, blob: blob}, nil
}

// ReadAt reads the uncompressed tar stream at off, like io.ReaderAt.
func (r *cfReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	n := 0
	err := r.readRange(off, min(off+int64(len(p)), r.z.UncompressedArchiveSize), func(b []byte) error {
		n += copy(p[n:], b)
		return nil
	})
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// readRange passes the uncompressed bytes [from, to) to emit, verifying
// and inflating each span they cover.
func (r *cfReader) readRange(from, to int64, emit func([]byte) error) error {
	for pos := from; pos < to; {
		id, ok := SpanForOffset(r.spans, pos)
		if !ok {
			return fmt.Errorf("uncompressed offset %d is in no span", pos)
		}
		s := r.spans[id]
		if s.CompressedEnd > int64(len(r.blob)) {
			return fmt.Errorf("span %d ends at %d, past the %d-byte blob: %w", id, s.CompressedEnd, len(r.blob), io.ErrUnexpectedEOF)
		}
		comp := r.blob[s.CompressedStart:s.CompressedEnd]
		if err := r.z.VerifySpan(s, comp); err != nil {
			return err
		}
		end := min(to, s.UncompressedEnd)
		if err := InflateRange(r.z.Algorithm, s, comp, pos, end, emit); err != nil {
			return err
		}
		pos = end
	}
	return nil
}

// WriteFile writes the contents of regular file f to w, holes of sparse
// files as zeros, and returns how many bytes it wrote.
func (r *cfReader) WriteFile(w io.Writer, f *FileMetadata) (int64, error) {
	if f.Type != TypeReg {
		return 0, fmt.Errorf("%s is a %s, not a regular file", f.Name, f.Type)
	}
	frags, err := f.Fragments()
	if err != nil {
		return 0, err
	}
	var n, pos int64 // bytes written; logical file position
	write := func(b []byte) error {
		m, err := w.Write(b)
		n += int64(m)
		return err
	}
	zeros := func(k int64) error {
		var z [32 << 10]byte
		for ; k > 0; k -= int64(len(z)) {
			if err := write(z[:min(k, int64(len(z)))]); err != nil {
				return err
			}
		}
		return nil
	}
	for _, fr := range frags {
		end := fr.StreamOffset + fr.Length
		if fr.StreamOffset < 0 || end > r.z.UncompressedArchiveSize {
			return n, fmt.Errorf("%s: data [%d, %d) is outside the archive", f.Name, fr.StreamOffset, end)
		}
		if err := zeros(fr.Offset - pos); err != nil {
			return n, err
		}
		if err := r.readRange(fr.StreamOffset, end, write); err != nil {
			return n, fmt.Errorf("%s: %w", f.Name, err)
		}
		pos = fr.Offset + fr.Length
	}
	return n, zeros(f.UncompressedSize - pos)
}
