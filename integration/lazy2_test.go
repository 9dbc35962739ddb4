//go:build linux

package integration

import (
	"testing"

	"github.com/spanpull/spanpull/integration/testenv"
)

// TestLazyPythonContainerd2 is TestLazyPython on containerd 2.2 (built
// once by testenv.Containerd2Binaries, kept off PATH), with the real
// snapshotter daemon and its SOCI resolver. Every image is pulled two
// ways:
//
//   - "snapshotter pull": a client-side pull (containerd's v2 client
//     library, not the transfer service) passing the remote-snapshot
//     labels, as on containerd 1.6;
//   - a plain "ctr image pull --snapshotter spanpull", which on containerd
//     2.x goes through the transfer service: its unpack_config lists
//     spanpull and the proxy plugin exports
//     enable_remote_snapshot_annotations, so the transfer service wraps
//     its handler with snapshotters.AppendInfoHandlerWrapper and Prepare
//     gets the image ref, manifest and layer digest labels the resolver
//     needs to find the SOCI index. That pull is lazy too: the layer blob
//     never reaches containerd's content store (but the zTOC of a SOCI v2
//     image does, see ctrPull).
//
// Either way "ctr run" prints python's output, and an image without an
// index is pulled normally by containerd.
func TestLazyPythonContainerd2(t *testing.T) {
	testenv.RequireRoot(t)
	bins := testenv.Containerd2Binaries(t)
	e := newLazyEnvOn(t, lazyPythonConfig, func(t testing.TB, dir string, c testenv.ContainerdConfig) *testenv.Containerd {
		c.RemoteSnapshotAnnotations = true
		return testenv.StartContainerd2(t, dir, bins, c)
	})
	testLazyPython(t, e, snapshotterPull, ctrPull)
}

// ctrPull is a plain "ctr image pull" (containerd 2: the transfer
// service), which prints no per-layer report. The transfer service fetches
// every manifest of an image index that matches the platform (ctr sets no
// manifest limit), so for a converted (SOCI v2) image it also downloads the
// SOCI index manifest and its zTOCs into containerd's content store, where
// nothing uses them: the snapshotter fetches the zTOC from the registry
// again (2.8 MB for the 64 MB Debian layer).
var ctrPull = lazyPuller{name: "ctr-pull", fetchesIndexManifests: true,
	pull: func(e *lazyEnv, t *testing.T, ref string) string {
		t.Helper()
		e.cd.MustRun(t, "image", "pull", "--plain-http", "--snapshotter", "spanpull", ref)
		return ""
	}}
