//go:build linux

package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/integration/testenv"
	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/ztoc"
)

// The trust tests (README "Trust"): a SOCI index comes from wherever it
// was found, not from the image, so a lazy layer may serve only what the
// layer itself holds. Each test publishes a forged index for a copy of the
// Debian + python3 image (same layer, another manifest), pulls the copy
// lazily, reads through containers and through the mount, and then pulls
// the original image with its genuine index: containerd reuses the
// snapshot committed for the forged copy (same chain ID), so the original
// reads correct bytes only because the daemon quarantined the layer and
// repaired it from the layer itself.

// genuine is the Debian layer's zTOC as our builder makes it.
var genuine struct {
	once sync.Once
	z    *ztoc.Ztoc
	err  error
}

// genuineZtoc builds (once) the zTOC of the Debian layer blob.
func genuineZtoc(t *testing.T, blob []byte) *ztoc.Ztoc {
	t.Helper()
	genuine.once.Do(func() {
		genuine.z, _, genuine.err = ztoc.Build(context.Background(), bytes.NewReader(blob), ztoc.BuildOptions{})
	})
	if genuine.err != nil {
		t.Fatal(genuine.err)
	}
	return genuine.z
}

// trustEnv is a lazyEnv holding the Debian image as repo:src and its
// genuine SOCI-enabled form as repo:soci ("indexer convert").
type trustEnv struct {
	*lazyEnv
	repo   string
	z      *ztoc.Ztoc // genuine
	src    ocispec.Manifest
	legit  string
	hashes map[string]string // genuine "kind value" per path, memoized
}

// newTrustEnv starts a lazyEnv with config and publishes the original
// image and its genuine index.
func newTrustEnv(t *testing.T, config, repo string) *trustEnv {
	t.Helper()
	e := &trustEnv{lazyEnv: newLazyEnv(t, config), repo: repo, hashes: map[string]string{}}
	e.z = genuineZtoc(t, e.layer.Blob)
	src, _ := e.pushPython(t, repo, "src")
	e.src = e.fetchManifest(t, repo, "src")
	e.legit = e.reg.Addr + "/" + repo + ":soci"
	e.indexer(t, "convert", src, e.legit)
	return e
}

// entry returns the genuine TOC entry at path (the last one, tar
// semantics), or nil.
func (e *trustEnv) entry(path string) *ztoc.FileMetadata {
	var f *ztoc.FileMetadata
	for i := range e.z.Files {
		if ztoc.CleanPath(e.z.Files[i].Name) == path {
			f = &e.z.Files[i]
		}
	}
	return f
}

// want is what reading path gives on the genuine layer: "sha256 HEX" for
// a regular file, "link TARGET" for a symlink, "absent" when it does not
// exist (other types are not probed).
func (e *trustEnv) want(t *testing.T, path string) string {
	t.Helper()
	if w, ok := e.hashes[path]; ok {
		return w
	}
	w := "absent"
	if f := e.entry(path); f != nil {
		switch f.Type {
		case ztoc.TypeSymlink:
			w = "link " + f.Linkname
		case ztoc.TypeReg, ztoc.TypeHardlink:
			data, err := e.z.Lookup(path)
			if err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(fileBytes(t, e.z, e.layer.Blob, *data))
			w = "sha256 " + hex.EncodeToString(sum[:])
		default:
			t.Fatalf("probe of %s, a %s", path, f.Type)
		}
	}
	e.hashes[path] = w
	return w
}

// observe reads path below root as a container would (lstat, then
// readlink or the whole file) and says what it got as want does; err is
// the errno of a failed read ("absent" for ENOENT).
func observe(root, path string) (string, error) {
	p := filepath.Join(root, path)
	st, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return "absent", nil
	}
	if err != nil {
		return "", err
	}
	if st.Mode()&os.ModeSymlink != 0 {
		target, err := os.Readlink(p)
		if err != nil {
			return "", err
		}
		return "link " + target, nil
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return "sha256 " + hex.EncodeToString(sum[:]), nil
}

// probeScript is observe in python, for containers: one line per path
// argument, "PATH KIND VALUE", KIND one of sha256, link, absent, error.
const probeScript = `import hashlib, os, sys
for p in sys.argv[1:]:
    try:
        if os.path.islink(p):
            print(p, "link", os.readlink(p))
        else:
            print(p, "sha256", hashlib.sha256(open(p, "rb").read()).hexdigest())
    except FileNotFoundError:
        print(p, "absent")
    except OSError as e:
        print(p, "error", e.strerror)
`

// probeContainer runs probeScript over paths in a container of ref and
// returns what it printed per path, and the run's error.
func (e *trustEnv) probeContainer(t *testing.T, ref string, paths []string) (map[string]string, error) {
	t.Helper()
	// Unbuffered: a read error may take python down (its own pages fail
	// once the layer is quarantined), and what it printed must be seen.
	args := []string{"python3", "-u", "-c", probeScript}
	for _, p := range paths {
		args = append(args, "/"+p)
	}
	out, err := e.run(ref, 2*time.Minute, args...)
	got := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if p, rest, ok := strings.Cut(line, " "); ok && strings.HasPrefix(p, "/") {
			got[strings.TrimPrefix(p, "/")] = rest
		}
	}
	return got, err
}

// noWrongBytes fails the test if a container's or a direct read returned
// anything but the genuine content: a read may fail (EIO) or find nothing
// (a dropped entry), but what it returns must be right.
func (e *trustEnv) noWrongBytes(t *testing.T, who, path, got string) {
	t.Helper()
	if got == "" || got == "absent" || strings.HasPrefix(got, "error ") {
		return
	}
	if w := e.want(t, path); got != w {
		t.Errorf("%s read %s as %q, the layer has %q: a wrong byte was served", who, path, got, w)
	}
}

// verification returns the spanpull.verified label of the Debian layer's
// snapshot (its chain ID is its diff ID: it is the image's only layer).
func (e *lazyEnv) verification(t *testing.T) string {
	t.Helper()
	out := e.cd.MustRun(t, "snapshots", "--snapshotter", "spanpull", "info", e.layer.DiffID.String())
	var info struct{ Labels map[string]string }
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("ctr snapshots info: %v\n%s", err, out)
	}
	return info.Labels[snapshotter.LabelVerified]
}

// waitVerification polls the snapshot's label until it is state, and
// returns when it first saw it.
func (e *lazyEnv) waitVerification(t *testing.T, state string, timeout time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if got := e.verification(t); got == state {
			return time.Now()
		} else if time.Now().After(deadline) {
			t.Fatalf("the layer's snapshot is %q after %v, want %q", got, timeout, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Daemon log lines of a quarantine and of the repair that follows.
const (
	logQuarantined = "spanpull: layer quarantined"
	logRepaired    = "spanpull: quarantined layer repaired"
)

var logTimeRE = regexp.MustCompile(`time="([^"]+)"`)

// logLines returns the lines of the daemon's log after offset (a length
// of daemonLog) that contain msg.
func (e *trustEnv) logLines(t *testing.T, offset int, msg string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(e.daemonLog(t)[offset:], "\n") {
		if strings.Contains(l, msg) {
			out = append(out, l)
		}
	}
	return out
}

// logTime is the time stamp of a daemon log line.
func logTime(t *testing.T, line string) time.Time {
	t.Helper()
	m := logTimeRE.FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no time in log line %q", line)
	}
	ts, err := time.Parse(time.RFC3339Nano, m[1])
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// checkQuarantine checks the daemon's account of one quarantine since log
// offset logAt: the quarantines metric grew by one from before, one error
// line names the layer, the index and field, and the repair was logged.
// It returns how long the repair took, by the daemon's time stamps.
func (e *trustEnv) checkQuarantine(t *testing.T, before map[string]float64, logAt int, idx digest.Digest, field string) time.Duration {
	t.Helper()
	const series = "spanpull_resolver_quarantines_total"
	if got := e.metrics(t)[series] - before[series]; got != 1 {
		t.Errorf("%s grew by %v, want 1", series, got)
	}
	lines := e.logLines(t, logAt, logQuarantined)
	if len(lines) != 1 {
		t.Fatalf("%d %q lines in the daemon log, want 1:\n%s", len(lines), logQuarantined, strings.Join(lines, "\n"))
	}
	q := lines[0]
	t.Logf("daemon: %s", q)
	for _, want := range []string{"level=error", `layer="` + e.layerDesc.Digest.String() + `"`, `index="` + idx.String() + `"`, field} {
		if !strings.Contains(q, want) {
			t.Errorf("the quarantine line does not name %s", want)
		}
	}
	// The label says verified just before the repair is logged.
	deadline := time.Now().Add(10 * time.Second)
	repaired := e.logLines(t, logAt, logRepaired)
	for ; len(repaired) == 0 && time.Now().Before(deadline); repaired = e.logLines(t, logAt, logRepaired) {
		time.Sleep(50 * time.Millisecond)
	}
	if len(repaired) != 1 {
		t.Fatalf("%d %q lines in the daemon log, want 1", len(repaired), logRepaired)
	}
	return logTime(t, repaired[0]).Sub(logTime(t, q))
}

// checkLegit pulls the original image (its genuine index) into the same
// namespace, where it shares the repaired snapshot, and checks that a
// container of it reads the genuine content of paths, and that the mount
// serves it too.
func (e *trustEnv) checkLegit(t *testing.T, paths []string) {
	t.Helper()
	e.pull(t, e.legit)
	got, err := e.probeContainer(t, e.legit, paths)
	if err != nil {
		t.Fatalf("container of the original image: %v", err)
	}
	mnt := e.lazyMount(t)
	for _, p := range paths {
		w := e.want(t, p)
		if got[p] != w {
			t.Errorf("original image's container read %s as %q, want %q", p, got[p], w)
		}
		if d, err := observe(mnt, p); err != nil || d != w {
			t.Errorf("read %s through the repaired mount: %q (%v), want %q", p, d, err, w)
		}
		if f := e.entry(p); f != nil {
			st, err := os.Lstat(filepath.Join(mnt, p))
			if err != nil || int64(st.Sys().(*syscall.Stat_t).Mode&0o7777) != f.Mode&0o7777 {
				t.Errorf("mode of %s through the repaired mount: %v (%v), want %o", p, st.Mode(), err, f.Mode&0o7777)
			}
		}
	}
}

// removeBoth removes the forged copy and the original image and waits
// until the daemon dropped everything of the layer.
func (e *trustEnv) removeBoth(t *testing.T, forged string) {
	t.Helper()
	e.cd.MustRun(t, "image", "rm", "--sync", forged)
	e.removeImage(t, e.legit)
}

// forgery is one forged index: an edit of the genuine zTOC, how it is
// published, the paths whose reads it affects (the first one is read
// first), and the field the quarantine must name.
type forgery struct {
	name    string
	v2      bool // a SOCI-enabled copy (index v2) instead of a v1 referrer
	pack    bool // also publish the forged zTOC's pack
	edit    func(t *testing.T, e *trustEnv, z *ztoc.Ztoc)
	probes  []string
	field   string
	outcome string // filled in: what the forgery led to
}

// fileIndex returns the index of the last TOC entry named path in z.
func fileIndex(t *testing.T, z *ztoc.Ztoc, path string) int {
	t.Helper()
	for i := len(z.Files) - 1; i >= 0; i-- {
		if ztoc.CleanPath(z.Files[i].Name) == path {
			return i
		}
	}
	t.Fatalf("%s is not in the layer", path)
	return -1
}

// moveOffset maps etc/debian_version to another file's bytes: into the
// data of etc/debconf.conf, the entry before it (the measured attack; a
// zTOC's data offsets must grow from entry to entry, which the bytes of
// the file before allow).
func moveOffset(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
	i := fileIndex(t, z, "etc/debian_version")
	if prev := z.Files[i-1]; ztoc.CleanPath(prev.Name) != "etc/debconf.conf" || prev.UncompressedSize < 1000 {
		t.Fatalf("the entry before etc/debian_version is %s (%d bytes)", prev.Name, prev.UncompressedSize)
	}
	z.Files[i].UncompressedOffset = z.Files[i-1].UncompressedOffset + 640
}

// forgeries are the forged indexes of TestForgedIndexes.
func forgeries() []*forgery {
	return []*forgery{
		{name: "a-offset", edit: moveOffset, probes: []string{"etc/debian_version", "etc/debconf.conf"}, field: "offset"},
		{name: "a-offset-v2-pack", v2: true, pack: true, edit: moveOffset, probes: []string{"etc/debian_version", "etc/debconf.conf"}, field: "offset"},
		{name: "b-size", probes: []string{"etc/debian_version"}, field: "size",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				z.Files[fileIndex(t, z, "etc/debian_version")].UncompressedSize += 1000
			}},
		{name: "c-setuid", probes: []string{"usr/bin/sha256sum"}, field: "mode",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				z.Files[fileIndex(t, z, "usr/bin/sha256sum")].Mode |= 0o4000
			}},
		{name: "d-symlink", probes: []string{"usr/bin/python3"}, field: "linkname",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				z.Files[fileIndex(t, z, "usr/bin/python3")].Linkname = "sha256sum"
			}},
		{name: "e-added", probes: []string{"etc/passwd-", "etc/passwd"}, field: "offset",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				// etc/passwd- after etc/passwd, holding bytes of its data
				// (data offsets must grow from entry to entry).
				i := fileIndex(t, z, "etc/passwd")
				added := z.Files[i]
				added.Name = "./etc/passwd-"
				added.UncompressedOffset += 100
				added.UncompressedSize = 300
				z.Files = append(z.Files[:i+1], append([]ztoc.FileMetadata{added}, z.Files[i+1:]...)...)
			}},
		{name: "f-dropped", probes: []string{"etc/issue.net", "etc/issue"}, field: "name",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				i := fileIndex(t, z, "etc/issue")
				z.Files = append(z.Files[:i], z.Files[i+1:]...)
			}},
		{name: "g-span-digest", probes: []string{"etc/passwd"}, field: "span digest",
			edit: func(t *testing.T, _ *trustEnv, z *ztoc.Ztoc) {
				spans, err := z.Spans()
				if err != nil {
					t.Fatal(err)
				}
				id, _ := ztoc.SpanForOffset(spans, z.Files[fileIndex(t, z, "etc/passwd")].UncompressedOffset)
				last := z.MaxSpanID
				z.SpanDigests[id], z.SpanDigests[last] = z.SpanDigests[last], z.SpanDigests[id]
			}},
	}
}

// TestForgedIndexes publishes forged indexes (a)-(g) for copies of the
// Debian image, background fill off: a moved data offset, a changed
// size, a setuid mode, a retargeted symlink, an added and a dropped
// entry, swapped span digests; (a) also as a SOCI-enabled copy (index v2)
// with a forged pack. For each: no container and no read through the
// mount gets a wrong byte, the layer is quarantined (metric, one error
// line naming layer, index and field) and repaired, and the original
// image, pulled afterwards onto the same snapshot, reads correct bytes.
func TestForgedIndexes(t *testing.T) {
	e := newTrustEnv(t, lazyPythonConfig, "py/forge")
	cases := forgeries()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { e.forged(t, c) })
	}
	for _, c := range cases {
		t.Logf("%-18s %s", c.name, c.outcome)
	}
}

// publish publishes the forged index of c for a copy of the original
// image as repo:tag, and returns the copy's reference and the index.
func (e *trustEnv) publish(t *testing.T, c *forgery, tag string, edit func(*ztoc.Ztoc)) (string, ocispec.Descriptor) {
	t.Helper()
	fz, fb := testenv.ForgeZtoc(t, e.z, edit)
	ix := testenv.SOCIIndex{Layer: e.layerDesc, Ztoc: fz, Encoded: fb, Pack: c.pack}
	mb, md := testenv.PushManifestCopy(t, e.reg.Addr, e.repo, tag, e.src)
	if c.v2 {
		return testenv.PublishV2(t, e.reg.Addr, e.repo, tag+"-soci", mb, ix)
	}
	return e.reg.Addr + "/" + e.repo + ":" + tag, testenv.PublishV1(t, e.reg.Addr, e.repo, md, ix)
}

// forged runs one forgery: publish, pull lazily, read through a
// container and the mount, check the quarantine and repair, then the
// original image.
func (e *trustEnv) forged(t *testing.T, c *forgery) {
	start := time.Now()
	ref, idx := e.publish(t, c, c.name, func(z *ztoc.Ztoc) { c.edit(t, e, z) })
	t.Cleanup(func() {
		if t.Failed() { // leave no shared snapshot to the next case
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_ = e.cd.RemoveContainers(ctx)
			_, _ = e.cd.Run(ctx, "image", "rm", "--sync", ref, e.legit)
		}
	})
	out := e.pull(t, ref)
	if hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "pulled", "by", "containerd") {
		c.outcome = "index refused: pulled normally"
		e.checkLegit(t, c.probes)
		e.removeBoth(t, ref)
		return
	}
	if !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("pull of the forged copy is neither lazy nor a normal pull:\n%s", out)
	}
	before, logAt := e.metrics(t), len(e.daemonLog(t))
	got, runErr := e.probeContainer(t, ref, c.probes)
	for _, p := range c.probes {
		e.noWrongBytes(t, "forged image's container", p, got[p])
	}
	mnt := e.lazyMount(t)
	var direct []string
	for _, p := range c.probes {
		d, err := observe(mnt, p)
		if err != nil && !errors.Is(err, syscall.EIO) {
			t.Errorf("read %s through the mount: %v, want EIO or the genuine content", p, err)
		}
		e.noWrongBytes(t, "a direct read", p, d)
		direct = append(direct, fmt.Sprintf("%s: %s", p, orErr(d, err)))
	}
	e.waitVerification(t, "verified", 2*time.Minute)
	repair := e.checkQuarantine(t, before, logAt, idx.Digest, c.field)
	c.outcome = fmt.Sprintf("container %s; direct reads %s; quarantined (%s) and repaired in %v",
		containerOutcome(got, runErr), strings.Join(direct, ", "), c.field, repair.Round(time.Millisecond))
	e.checkLegit(t, c.probes)
	e.removeBoth(t, ref)
	t.Logf("%s: %s (%v)", c.name, c.outcome, time.Since(start).Round(time.Second))
}

// orErr is what a direct read gave: its content's kind or its error.
func orErr(got string, err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	if err != nil {
		return err.Error()
	}
	if kind, _, ok := strings.Cut(got, " "); ok {
		return "genuine " + kind
	}
	return got
}

// containerOutcome sums up a probe container's run.
func containerOutcome(got map[string]string, err error) string {
	if err != nil && len(got) == 0 {
		return "printed nothing (" + lastLine(err.Error()) + ")"
	}
	var parts []string
	for p, v := range got {
		if !strings.HasPrefix(v, "error ") {
			v, _, _ = strings.Cut(v, " ")
			v = "genuine " + v
		}
		parts = append(parts, p+": "+v)
	}
	sort.Strings(parts)
	return "read " + strings.Join(parts, ", ")
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestForgedWindow publishes a forged index (h) whose checkpoint window of
// one span is another checkpoint's: span digests cover compressed bytes
// only, so the lie shows only once the layer is complete and verified as
// a whole. With the background fill on and nothing read, the layer's
// snapshot must go quarantined, then verified once repaired, and the
// original image, pulled afterwards onto it, reads the span's files
// right.
func TestForgedWindow(t *testing.T) {
	e := newTrustEnv(t, "[remote]\nfill_delay_seconds = 0\nfill_rate_bytes = 1073741824\n", "py/window")
	spans, err := e.z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	byspan := spanFiles(e.z, spans)
	k := ztoc.SpanID(len(spans) / 2)
	for len(byspan[k]) < 2 {
		k++
	}
	var probes []string
	for _, f := range byspan[k][:2] {
		probes = append(probes, ztoc.CleanPath(f.Name))
	}
	c := &forgery{name: "h-window", probes: probes, field: "window"}
	before, logAt := e.metrics(t), len(e.daemonLog(t))
	start := time.Now()
	ref, idx := e.publish(t, c, c.name, func(z *ztoc.Ztoc) {
		zi, err := ztoc.UnmarshalGzipZinfo(z.Checkpoints)
		if err != nil {
			t.Fatal(err)
		}
		zi.Checkpoints[k].Window = zi.Checkpoints[k+1].Window
		if z.Checkpoints, err = ztoc.MarshalGzipZinfo(zi); err != nil {
			t.Fatal(err)
		}
	})
	if out := e.pull(t, ref); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("the forged copy is not lazy:\n%s", out)
	}
	pulled := time.Now()
	quarantined := e.waitVerification(t, "quarantined", 3*time.Minute)
	verified := e.waitVerification(t, "verified", 2*time.Minute)
	repair := e.checkQuarantine(t, before, logAt, idx.Digest, c.field)
	t.Logf("span %d's window forged (files %v): quarantined %v after the pull, verified %v later (repair by the daemon's log: %v)",
		k, probes, quarantined.Sub(pulled).Round(time.Millisecond), verified.Sub(quarantined).Round(time.Millisecond), repair.Round(time.Millisecond))
	e.checkLegit(t, probes)
	e.removeBoth(t, ref)
	t.Logf("h-window: %v", time.Since(start).Round(time.Second))
}

// TestIndexSources runs a daemon that trusts only SOCI indexes v2
// ([remote] index_sources = ["v2"]): an image whose index is a v1
// referrer is pulled normally by containerd, with a log line saying why,
// and a SOCI-enabled image (index v2) is lazy. Both run.
func TestIndexSources(t *testing.T) {
	e := newLazyEnv(t, "[remote]\nfill_rate_bytes = -1\nindex_sources = [\"v2\"]\n")
	src, _ := e.pushPython(t, "py/sources", "src")
	e.indexer(t, "create", src)

	before, logAt := e.metrics(t), len(e.daemonLog(t))
	out := e.pull(t, src)
	if !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "pulled", "by", "containerd") {
		t.Fatalf("the image with a v1 index only was not pulled normally:\n%s", out)
	}
	var why string
	for _, l := range strings.Split(e.daemonLog(t)[logAt:], "\n") {
		if strings.Contains(l, "image is not lazy") && strings.Contains(l, "py/sources:src") {
			why = l
		}
	}
	if why == "" {
		t.Fatal("the daemon logged no reason for pulling the v1-indexed image normally")
	}
	t.Logf("daemon: %s", why)
	const series = `spanpull_resolver_fallbacks_total{reason="no_index"}`
	if got := e.metrics(t)[series] - before[series]; got != 1 {
		t.Errorf("%s grew by %v, want 1", series, got)
	}
	if ms := e.fuseMounts(t); len(ms) != 0 {
		t.Fatalf("FUSE mounts for an image with a v1 index only: %v", ms)
	}
	e.runPython(t, src)
	e.removeImage(t, src)

	dst := e.reg.Addr + "/py/sources:soci"
	e.indexer(t, "convert", src, dst)
	if out := e.pull(t, dst); !hasLine(out, "layer", "1", e.layerDesc.Digest.String(), "lazy") {
		t.Fatalf("the SOCI-enabled image (v2) is not lazy:\n%s", out)
	}
	e.lazyMount(t)
	e.runPython(t, dst)
	e.removeImage(t, dst)
}
