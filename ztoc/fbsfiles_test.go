package ztoc

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// TestDecodeFiles checks that DecodeFiles yields exactly Unmarshal's Files
// and UnmarshalInfo everything else, for SOCI's goldens and our own
// zTOCs.
func TestDecodeFiles(t *testing.T) {
	bufs := map[string][]byte{}
	for _, g := range goldens {
		bufs[g.File] = readGolden(t, g.File)
	}
	for name, z := range map[string]*Ztoc{"gzip": syntheticGzip(t, false), "tar": syntheticTar()} {
		b := mustMarshal(t, z)
		bufs[name] = b
	}
	for name, b := range bufs {
		t.Run(name, func(t *testing.T) {
			want, err := Unmarshal(b)
			if err != nil {
				t.Fatal(err)
			}
			var got []FileMetadata
			if err := DecodeFiles(b, func(f *FileMetadata) error {
				got = append(got, *f)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want.Files) {
				t.Errorf("DecodeFiles yields %d entries that differ from Unmarshal's %d", len(got), len(want.Files))
			}
			info, err := UnmarshalInfo(b)
			if err != nil {
				t.Fatal(err)
			}
			want.Files = nil
			if !reflect.DeepEqual(info, want) {
				t.Errorf("UnmarshalInfo = %+v, want %+v", info, want)
			}
		})
	}
}

// TestDecodeFilesErrors checks that entries are checked before the caller
// sees them and that the caller's error ends the walk.
func TestDecodeFilesErrors(t *testing.T) {
	z := syntheticGzip(t, false)
	b := mustMarshal(t, z)
	stop := errors.New("stop")
	n := 0
	if err := DecodeFiles(b, func(*FileMetadata) error { n++; return stop }); err != stop || n != 1 {
		t.Errorf("DecodeFiles with a failing fn = %v after %d entries, want stop after 1", err, n)
	}

	unordered := syntheticGzip(t, false)
	unordered.Files[2].UncompressedOffset = 10
	badType := syntheticGzip(t, false)
	badType.Files[3].Type = "sparse"
	outside := syntheticGzip(t, false)
	outside.Files[1].UncompressedSize = 1 << 40
	for name, tc := range map[string]struct {
		z    *Ztoc
		want string
		seen int
	}{
		"order":   {unordered, "does not follow", 2},
		"type":    {badType, "unknown entry type", 3},
		"outside": {outside, "past the end", 1},
	} {
		b, err := encode(tc.z)
		if err != nil {
			t.Fatal(err)
		}
		seen := 0
		err = DecodeFiles(b, func(*FileMetadata) error { seen++; return nil })
		if err == nil || !strings.Contains(err.Error(), tc.want) || seen != tc.seen {
			t.Errorf("%s: DecodeFiles = %v after %d entries, want %q after %d", name, err, seen, tc.want, tc.seen)
		}
	}
	if err := DecodeFiles(b[:7], func(*FileMetadata) error { return nil }); err == nil {
		t.Error("DecodeFiles accepted a truncated buffer")
	}
	if _, err := UnmarshalInfo(b[:7]); err == nil {
		t.Error("UnmarshalInfo accepted a truncated buffer")
	}
}
