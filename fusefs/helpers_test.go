package fusefs

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/spanpull/spanpull/ztoc"
)

// entry is one tar entry to write.
type entry struct {
	hdr  tar.Header
	data []byte
}

func reg(name string, mode int64, data string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))}, data: []byte(data)}
}

func dir(name string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}}
}

// makeTar writes entries as a tar stream.
func makeTar(t testing.TB, entries []entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if e.data != nil && h.Size == 0 {
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write tar header %q: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatalf("write tar data %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// tocFromTar builds the TOC the way SOCI-FORMAT.md §1.4 says: the data
// offset of an entry is the stream position right after Next.
func tocFromTar(t testing.TB, b []byte) []ztoc.FileMetadata {
	t.Helper()
	cr := &countingReader{r: bytes.NewReader(b)}
	tr := tar.NewReader(cr)
	var files []ztoc.FileMetadata
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatalf("read tar: %v", err)
		}
		f := ztoc.FileMetadata{
			Name:               h.Name,
			UncompressedOffset: cr.n,
			Linkname:           h.Linkname,
			Mode:               h.Mode,
			UID:                uint32(h.Uid),
			GID:                uint32(h.Gid),
			Uname:              h.Uname,
			Gname:              h.Gname,
			ModTime:            h.ModTime.UTC(),
			Devmajor:           h.Devmajor,
			Devminor:           h.Devminor,
			PAXRecords:         h.PAXRecords,
		}
		switch h.Typeflag {
		case tar.TypeReg:
			f.Type = ztoc.TypeReg
			f.UncompressedSize = h.Size
		case tar.TypeDir:
			f.Type = ztoc.TypeDir
		case tar.TypeSymlink:
			f.Type = ztoc.TypeSymlink
		case tar.TypeLink:
			f.Type = ztoc.TypeHardlink
		case tar.TypeChar:
			f.Type = ztoc.TypeChar
		case tar.TypeBlock:
			f.Type = ztoc.TypeBlock
		case tar.TypeFifo:
			f.Type = ztoc.TypeFifo
		default:
			t.Fatalf("tar entry %q: type %q", h.Name, h.Typeflag)
		}
		files = append(files, f)
	}
}

// memSource serves a tar stream from memory and records reads that fall
// outside the data of a regular file.
type memSource struct {
	b     []byte
	files []ztoc.FileMetadata

	mu  sync.Mutex
	bad []string
}

func (s *memSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	ok := false
	for _, f := range s.files {
		if f.Type == ztoc.TypeReg && off >= f.UncompressedOffset && end <= f.UncompressedOffset+f.UncompressedSize {
			ok = true
			break
		}
	}
	if !ok {
		s.mu.Lock()
		s.bad = append(s.bad, fmt.Sprintf("[%d, %d)", off, end))
		s.mu.Unlock()
	}
	return bytes.NewReader(s.b).ReadAt(p, off)
}

func (s *memSource) check(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.bad) > 0 {
		t.Errorf("reads outside file data: %v", s.bad)
	}
}

// mountTOC mounts files served by src on a new directory, unmounted when
// the test ends.
func mountTOC(t *testing.T, files []ztoc.FileMetadata, src StreamReader, opts Options) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("FUSE tests must run as root")
	}
	root, err := NewRoot(files, src, opts)
	if err != nil {
		t.Fatalf("NewRoot: %v", err)
	}
	mnt := t.TempDir()
	srv, err := Mount(context.Background(), mnt, root, MountOptions{})
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	return mnt
}

func lstat(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatalf("lstat: %v", err)
	}
	return &st
}
