package resolver

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// localFiles keeps the regular files of verified layers as local files,
// one per file's data (<dir>/<layer hex>/<data offset>), which the FUSE
// filesystem hands to the kernel for passthrough reads: once a layer is
// complete and verified, reading it costs what reading a local file does.
// Hardlinks share their target's file. The files count toward the cache
// budget: a layer is only unpacked when its files fit.
type localFiles struct {
	dir string

	mu    sync.Mutex
	sizes map[digest.Digest]int64 // bytes of each unpacked layer's files
}

// openLocalFiles opens the files kept under dir, deleting what a crash left
// half written.
func openLocalFiles(dir string) (*localFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f := &localFiles{dir: dir, sizes: make(map[digest.Digest]int64)}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if d.Validate() != nil {
			os.RemoveAll(p) // a partial unpack (its name has a suffix)
			continue
		}
		n, err := dirSize(p)
		if err != nil {
			return nil, err
		}
		f.sizes[d] = n
	}
	return f, nil
}

// dirSize adds up the sizes of the files in dir.
func dirSize(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range ents {
		if info, err := e.Info(); err == nil {
			n += info.Size()
		}
	}
	return n, nil
}

// total is the size of every unpacked layer's files.
func (f *localFiles) total() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var n int64
	for _, s := range f.sizes {
		n += s
	}
	return n
}

// usage is the size of layer's files (0 when it is not unpacked).
func (f *localFiles) usage(layer digest.Digest) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sizes[layer]
}

// open returns the file holding the data that starts at offset off of
// layer's tar stream, or nil when the layer is not unpacked.
func (f *localFiles) open(layer digest.Digest, off int64) (*os.File, error) {
	if f.usage(layer) == 0 {
		return nil, nil
	}
	fh, err := os.Open(filepath.Join(f.dir, layer.Encoded(), strconv.FormatInt(off, 10)))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return fh, err
}

// unpack writes the regular files of layer from blob, its compressed tar
// stream, which must have been verified against the layer. Sparse files
// are left to FUSE reads.
func (f *localFiles) unpack(ctx context.Context, layer digest.Digest, alg ztoc.Compression, blob io.Reader) (err error) {
	final := filepath.Join(f.dir, layer.Encoded())
	tmp := final + ".unpacking" // not a digest: openLocalFiles deletes it
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	stream := blob
	if alg == ztoc.Gzip {
		zr, err := gzip.NewReader(blob)
		if err != nil {
			return fmt.Errorf("unpack layer %s: %w", layer, err)
		}
		defer zr.Close()
		stream = zr
	}
	n, err := writeFiles(ctx, tmp, stream)
	if err != nil {
		return fmt.Errorf("unpack layer %s: %w", layer, err)
	}
	if err := os.RemoveAll(final); err != nil {
		return err
	}
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	f.mu.Lock()
	f.sizes[layer] = n
	f.mu.Unlock()
	return nil
}

// writeFiles writes the data of each regular (non-sparse) file of the tar
// stream r to dir/<data offset> and returns the bytes written.
func writeFiles(ctx context.Context, dir string, r io.Reader) (int64, error) {
	cr := &countingReader{r: r}
	tr := tar.NewReader(cr)
	var total int64
	for {
		if err := ctx.Err(); err != nil {
			return total, err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if hdr.Typeflag != tar.TypeReg || hdr.Size == 0 || isSparseHeader(hdr) {
			continue
		}
		n, err := writeFile(filepath.Join(dir, strconv.FormatInt(cr.n, 10)), tr)
		total += n
		if err != nil {
			return total, err
		}
	}
}

// isSparseHeader reports a GNU sparse file (old GNU or PAX formats).
func isSparseHeader(h *tar.Header) bool {
	if h.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range h.PAXRecords {
		if len(k) > 11 && k[:11] == "GNU.sparse." {
			return true
		}
	}
	return false
}

// writeFile copies r to a new file name, readable by its owner only.
func writeFile(name string, r io.Reader) (int64, error) {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return n, err
}

// remove deletes layer's files.
func (f *localFiles) remove(layer digest.Digest) error {
	f.mu.Lock()
	delete(f.sizes, layer)
	f.mu.Unlock()
	return os.RemoveAll(filepath.Join(f.dir, layer.Encoded()))
}

// countingReader counts the bytes read through it: right after archive/tar
// returns a header, the count is the entry's data offset, as the TOC
// records it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
