package layertest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// DebianLayerPath is where scripts/debian-layer.sh caches the real Debian
// layer (a bookworm root file system with python3, gzip -6) that tests and
// benchmarks read.
const DebianLayerPath = "/var/cache/spanpull/debian-python3.tar.gz"

// debianScript is the script that builds the Debian layer, relative to
// the repository's root.
var debianScript = filepath.Join("scripts", "debian-layer.sh")

// DebianLayer returns DebianLayerPath, building the layer with
// scripts/debian-layer.sh when it is missing.
func DebianLayer(t testing.TB) string {
	t.Helper()
	if st, err := os.Stat(DebianLayerPath); err == nil && st.Size() > 0 {
		return DebianLayerPath
	}
	script, err := findUp(debianScript)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(script, DebianLayerPath).CombinedOutput(); err != nil {
		t.Fatalf("build the Debian layer: %v\n%s", err, out)
	}
	return DebianLayerPath
}

// findUp returns the path of rel below the working directory (a test's
// package directory) or the nearest directory above it that has it.
func findUp(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find %s: %w", rel, err)
	}
	for {
		p := filepath.Join(dir, rel)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no %s in the working directory or above it", rel)
		}
		dir = parent
	}
}
