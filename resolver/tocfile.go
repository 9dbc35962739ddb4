package resolver

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// mappedFile is a read-only file mapped into memory: how a mounted layer
// keeps its TOC (a zTOC flatbuffer). The kernel pages it in when an entry
// is decoded and may drop the pages again, so a layer of a million files
// costs the daemon its compact FUSE tree, not its whole TOC.
type mappedFile struct {
	b []byte
}

// mapFile maps the file name read-only.
func mapFile(name string) (*mappedFile, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() == 0 {
		return &mappedFile{}, nil
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map %s: %w", name, err)
	}
	return &mappedFile{b: b}, nil
}

// Bytes returns the mapped bytes; they are valid until Close.
func (m *mappedFile) Bytes() []byte { return m.b }

// release lets the kernel drop the pages read so far from the process
// (they stay in the page cache): called once the FUSE tree is built, after
// the one pass over every entry.
func (m *mappedFile) release() {
	if len(m.b) > 0 {
		unix.Madvise(m.b, unix.MADV_DONTNEED)
	}
}

// Close unmaps the file.
func (m *mappedFile) Close() error {
	if len(m.b) == 0 {
		return nil
	}
	b := m.b
	m.b = nil
	return unix.Munmap(b)
}
