// Package ztoc builds, encodes and reads zTOCs: per-layer indexes that let a
// reader extract any byte range of a gzip (or plain tar) OCI layer by
// fetching and inflating only the span that holds it.
//
// A zTOC is byte-compatible with AWS SOCI's zTOC (flatbuffers v0.9 schema,
// gzip checkpoint blob v1/v2, TarZinfo for tar layers), so indexes built by
// either tool work with the other's runtime.
//
// The package is pure data and algorithms: it does no network I/O, owns no
// files and imports nothing else of spanpull. Callers hand it an io.Reader
// to build a zTOC; to read, they fetch a span's compressed bytes
// themselves (package span does) and hand them to VerifySpan and
// InflateRange.
package ztoc

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Format constants shared with SOCI.
const (
	// Version is the only zTOC format version ever written.
	Version = "0.9"
	// DefaultBuildToolIdentifier is what spanpull writes into the zTOCs it
	// builds. SOCI writes "AWS SOCI CLI v0.2".
	DefaultBuildToolIdentifier = "spanpull v0.1"
	// SOCIBuildToolIdentifier is the identifier written by AWS SOCI's CLI.
	SOCIBuildToolIdentifier = "AWS SOCI CLI v0.2"
	// DefaultSpanSize is the uncompressed distance between checkpoints.
	DefaultSpanSize int64 = 4 << 20
	// WindowSize is the size of the deflate history stored per checkpoint.
	WindowSize = 32768
)

// Compression is the compression of a layer blob, as recorded in the zTOC.
type Compression int8

// The values match SOCI's flatbuffers enum CompressionAlgorithm.
const (
	Gzip         Compression = 1
	Uncompressed Compression = 2
)

func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Uncompressed:
		return "uncompressed"
	}
	return fmt.Sprintf("compression(%d)", int8(c))
}

// SpanID numbers the spans of a layer from 0.
type SpanID int

// Entry types, as SOCI spells them in FileMetadata.type.
const (
	TypeReg      = "reg"
	TypeDir      = "dir"
	TypeSymlink  = "symlink"
	TypeHardlink = "hardlink"
	TypeChar     = "char"
	TypeBlock    = "block"
	TypeFifo     = "fifo"
)

// FileMetadata is one tar entry of the layer, in archive order.
type FileMetadata struct {
	// Name is the raw tar path as Go's archive/tar returns it (long names
	// and PAX path applied; not cleaned; directories keep a trailing '/').
	Name string
	// Type is one of the Type* constants.
	Type string
	// UncompressedOffset is where the entry's data starts in the
	// uncompressed tar stream (just past its header blocks).
	UncompressedOffset int64
	// UncompressedSize is the logical size of a regular file (0 otherwise).
	UncompressedSize int64
	// Linkname is the target of a symlink or hardlink.
	Linkname     string
	Mode         int64
	UID, GID     uint32
	Uname, Gname string
	// ModTime is the entry's modification time (UTC); the zero Time when
	// the tar time cannot be represented (year outside 0-9999).
	ModTime            time.Time
	Devmajor, Devminor int64
	// PAXRecords holds every raw PAX record of the entry. SOCI stores them
	// in a field named "xattrs"; Xattrs() extracts the real xattrs.
	PAXRecords map[string]string
}

// xattrPAXPrefix marks a PAX record that carries an extended attribute.
const xattrPAXPrefix = "SCHILY.xattr."

// Xattrs returns the entry's extended attributes (PAX records named
// SCHILY.xattr.<name>), keyed by attribute name.
func (f *FileMetadata) Xattrs() map[string]string {
	var x map[string]string
	for k, v := range f.PAXRecords {
		if name, ok := strings.CutPrefix(k, xattrPAXPrefix); ok {
			if x == nil {
				x = make(map[string]string)
			}
			x[name] = v
		}
	}
	return x
}

// Ztoc is a decoded zTOC: the tar table of contents plus what is needed to
// restart decompression at each span.
type Ztoc struct {
	Version                 string
	BuildToolIdentifier     string
	CompressedArchiveSize   int64
	UncompressedArchiveSize int64
	// Files is the TOC, one entry per tar entry, in archive order.
	Files []FileMetadata
	CompressionInfo
	// Chunks, when not nil, holds the chunks of each span (indexed by
	// SpanID). It is not part of SOCI's encoding (Marshal ignores it).
	Chunks [][]Chunk

	// windowless, set on a zTOC decoded from a pack head, holds its gzip
	// checkpoints without their windows (which live in the pack's windows
	// blob); Checkpoints is then nil. Spans reads it, Marshal refuses it.
	windowless *GzipZinfo
	// windows, set by PackHead.WithWindowSource on a windowless zTOC,
	// gives VerifyLayer each checkpoint's window.
	windows func(SpanID) ([]byte, error)
}

// CompressionInfo says how to restart decompression at each span and how to
// verify each span's compressed bytes.
type CompressionInfo struct {
	Algorithm Compression
	// MaxSpanID is the number of spans minus one.
	MaxSpanID SpanID
	// SpanDigests holds the SHA-256 of each span's compressed bytes.
	SpanDigests []digest.Digest
	// Checkpoints is the opaque checkpoint blob: the gzip zinfo layout for
	// gzip layers, a TarZinfo flatbuffer for tar layers. Use Spans to read it.
	Checkpoints []byte
}

// Span is where one span lives in the compressed and uncompressed streams.
type Span struct {
	ID SpanID
	// CompressedStart and CompressedEnd bound the span's compressed bytes
	// (the range that SpanDigests[ID] covers). When Bits > 0 the first byte
	// is shared with the previous span.
	CompressedStart, CompressedEnd int64
	// UncompressedStart and UncompressedEnd bound the bytes the span inflates to.
	UncompressedStart, UncompressedEnd int64
	// Bits is the number (0-7) of high bits of the byte at CompressedStart
	// that belong to this span (gzip only).
	Bits uint8
	// Window is the 32 KiB of uncompressed data preceding
	// UncompressedStart (gzip only). It aliases the checkpoint blob.
	Window []byte
}

// Size returns the length of the span's compressed bytes.
func (s Span) Size() int64 { return s.CompressedEnd - s.CompressedStart }

// NumSpans returns the number of spans in the layer.
func (z *Ztoc) NumSpans() int { return int(z.MaxSpanID) + 1 }

// SpanForOffset returns the span holding uncompressed offset off, using the
// span table spans (from Spans). It returns false when off is outside the
// archive.
func SpanForOffset(spans []Span, off int64) (SpanID, bool) {
	i := sort.Search(len(spans), func(i int) bool { return spans[i].UncompressedEnd > off })
	if i == len(spans) || off < spans[i].UncompressedStart {
		return 0, false
	}
	return spans[i].ID, true
}
