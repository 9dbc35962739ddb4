package ztoc

import (
	"bytes"
	"compress/gzip"
	"context"
	"strings"
	"testing"

	"github.com/spanpull/spanpull/internal/testutil/layertest"
)

// TestBuildGzipPadding: zero padding after the last member is accepted (as
// gzip readers accept it); a member after padding is not, since the gzip
// readers that pull layers stop at the padding.
func TestBuildGzipPadding(t *testing.T) {
	tb := layertest.Tar(t, layertest.Reg("f", 0o644, []byte("abc")))
	member := func(b []byte) []byte { return layertest.Gzip(t, b, gzip.DefaultCompression) }
	half := len(tb) / 2
	padded := append(member(tb), make([]byte, 1024)...)
	if _, _, err := Build(context.Background(), bytes.NewReader(padded), BuildOptions{}); err != nil {
		t.Fatalf("trailing zero padding: %v", err)
	}
	split := append(append(member(tb[:half]), make([]byte, 512)...), member(tb[half:])...)
	_, _, err := Build(context.Background(), bytes.NewReader(split), BuildOptions{})
	if err == nil || !strings.Contains(err.Error(), "after zero padding") {
		t.Fatalf("member after padding: err = %v, want an error about data after zero padding", err)
	}
}
