//go:build linux

package snapshotter

import (
	"os"
	"testing"
)

// requireRoot fails (never skips) a test that needs mount(2): spanpull's
// tests run as root, in CI too.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts overlayfs and must run as root")
	}
}
