package fusefs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/spanpull/spanpull/ztoc"
)

// plainSource serves an uncompressed tar stream from memory.
type plainSource []byte

func (s plainSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	return bytes.NewReader(s).ReadAt(p, off)
}

// TestSparseFiles mounts GNU sparse files (every format GNU tar writes)
// and compares them with the files they were made from: holes read as
// zeros, data runs come from their place in the stream.
func TestSparseFiles(t *testing.T) {
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for _, at := range []int64{0, 3 << 20, 7<<20 + 123} {
		if _, err := f.WriteAt(bytes.Repeat([]byte("data run "), 1000), at); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(12 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	want, err := os.ReadFile(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for _, format := range [][]string{{"--format=gnu"}, {"--format=oldgnu"}, {"--format=posix", "--sparse-version=0.1"}, {"--format=posix", "--sparse-version=1.0"}} {
		t.Run(format[len(format)-1], func(t *testing.T) {
			tarFile := filepath.Join(t.TempDir(), "l.tar")
			args := append(append([]string{"--sparse"}, format...), "-cf", tarFile, "-C", src, "sparse")
			if out, err := exec.Command("tar", args...).CombinedOutput(); err != nil {
				t.Fatalf("tar %v: %v\n%s", args, err, out)
			}
			b, err := os.ReadFile(tarFile)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) >= len(want) {
				t.Fatalf("tar of %d bytes is not sparse", len(b))
			}
			z, _, err := ztoc.Build(context.Background(), bytes.NewReader(b), ztoc.BuildOptions{})
			if err != nil {
				t.Fatal(err)
			}
			mnt := mountTOC(t, z.Files, plainSource(b), Options{})
			got, err := os.ReadFile(filepath.Join(mnt, "sparse"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("sparse file read through FUSE differs (%d bytes, want %d)", len(got), len(want))
			}
		})
	}
}
