package fusefs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/toctest"
	"github.com/spanpull/spanpull/ztoc"
)

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
	root := newRoot(t, files, src, opts)
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

// newRoot builds the Root of files served by src.
func newRoot(t testing.TB, files []ztoc.FileMetadata, src StreamReader, opts Options) *Root {
	t.Helper()
	tree, err := NewTree(Files(files), opts.Logger)
	if err != nil {
		t.Fatalf("NewTree: %v", err)
	}
	root, err := NewRoot(tree, src, opts)
	if err != nil {
		t.Fatalf("NewRoot: %v", err)
	}
	return root
}

// mountLayer mounts the tar of entries, served from memory, on a new
// directory (see mountTOC).
func mountLayer(t *testing.T, entries ...layertest.Entry) string {
	t.Helper()
	layer := layertest.Tar(t, entries...)
	files, _ := toctest.FromTar(t, layer)
	return mountTOC(t, files, &memSource{b: layer, files: files}, Options{})
}

func lstat(t *testing.T, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatalf("lstat: %v", err)
	}
	return &st
}

// testLogger returns a logger writing to w.
func testLogger(w io.Writer) *log.Entry {
	l := logrus.New()
	l.SetOutput(w)
	return logrus.NewEntry(l)
}
