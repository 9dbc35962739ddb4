package ztoc

import "fmt"

// DecodeFiles calls fn with each TOC entry of the zTOC flatbuffer b, in
// archive order, without ever building the Files slice: a caller that
// turns the entries into a compact form of its own (the FUSE tree of a
// layer) never holds the []FileMetadata, which for a layer of a million
// files is several hundred megabytes.
//
// Every entry is checked as Validate checks the entries of a zTOC (known
// type, acceptable names, data inside the archive, data offsets in archive
// order) before fn sees it. The first failure, or the first error fn
// returns, ends the walk and is returned. b is treated as hostile, as by
// Unmarshal. The fields outside the TOC are decoded only as far as the
// checks need them: UnmarshalInfo decodes and checks them.
//
// fn owns nothing it is given: f is not reused, but fn must not modify its
// PAXRecords map if it keeps it.
func DecodeFiles(b []byte, fn func(f *FileMetadata) error) error {
	d := &fbDecoder{buf: b, budget: int64(len(b))}
	z, _, toc, err := d.rootAndTOC()
	if err != nil {
		return fmt.Errorf("decode zTOC: %w", err)
	}
	files, err := toc.offsetVectorField(fbTOCMetadata)
	if err != nil {
		return fmt.Errorf("decode zTOC: toc: %w", err)
	}
	prev := int64(-1)
	for i, pos := range files {
		f := new(FileMetadata)
		if err := d.file(pos, f); err != nil {
			return fmt.Errorf("decode zTOC: toc entry %d: %w", i, err)
		}
		if err := z.validateFile(f); err != nil {
			return fmt.Errorf("decode zTOC: toc entry %d %q: %w", i, f.Name, err)
		}
		if f.UncompressedOffset <= prev {
			return fmt.Errorf("decode zTOC: toc entry %d %q: data offset %d does not follow the previous entry's %d",
				i, f.Name, f.UncompressedOffset, prev)
		}
		prev = f.UncompressedOffset
		if err := fn(f); err != nil {
			return err
		}
	}
	return nil
}

// UnmarshalInfo decodes the zTOC flatbuffer b like Unmarshal, and checks it
// like Validate, except for the TOC: Files is left nil and the entries are
// neither decoded nor checked. Together with DecodeFiles it yields
// everything Unmarshal does without the whole TOC in memory at once.
func UnmarshalInfo(b []byte) (*Ztoc, error) {
	d := &fbDecoder{buf: b, budget: int64(len(b))}
	z, root, _, err := d.rootAndTOC()
	if err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	if err := d.compressionInfoOf(root, z); err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	if err := z.Validate(); err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	return z, nil
}

// TOCReader reads the TOC entries of a zTOC flatbuffer one at a time, in
// any order, without decoding the others: the runtime keeps a layer's TOC
// as bytes (a file mapped into memory) rather than as a []FileMetadata,
// and decodes an entry when it needs one (to check a file's tar header on
// its first read). The bytes are checked as Unmarshal checks them when an
// entry is decoded.
type TOCReader struct {
	d     *fbDecoder
	z     *Ztoc
	files []int64 // flatbuffer position of each entry
}

// NewTOCReader returns a reader over the TOC of the zTOC flatbuffer b,
// which must stay unchanged while the reader is used.
func NewTOCReader(b []byte) (*TOCReader, error) {
	d := &fbDecoder{buf: b, budget: int64(len(b))}
	z, _, toc, err := d.rootAndTOC()
	if err != nil {
		return nil, fmt.Errorf("decode zTOC: %w", err)
	}
	files, err := toc.offsetVectorField(fbTOCMetadata)
	if err != nil {
		return nil, fmt.Errorf("decode zTOC: toc: %w", err)
	}
	return &TOCReader{d: d, z: z, files: files}, nil
}

// Len returns the number of TOC entries.
func (r *TOCReader) Len() int { return len(r.files) }

// File decodes and checks entry i (archive order, from 0).
func (r *TOCReader) File(i int) (*FileMetadata, error) {
	if i < 0 || i >= len(r.files) {
		return nil, fmt.Errorf("decode zTOC: no toc entry %d (there are %d)", i, len(r.files))
	}
	d := *r.d // a fresh budget: entries are decoded one by one, again and again
	d.budget = int64(len(d.buf))
	f := new(FileMetadata)
	if err := d.file(r.files[i], f); err != nil {
		return nil, fmt.Errorf("decode zTOC: toc entry %d: %w", i, err)
	}
	if err := r.z.validateFile(f); err != nil {
		return nil, fmt.Errorf("decode zTOC: toc entry %d %q: %w", i, f.Name, err)
	}
	return f, nil
}
