package main

// CLI tests: the cobra root command runs in-process, on layers made by GNU
// tar from a real tree (we run as root: devices, owners, setuid bits).

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/spanpull/spanpull/ztoc"
)

// runCLI runs the indexer with args and returns its stdout and stderr.
func runCLI(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	root := newRootCommand()
	var stdout, stderr bytes.Buffer
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	return stdout.String(), stderr.String(), err
}

// mustCLI runs the indexer and fails the test when it fails.
func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	out, stderr, err := runCLI(t, args...)
	if err != nil {
		t.Fatalf("indexer %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return out
}

// run runs a command and returns its stdout, failing the test on error.
func run(t *testing.T, env []string, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

// makeTree creates root/t with one entry of each kind.
func makeTree(t *testing.T, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(name string) string { return filepath.Join(root, name) }
	must(os.MkdirAll(p("t/sub"), 0o755))
	must(os.MkdirAll(p("t/sticky"), 0o755))
	must(os.Chmod(p("t/sticky"), 0o777|os.ModeSticky))
	must(os.WriteFile(p("t/big.bin"), randomBytes(1, 200000), 0o644))
	must(os.WriteFile(p("t/small.txt"), []byte("hello\n"), 0o644))
	must(os.WriteFile(p("t/empty"), nil, 0o644))
	must(os.WriteFile(p("t/sub/with space"), []byte("space\n"), 0o600))
	must(os.WriteFile(p("t/setuid"), []byte("#!/bin/true\n"), 0o644))
	must(os.Chmod(p("t/setuid"), 0o755|os.ModeSetuid))
	must(os.WriteFile(p("t/nobody-owns"), randomBytes(4, 1234567), 0o644)) // widens tar -tv's owner/size column
	must(os.Lchown(p("t/nobody-owns"), 3000000, 4000000))
	long := "t/sub/" + strings.Repeat("long-name-", 12)
	must(os.WriteFile(p(long), randomBytes(2, 40000), 0o644))
	must(os.Symlink("small.txt", p("t/link")))
	must(os.Link(p("t/big.bin"), p("t/hard")))
	must(syscall.Mknod(p("t/null"), syscall.S_IFCHR|0o666, 1<<8|3))
	must(syscall.Mkfifo(p("t/fifo"), 0o644))
	base := time.Date(2021, 2, 3, 4, 5, 6, 0, time.UTC)
	must(filepath.Walk(p("t"), func(path string, info os.FileInfo, err error) error {
		if err != nil || info.Mode()&os.ModeSymlink != 0 {
			return err
		}
		return os.Chtimes(path, base, base)
	}))
	must(os.Chtimes(p("t/small.txt"), base, time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)))
}

// fixture is a layer on disk, GNU tar's extraction of it, and its zTOC.
type fixture struct {
	dir, layer, ztoc, extracted string
}

// newFixture makes a gzip layer of the tree in the given tar format and
// builds its zTOC with the CLI at a 16 KiB span size.
func newFixture(t *testing.T, format string) fixture {
	t.Helper()
	f := fixture{dir: t.TempDir()}
	src := filepath.Join(f.dir, "src")
	makeTree(t, src)
	tarball := run(t, nil, "tar", "--format="+format, "--sort=name", "-cf", "-", "-C", src, "t")
	cmd := exec.Command("gzip", "-n", "-6", "-c")
	cmd.Stdin = bytes.NewReader(tarball)
	gz, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	f.layer = filepath.Join(f.dir, "layer.tar.gz")
	if err := os.WriteFile(f.layer, gz, 0o644); err != nil {
		t.Fatal(err)
	}
	f.extracted = filepath.Join(f.dir, "x")
	if err := os.Mkdir(f.extracted, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, nil, "tar", "-xpf", f.layer, "-C", f.extracted, "--numeric-owner")
	f.ztoc = filepath.Join(f.dir, "layer.ztoc")
	out := mustCLI(t, "ztoc", "build", "--span-size", "16384", "-o", f.ztoc, f.layer)
	for _, want := range []string{"ztoc:", "layer:", "spans:", "files:"} {
		if !strings.Contains(out, want) {
			t.Errorf("ztoc build output lacks %q:\n%s", want, out)
		}
	}
	return f
}

func loadTestZtoc(t *testing.T, name string) *ztoc.Ztoc {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	z, err := ztoc.Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// TestZtocBuild: the CLI writes the same zTOC as the library, and honours
// --span-size and --build-tool-identifier.
func TestZtocBuild(t *testing.T) {
	f := newFixture(t, "gnu")
	got, err := os.ReadFile(f.ztoc)
	if err != nil {
		t.Fatal(err)
	}
	layer, err := os.Open(f.layer)
	if err != nil {
		t.Fatal(err)
	}
	defer layer.Close()
	z, layerDigest, err := ztoc.Build(context.Background(), layer, ztoc.BuildOptions{SpanSize: 16384})
	if err != nil {
		t.Fatal(err)
	}
	want, err := ztoc.Marshal(z)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("ztoc build wrote other bytes than ztoc.Build + Marshal")
	}
	out := mustCLI(t, "ztoc", "build", "--build-tool-identifier", "AWS SOCI CLI v0.2", "-o", f.ztoc+".soci", f.layer)
	if !strings.Contains(out, layerDigest.String()) {
		t.Errorf("build output does not name the layer digest %s:\n%s", layerDigest, out)
	}
	zs := loadTestZtoc(t, f.ztoc+".soci")
	if zs.BuildToolIdentifier != "AWS SOCI CLI v0.2" {
		t.Errorf("build tool %q", zs.BuildToolIdentifier)
	}
	if s, err := zs.SpanSize(); err != nil || s != ztoc.DefaultSpanSize {
		t.Errorf("default span size %d, %v", s, err)
	}
	// Flags after the positional argument work too.
	mustCLI(t, "ztoc", "build", f.layer, "-o", f.ztoc+".2", "--span-size", "65536")
	if s, _ := loadTestZtoc(t, f.ztoc+".2").SpanSize(); s != 65536 {
		t.Errorf("span size %d, want 65536", s)
	}
}

// TestZtocInfo: the JSON has exactly SOCI's field names and the zTOC's
// values.
func TestZtocInfo(t *testing.T) {
	f := newFixture(t, "gnu")
	out := mustCLI(t, "ztoc", "info", f.ztoc)
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("ztoc info is not JSON: %v\n%s", err, out)
	}
	if got, want := keys(raw), []string{"build_tool", "files", "num_files", "num_multi_span_files", "num_spans", "size", "span_size", "version"}; !reflect.DeepEqual(got, want) {
		t.Errorf("top-level fields %v, want %v", got, want)
	}
	var files []map[string]json.RawMessage
	if err := json.Unmarshal(raw["files"], &files); err != nil {
		t.Fatal(err)
	}
	for _, fi := range files {
		if got, want := keys(fi), []string{"end_span", "filename", "offset", "size", "start_span", "type"}; !reflect.DeepEqual(got, want) {
			t.Fatalf("file fields %v, want %v", got, want)
		}
	}

	// The field names are checked above; the values decode into the
	// command's own type.
	var info ztocInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	z := loadTestZtoc(t, f.ztoc)
	st, err := os.Stat(f.ztoc)
	if err != nil {
		t.Fatal(err)
	}
	spans, err := z.Spans()
	if err != nil {
		t.Fatal(err)
	}
	if info.Version != "0.9" || info.BuildTool != ztoc.DefaultBuildToolIdentifier || info.Size != st.Size() ||
		info.SpanSize != 16384 || info.NumSpans != len(spans) || info.NumFiles != len(z.Files) || len(info.Files) != len(z.Files) {
		t.Fatalf("info summary %+v; zTOC has %d bytes, %d spans, %d files", info, st.Size(), len(spans), len(z.Files))
	}
	// Span of an uncompressed offset, found by a linear scan.
	spanOf := func(off int64) int {
		for _, s := range spans {
			if off >= s.UncompressedStart && off < s.UncompressedEnd {
				return int(s.ID)
			}
		}
		return -1
	}
	multi := 0
	for i, fi := range info.Files {
		e := &z.Files[i]
		start := spanOf(e.UncompressedOffset)
		end := start
		if e.Type == ztoc.TypeReg && e.UncompressedSize > 0 {
			end = spanOf(e.UncompressedOffset + e.UncompressedSize - 1)
		}
		if end != start {
			multi++
		}
		if fi.Filename != e.Name || fi.Offset != e.UncompressedOffset || fi.Size != e.UncompressedSize || fi.Type != e.Type || fi.StartSpan != start || fi.EndSpan != end {
			t.Errorf("file %d: info %+v; want %s %d %d %s spans %d-%d", i, fi, e.Name, e.UncompressedOffset, e.UncompressedSize, e.Type, start, end)
		}
	}
	if multi == 0 || info.NumMultiSpanFiles != multi {
		t.Errorf("num_multi_span_files %d, want %d (> 0)", info.NumMultiSpanFiles, multi)
	}
}

// TestZtocInfoTar: info on the zTOC of an uncompressed layer reports the
// tar span size and fixed spans.
func TestZtocInfoTar(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeTree(t, src)
	layer := filepath.Join(dir, "layer.tar")
	run(t, nil, "tar", "--sort=name", "-cf", layer, "-C", src, "t")
	zt := filepath.Join(dir, "layer.ztoc")
	mustCLI(t, "ztoc", "build", "--span-size", "100000", "-o", zt, layer)
	var info ztocInfo
	if err := json.Unmarshal([]byte(mustCLI(t, "ztoc", "info", zt)), &info); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(layer)
	if err != nil {
		t.Fatal(err)
	}
	if info.SpanSize != 100000 || int64(info.NumSpans) != (st.Size()+99999)/100000 {
		t.Errorf("span size %d, %d spans; want 100000 and %d", info.SpanSize, info.NumSpans, (st.Size()+99999)/100000)
	}
	want := string(run(t, nil, "tar", "-xOf", layer, "t/big.bin"))
	if got := mustCLI(t, "ztoc", "get-file", zt, layer, "t/big.bin"); got != want {
		t.Errorf("get-file from a tar layer: %d bytes, want %d", len(got), len(want))
	}
}

func keys[V any](m map[string]V) []string {
	var k []string
	for key := range m {
		k = append(k, key)
	}
	sort.Strings(k)
	return k
}

// TestZtocLs: ztoc ls prints exactly what tar -tvf prints, in UTC.
func TestZtocLs(t *testing.T) {
	t.Setenv("TZ", "UTC")
	saved := time.Local
	time.Local = time.UTC
	defer func() { time.Local = saved }()
	for _, format := range []string{"gnu", "posix"} {
		t.Run(format, func(t *testing.T) {
			f := newFixture(t, format)
			want := string(run(t, []string{"TZ=UTC"}, "tar", "-tvf", f.layer))
			got := mustCLI(t, "ztoc", "ls", f.ztoc)
			if got != want {
				t.Errorf("ztoc ls differs from tar -tvf:\n--- ztoc ls\n%s--- tar -tvf\n%s", got, want)
			}
			if alias := mustCLI(t, "ztoc", "list", f.ztoc); alias != got {
				t.Error("ztoc list differs from ztoc ls")
			}
		})
	}
}

// TestZtocGetFile: get-file writes a file's bytes, equal to GNU tar's
// extraction, to stdout or to -o.
func TestZtocGetFile(t *testing.T) {
	f := newFixture(t, "posix")
	z := loadTestZtoc(t, f.ztoc)
	n := 0
	for _, e := range z.Files {
		if e.Type != ztoc.TypeReg && e.Type != ztoc.TypeHardlink {
			continue
		}
		n++
		want, err := os.ReadFile(filepath.Join(f.extracted, ztoc.CleanPath(e.Name)))
		if err != nil {
			t.Fatal(err)
		}
		if got := mustCLI(t, "ztoc", "get-file", f.ztoc, f.layer, e.Name); got != string(want) {
			t.Errorf("get-file %s to stdout: %d bytes, want %d", e.Name, len(got), len(want))
		}
		out := filepath.Join(f.dir, "out")
		if stdout := mustCLI(t, "ztoc", "get-file", "-o", out, f.ztoc, f.layer, "/"+e.Name); stdout != "" {
			t.Errorf("get-file -o printed %q", stdout)
		}
		if got, err := os.ReadFile(out); err != nil || !bytes.Equal(got, want) {
			t.Errorf("get-file -o %s: %d bytes, %v; want %d bytes", e.Name, len(got), err, len(want))
		}
	}
	if n < 5 {
		t.Fatalf("only %d files tried", n)
	}
}

// TestZtocErrors: bad arguments and inputs give an error naming the
// problem.
func TestZtocErrors(t *testing.T) {
	f := newFixture(t, "gnu")
	missing := filepath.Join(f.dir, "missing")
	bad := filepath.Join(f.dir, "bad.ztoc")
	if err := os.WriteFile(bad, randomBytes(3, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	// A layer of the same size with other bytes.
	other := filepath.Join(f.dir, "other.tar.gz")
	layer, err := os.ReadFile(f.layer)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(layer)
	for i := 100; i < len(flipped)-100; i += 997 {
		flipped[i] ^= 0x55
	}
	if err := os.WriteFile(other, flipped, 0o644); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(f.dir, "short.tar.gz")
	if err := os.WriteFile(short, layer[:len(layer)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	zst := filepath.Join(f.dir, "layer.tar.zst")
	run(t, nil, "zstd", "-q", "-o", zst, f.layer)

	for _, c := range []struct {
		args []string
		re   string
	}{
		{[]string{"ztoc", "info", missing}, `missing.*no such file`},
		{[]string{"ztoc", "info", bad}, `bad\.ztoc`},
		{[]string{"ztoc", "ls", bad}, `bad\.ztoc`},
		{[]string{"ztoc", "ls", missing}, `no such file`},
		{[]string{"ztoc", "get-file", bad, f.layer, "t/small.txt"}, `bad\.ztoc`},
		{[]string{"ztoc", "get-file", f.ztoc, missing, "t/small.txt"}, `missing.*no such file`},
		{[]string{"ztoc", "get-file", f.ztoc, short, "t/small.txt"}, `does not match`},
		{[]string{"ztoc", "get-file", f.ztoc, other, "t/big.bin"}, `span digest mismatch`},
		{[]string{"ztoc", "get-file", f.ztoc, f.layer, "t/nothere"}, `t/nothere.*no such entry`},
		{[]string{"ztoc", "get-file", f.ztoc, f.layer, "t/sub"}, `not a regular file`},
		{[]string{"ztoc", "get-file", f.ztoc, f.layer}, `accepts 3 arg`},
		{[]string{"ztoc", "build", f.layer}, `-o`},
		{[]string{"ztoc", "build", "-o", filepath.Join(f.dir, "x.ztoc"), missing}, `missing.*no such file`},
		{[]string{"ztoc", "build", "-o", filepath.Join(f.dir, "x.ztoc"), zst}, `unsupported layer compression: zstd`},
		{[]string{"ztoc", "build", "-o", filepath.Join(f.dir, "x.ztoc"), short}, `truncated`},
		{[]string{"ztoc", "build", "--span-size", "abc", "-o", "x", f.layer}, `span-size`},
	} {
		_, _, err := runCLI(t, c.args...)
		if err == nil {
			t.Errorf("indexer %s succeeded; want an error matching %q", strings.Join(c.args, " "), c.re)
			continue
		}
		if !regexp.MustCompile(c.re).MatchString(err.Error()) {
			t.Errorf("indexer %s: error %q does not match %q", strings.Join(c.args, " "), err, c.re)
		}
	}
	// A failed get-file -o leaves no file behind.
	out := filepath.Join(f.dir, "never")
	if _, _, err := runCLI(t, "ztoc", "get-file", "-o", out, f.ztoc, other, "t/big.bin"); err == nil {
		t.Error("get-file from the wrong layer succeeded")
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("get-file -o left %s behind after failing (%v)", out, err)
	}
}

// TestHelp: --help works on every command and shows its usage line.
func TestHelp(t *testing.T) {
	var walk func(c *cobra.Command, path []string)
	n := 0
	walk = func(c *cobra.Command, path []string) {
		if c.Hidden {
			return
		}
		n++
		t.Run(strings.Join(append([]string{"indexer"}, path...), " "), func(t *testing.T) {
			out := mustCLI(t, append(append([]string{}, path...), "--help")...)
			if !strings.Contains(out, "Usage:") || !strings.Contains(out, c.UseLine()) {
				t.Errorf("--help output lacks the usage line %q:\n%s", c.UseLine(), out)
			}
		})
		for _, sub := range c.Commands() {
			walk(sub, append(append([]string{}, path...), sub.Name()))
		}
	}
	root := newRootCommand()
	root.InitDefaultHelpCmd()
	walk(root, nil)
	if n < 6 {
		t.Errorf("only %d commands found", n)
	}
}

// TestUnknownSubcommand: a mistyped subcommand is an error (exit status 1)
// naming it, not a help text with exit status 0.
func TestUnknownSubcommand(t *testing.T) {
	for _, c := range []struct {
		args []string
		name string
	}{
		{[]string{"nosuchcommand"}, "nosuchcommand"},
		{[]string{"ztoc", "nosuchcommand"}, "nosuchcommand"},
		{[]string{"ztoc", "biuld", "layer.tar.gz"}, "biuld"},
	} {
		out, _, err := runCLI(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.name) {
			t.Errorf("indexer %s: error %v, stdout %d bytes; want an unknown-command error naming %q", strings.Join(c.args, " "), err, len(out), c.name)
		}
	}
}

// TestZtocLsQuoting: names with backslashes and control characters are
// listed as tar -tv lists them (its default "escape" quoting: \\, \n, \t,
// \ooo), so that every entry stays on one line.
func TestZtocLsQuoting(t *testing.T) {
	t.Setenv("TZ", "UTC")
	saved := time.Local
	time.Local = time.UTC
	defer func() { time.Local = saved }()
	dir := t.TempDir()
	src := filepath.Join(dir, "src", "q")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{`back\slash`, "new\nline", "tab\there", "ctl\x01x", "plain"} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("tar\\get\nx", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	layer := filepath.Join(dir, "layer.tar")
	run(t, nil, "tar", "--format=posix", "--sort=name", "-cf", layer, "-C", filepath.Dir(src), "q")
	zt := filepath.Join(dir, "layer.ztoc")
	mustCLI(t, "ztoc", "build", "-o", zt, layer)
	want := string(run(t, []string{"TZ=UTC", "LC_ALL=C.UTF-8"}, "tar", "-tvf", layer))
	if got := mustCLI(t, "ztoc", "ls", zt); got != want {
		t.Errorf("ztoc ls differs from tar -tvf:\n--- ztoc ls\n%s--- tar -tvf\n%s", got, want)
	}
}
