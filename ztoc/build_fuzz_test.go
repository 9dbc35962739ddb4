package ztoc

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"reflect"
	"testing"
	"time"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// cfFuzzMaxFile bounds the regular files whose contents FuzzBuild compares
// (a sparse header can declare a terabyte of holes in a few bytes).
const cfFuzzMaxFile = 8 << 20

// FuzzBuild feeds arbitrary bytes to Build: it must never panic or hang,
// and when it succeeds its zTOC must agree with an independent reading of
// the input (compress/gzip, then archive/tar): the same entries, and every
// regular file read through the zTOC equal to archive/tar's contents. The
// zTOC must also survive the codec, and its chunks inflate as they say.
func FuzzBuild(f *testing.F) {
	// More seeds live in testdata/fuzz/FuzzBuild.
	f.Add(cfSmallTarForFuzz(), uint16(511))
	f.Fuzz(func(t *testing.T, data []byte, span uint16) {
		spanSize := int64(span) + 1
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		z, _, err := Build(ctx, bytes.NewReader(data), BuildOptions{SpanSize: spanSize})
		if ctx.Err() != nil {
			t.Fatalf("Build hung: %v", err)
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatal("Build failed with an empty error message")
			}
			return
		}

		tarball := data
		if bytes.HasPrefix(data, gzipMagic) {
			if tarball, err = cfBufferedGunzip(data); err != nil {
				t.Fatalf("Build accepted gzip data that compress/gzip rejects: %v", err)
			}
		}
		cfCheckServes(t, "Build", z, data, tarball)
		if _, z2 := roundTrip(t, z); !reflect.DeepEqual(withoutChunks(z), z2) {
			t.Fatal("built zTOC changes through Marshal/Unmarshal")
		}
		cfCheckChunks(t, z, data, tarball)
	})
}

// cfCheckServes checks that z, which accepter (Build or VerifyLayer)
// accepted for the layer blob whose tar stream is tarball, serves exactly
// that layer: the same entries as archive/tar reads, the same file
// contents.
func cfCheckServes(t *testing.T, accepter string, z *Ztoc, blob, tarball []byte) {
	t.Helper()
	entries, end, err := cfReadTarHeaders(tarball)
	if err != nil {
		t.Fatalf("%s accepted a tar that archive/tar rejects: %v", accepter, err)
	}
	if z.UncompressedArchiveSize != end || z.CompressedArchiveSize != int64(len(blob)) {
		t.Fatalf("sizes %d/%d, the layer's %d/%d", z.CompressedArchiveSize, z.UncompressedArchiveSize, len(blob), end)
	}
	if len(z.Files) != len(entries) {
		t.Fatalf("TOC has %d entries, archive/tar reads %d", len(z.Files), len(entries))
	}
	r, err := cfNewReader(z, blob)
	if err != nil {
		t.Fatalf("NewReader on the zTOC %s accepted: %v", accepter, err)
	}
	for i, e := range entries {
		f := &z.Files[i]
		if f.Name != e.name || f.Type != e.typ || f.UncompressedSize != e.size {
			t.Fatalf("entry %d: TOC %q %s %d bytes, archive/tar %q %s %d bytes", i, f.Name, f.Type, f.UncompressedSize, e.name, e.typ, e.size)
		}
		if f.Type != TypeReg || e.size > cfFuzzMaxFile {
			continue
		}
		h := sha256.New()
		if _, err := r.WriteFile(h, f); err != nil {
			t.Fatalf("WriteFile(%q): %v", f.Name, err)
		}
		if !bytes.Equal(h.Sum(nil), e.sum) {
			t.Fatalf("entry %d %q: contents through the zTOC differ from archive/tar's", i, f.Name)
		}
	}
}

// cfFuzzEntry is archive/tar's reading of one entry: name, TOC type, size
// and the SHA-256 of a regular file's contents.
type cfFuzzEntry struct {
	name, typ string
	size      int64
	sum       []byte
}

// cfReadTarHeaders reads a tar stream with archive/tar, hashing the
// contents of regular files up to cfFuzzMaxFile bytes, and returns the
// entries the TOC must hold and the offset past the end-of-archive marker.
func cfReadTarHeaders(tarball []byte) ([]cfFuzzEntry, int64, error) {
	var entries []cfFuzzEntry
	end, err := layertest.Walk(tarball, func(h *tar.Header, _ int64, data io.Reader) error {
		if h.Typeflag == tar.TypeXGlobalHeader {
			return nil
		}
		e := cfFuzzEntry{name: h.Name, typ: cfTocType(h.Typeflag), size: h.Size}
		if e.typ == TypeReg && h.Size <= cfFuzzMaxFile {
			sum := sha256.New()
			if _, err := io.Copy(sum, data); err != nil {
				return err
			}
			e.sum = sum.Sum(nil)
		}
		entries = append(entries, e)
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	return entries, end, nil
}

// cfSmallTarForFuzz is a tiny tar with a directory, a file and a symlink.
func cfSmallTarForFuzz() []byte {
	var buf bytes.Buffer
	if err := layertest.WriteTar(&buf,
		layertest.Dir("d/", 0o755),
		layertest.Reg("d/f", 0o644, []byte("hello")),
		layertest.Entry{Header: tar.Header{Typeflag: tar.TypeSymlink, Name: "d/l", Linkname: "f"}},
	); err != nil {
		panic(err)
	}
	return buf.Bytes()
}
