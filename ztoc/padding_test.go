package ztoc

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"strings"
	"testing"
)

// TestBuildGzipPadding: zero padding after the last member is accepted (as
// gzip readers accept it); a member after padding is not, since the gzip
// readers that pull layers stop at the padding.
func TestBuildGzipPadding(t *testing.T) {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "f", Mode: 0o644, Size: 3, Typeflag: tar.TypeReg})
	tw.Write([]byte("abc"))
	tw.Close()
	member := func(b []byte) []byte {
		var out bytes.Buffer
		zw := gzip.NewWriter(&out)
		zw.Write(b)
		zw.Close()
		return out.Bytes()
	}
	half := tb.Len() / 2
	padded := append(member(tb.Bytes()), make([]byte, 1024)...)
	if _, _, err := Build(context.Background(), bytes.NewReader(padded), BuildOptions{}); err != nil {
		t.Fatalf("trailing zero padding: %v", err)
	}
	split := append(append(member(tb.Bytes()[:half]), make([]byte, 512)...), member(tb.Bytes()[half:])...)
	_, _, err := Build(context.Background(), bytes.NewReader(split), BuildOptions{})
	if err == nil || !strings.Contains(err.Error(), "after zero padding") {
		t.Fatalf("member after padding: err = %v, want an error about data after zero padding", err)
	}
}
