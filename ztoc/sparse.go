package ztoc

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// SparseMapRecord is the PAX record under which spanpull keeps the data
// map of a GNU sparse file: "offset,length,offset,length,..." in logical
// file offsets, the fragments stored back to back from the entry's
// UncompressedOffset. SOCI has no place for sparse maps (it cannot index
// such layers at all); the record rides in the zTOC's PAX record list.
const SparseMapRecord = "SPANPULL.sparse.map"

// Fragment is a run of a file's bytes that is stored in the tar stream.
type Fragment struct {
	// Offset is the position of the run in the file.
	Offset int64
	// Length is the number of bytes in the run.
	Length int64
	// StreamOffset is where the run starts in the uncompressed tar stream.
	StreamOffset int64
}

// Fragments returns where a regular file's bytes are stored: one fragment
// for an ordinary file, the data map for a sparse one (holes read as zeros).
func (f *FileMetadata) Fragments() ([]Fragment, error) {
	m, ok := f.PAXRecords[SparseMapRecord]
	if !ok {
		if f.UncompressedSize == 0 {
			return nil, nil
		}
		return []Fragment{{Offset: 0, Length: f.UncompressedSize, StreamOffset: f.UncompressedOffset}}, nil
	}
	nums, err := parseSparseList(m)
	if err != nil {
		return nil, fmt.Errorf("%s: sparse map: %w", f.Name, err)
	}
	frags := make([]Fragment, 0, len(nums)/2)
	stream, end := f.UncompressedOffset, int64(0)
	for i := 0; i < len(nums); i += 2 {
		off, n := nums[i], nums[i+1]
		if off < end || n < 0 || off > f.UncompressedSize || n > f.UncompressedSize-off {
			return nil, fmt.Errorf("%s: sparse map entry %d (%d+%d) is out of order or past the file size %d", f.Name, i/2, off, n, f.UncompressedSize)
		}
		if n > 0 {
			frags = append(frags, Fragment{Offset: off, Length: n, StreamOffset: stream})
		}
		stream += n
		end = off + n
	}
	return frags, nil
}

// StoredSize returns how many bytes of the tar stream hold the entry's data.
func (f *FileMetadata) StoredSize() (int64, error) {
	if f.Type != TypeReg {
		return 0, nil
	}
	if _, ok := f.PAXRecords[SparseMapRecord]; !ok {
		return f.UncompressedSize, nil
	}
	frags, err := f.Fragments()
	if err != nil {
		return 0, err
	}
	var n int64
	for _, fr := range frags {
		n += fr.Length
	}
	return n, nil
}

func parseSparseList(s string) ([]int64, error) {
	if s == "" {
		return nil, nil
	}
	parts := strings.Split(s, ",")
	if len(parts)%2 != 0 {
		return nil, fmt.Errorf("odd number of values (%d)", len(parts))
	}
	nums := make([]int64, len(parts))
	for i, p := range parts {
		n, err := strconv.ParseInt(p, 10, 64)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad value %q", p)
		}
		nums[i] = n
	}
	return nums, nil
}

func formatSparseList(nums []int64) string {
	var b strings.Builder
	for i, n := range nums {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(n, 10))
	}
	return b.String()
}

// ReadFileAt reads the bytes of regular file f at offset off into p,
// taking stored runs from readStream (a reader of the uncompressed tar
// stream) and zeros for the holes of a sparse file.
func ReadFileAt(readStream io.ReaderAt, f *FileMetadata, p []byte, off int64) (int, error) {
	if off >= f.UncompressedSize {
		return 0, io.EOF
	}
	frags, err := f.Fragments()
	if err != nil {
		return 0, err
	}
	asked := len(p)
	want := min(int64(len(p)), f.UncompressedSize-off)
	p = p[:want]
	clear(p)
	for _, fr := range frags {
		lo, hi := max(fr.Offset, off), min(fr.Offset+fr.Length, off+want)
		if lo >= hi {
			continue
		}
		if n, err := readStream.ReadAt(p[lo-off:hi-off], fr.StreamOffset+lo-fr.Offset); int64(n) < hi-lo {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, fmt.Errorf("%s: read bytes %d-%d: %w", f.Name, lo, hi-1, err)
		}
	}
	if int(want) < asked {
		return int(want), io.EOF
	}
	return int(want), nil
}

// GNU sparse formats, as GNU tar writes them.
const (
	blockSize           = 512
	oldGNUSparseOffset  = 386 // 4 entries of offset[12] numbytes[12]
	oldGNUIsExtended    = 482
	oldGNURealSize      = 483
	extSparseEntries    = 21
	extIsExtended       = 504
	paxGNUSparseMap     = "GNU.sparse.map"
	paxGNUSparseMajor   = "GNU.sparse.major"
	paxGNUSparseMinor   = "GNU.sparse.minor"
	paxGNUSparseSize    = "GNU.sparse.size"
	paxGNUSparseRealSiz = "GNU.sparse.realsize"
)

// isSparse reports whether archive/tar decoded hdr as a GNU sparse file.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	r := hdr.PAXRecords
	return r[paxGNUSparseMap] != "" || r[paxGNUSparseMajor] != "" || r[paxGNUSparseSize] != "" || r[paxGNUSparseRealSiz] != ""
}

// sparseMap recovers the data map of sparse entry hdr. raw holds the
// stream bytes that archive/tar read just before the entry's data (its
// header blocks and, for PAX 1.0, the map blocks); archive/tar keeps the
// map to itself, so it is parsed again here.
func sparseMap(hdr *tar.Header, raw []byte) ([]int64, error) {
	switch {
	case hdr.Typeflag == tar.TypeGNUSparse:
		return oldGNUSparseMap(raw)
	case hdr.PAXRecords[paxGNUSparseMajor] == "1" && hdr.PAXRecords[paxGNUSparseMinor] == "0":
		return pax1SparseMap(raw)
	case hdr.PAXRecords[paxGNUSparseMap] != "":
		return parseSparseList(hdr.PAXRecords[paxGNUSparseMap])
	}
	return nil, errors.New("unknown GNU sparse format")
}

// oldGNUSparseMap finds the old-GNU ('S') header among the last blocks of
// raw, with its extension blocks, and reads the map from them.
func oldGNUSparseMap(raw []byte) ([]int64, error) {
	for k := 1; k*blockSize <= len(raw); k++ {
		hdr := raw[len(raw)-k*blockSize:]
		if hdr[156] != tar.TypeGNUSparse || !validChecksum(hdr[:blockSize]) {
			continue
		}
		var nums []int64
		add := func(entries []byte, n int) error {
			for i := range n {
				e := entries[i*24 : i*24+24]
				if e[0] == 0 {
					continue
				}
				off, err1 := parseNumeric(e[:12])
				cnt, err2 := parseNumeric(e[12:])
				if err1 != nil || err2 != nil {
					return errors.New("bad sparse entry")
				}
				nums = append(nums, off, cnt)
			}
			return nil
		}
		if err := add(hdr[oldGNUSparseOffset:], 4); err != nil {
			return nil, err
		}
		ext, blk := hdr[oldGNUIsExtended] != 0, 1
		for ext && blk < k {
			b := hdr[blk*blockSize : (blk+1)*blockSize]
			if err := add(b, extSparseEntries); err != nil {
				return nil, err
			}
			ext, blk = b[extIsExtended] != 0, blk+1
		}
		if !ext && blk == k {
			return nums, nil
		}
	}
	return nil, errors.New("old GNU sparse header not found before the data")
}

// pax1SparseMap finds the GNU sparse 1.0 map (decimal numbers, one per
// line, padded to a block) that ends right where the data starts.
func pax1SparseMap(raw []byte) ([]int64, error) {
	for k := 1; (k+1)*blockSize <= len(raw); k++ {
		start := len(raw) - k*blockSize
		if !validChecksum(raw[start-blockSize : start]) {
			continue
		}
		text := raw[start:]
		lines := bytes.Split(text, []byte{'\n'})
		if len(lines) < 2 {
			continue
		}
		count, err := strconv.ParseInt(string(lines[0]), 10, 64)
		if err != nil || count < 0 || int64(len(lines)) < 2*count+2 {
			continue
		}
		nums := make([]int64, 0, 2*count)
		used := len(lines[0]) + 1
		for _, l := range lines[1 : 1+2*count] {
			n, err := strconv.ParseInt(string(l), 10, 64)
			if err != nil || n < 0 {
				nums = nil
				break
			}
			nums = append(nums, n)
			used += len(l) + 1
		}
		if nums == nil && count > 0 {
			continue
		}
		if (used+blockSize-1)/blockSize == k {
			return nums, nil
		}
	}
	return nil, errors.New("GNU sparse 1.0 map not found before the data")
}

// validChecksum checks a tar header block's checksum (unsigned sum, as
// POSIX requires; signed sums are accepted too, as archive/tar does).
func validChecksum(b []byte) bool {
	want, err := parseNumeric(b[148:156])
	if err != nil {
		return false
	}
	var unsigned, signed int64
	for i, c := range b[:blockSize] {
		if i >= 148 && i < 156 {
			c = ' '
		}
		unsigned += int64(c)
		signed += int64(int8(c))
	}
	return want == unsigned || want == signed
}

// parseNumeric parses a tar numeric field: octal text, or base-256 when
// the high bit of the first byte is set.
func parseNumeric(b []byte) (int64, error) {
	if len(b) > 0 && b[0]&0x80 != 0 {
		var n int64
		for i, c := range b {
			if i == 0 {
				c &= 0x7f
			}
			if n > (1<<55)-1 {
				return 0, errors.New("base-256 number overflows")
			}
			n = n<<8 | int64(c)
		}
		return n, nil
	}
	s := strings.Trim(string(b), " \x00")
	if s == "" {
		return 0, nil
	}
	return strconv.ParseInt(s, 8, 64)
}
