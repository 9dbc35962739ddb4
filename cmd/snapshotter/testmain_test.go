package main

import (
	"os"
	"testing"
)

// TestMain lets the test binary stand in for the snapshotter binary where
// the daemon starts a copy of itself (the fd holder: "fd-holder ..."), as
// serve does in these tests.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "fd-holder" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}
