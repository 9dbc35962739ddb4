package fusefs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/fdstore"
	"github.com/spanpull/spanpull/internal/testutil/layertest"
	"github.com/spanpull/spanpull/internal/testutil/selfexec"
)

// The takeover test runs servers in processes of their own: the test
// binary, started with these variables set, serves a mount and never runs
// the tests.
const (
	envServe      = "FUSEFS_TEST_SERVE"       // "mount" or "resume"
	envDir        = "FUSEFS_TEST_DIR"         // the mountpoint
	envHolder     = "FUSEFS_TEST_HOLDER"      // the fdstore socket
	envBlockAfter = "FUSEFS_TEST_BLOCK_AFTER" // reads served before one blocks forever
	envBacking    = "FUSEFS_TEST_BACKING"     // directory of backing files, by path
)

func TestMain(m *testing.M) {
	if os.Getenv(envServe) != "" {
		if err := serveHelper(); err != nil {
			fmt.Fprintln(os.Stderr, "fusefs helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// takeoverLayer is the layer of the takeover test: files of random bytes.
func takeoverLayer() ([]byte, map[string][]byte, error) {
	want := map[string][]byte{}
	var es []layertest.Entry
	for i := range 48 {
		name := fmt.Sprintf("f%02d", i)
		want[name] = layertest.Random(uint64(i), 96<<10+i*1000)
		es = append(es, layertest.Reg(name, 0o644, want[name]))
	}
	var buf bytes.Buffer
	if err := layertest.WriteTar(&buf, es...); err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), want, nil
}

// blockingSource serves a tar from memory, but only n reads: the next one
// says "blocked" on stdout (after "ready") and never returns, like a fetch
// from a registry that hangs.
type blockingSource struct {
	b     []byte
	n     int64
	reads atomic.Int64
	ready chan struct{}
}

func (s *blockingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if r := s.reads.Add(1); r > s.n {
		if r == s.n+1 {
			<-s.ready
			fmt.Println("blocked")
		}
		select {}
	}
	return bytes.NewReader(s.b).ReadAt(p, off)
}

// backingDir serves Options.Backing from files named like the layer's.
func backingDir(dir string) func(context.Context, Entry) (*os.File, error) {
	return func(_ context.Context, e Entry) (*os.File, error) {
		f, err := os.Open(filepath.Join(dir, e.Path()))
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return f, err
	}
}

// serveHelper is the main of a helper process: it mounts the takeover
// layer (or takes over its mount from the holder) and serves it until it
// is killed.
func serveHelper() error {
	ctx := context.Background()
	tarball, _, err := takeoverLayer()
	if err != nil {
		return err
	}
	files, err := tocOf(tarball)
	if err != nil {
		return err
	}
	tree, err := NewTree(Files(files), nil)
	if err != nil {
		return err
	}
	n, _ := strconv.ParseInt(os.Getenv(envBlockAfter), 10, 64)
	opts := Options{}
	if d := os.Getenv(envBacking); d != "" {
		opts.Backing = backingDir(d)
	}
	src := &blockingSource{b: tarball, n: n, ready: make(chan struct{})}
	root, err := NewRoot(tree, src, opts)
	if err != nil {
		return err
	}
	holder, err := fdstore.Dial(ctx, os.Getenv(envHolder))
	if err != nil {
		return err
	}
	dir := os.Getenv(envDir)
	switch os.Getenv(envServe) {
	case "mount":
		srv, err := Mount(ctx, dir, root, MountOptions{})
		if err != nil {
			return err
		}
		h, err := srv.Handoff()
		if err != nil {
			return err
		}
		if err := holder.Put(ctx, dir, h.State, h.Files()...); err != nil {
			return err
		}
		h.Close()
	case "resume":
		if _, err := resumeFromHolder(ctx, holder, dir, root); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	close(src.ready)
	select {}
}

// resumeFromHolder takes over the mount on dir from what the holder keeps.
func resumeFromHolder(ctx context.Context, holder *fdstore.Client, dir string, root *Root) (*Server, error) {
	es, err := holder.List(ctx)
	if err != nil {
		return nil, err
	}
	defer func() {
		for i := range es {
			es[i].Close()
		}
	}()
	for _, e := range es {
		if e.Key != dir {
			continue
		}
		h, err := HandoffFromFiles(e.Files, e.State)
		if err != nil {
			return nil, err
		}
		return Resume(ctx, dir, h, root, MountOptions{})
	}
	return nil, fmt.Errorf("the holder has nothing for %s", dir)
}

// helper is a serving process of the takeover test.
type helper struct {
	cmd   *exec.Cmd
	lines chan string
}

func startHelper(t *testing.T, mode, dir, holder, backing string, blockAfter int) *helper {
	t.Helper()
	cmd, out := selfexec.Start(t, envServe+"="+mode, envDir+"="+dir, envHolder+"="+holder,
		envBlockAfter+"="+strconv.Itoa(blockAfter), envBacking+"="+backing)
	h := &helper{cmd: cmd, lines: make(chan string, 10)}
	go func() {
		defer close(h.lines)
		s := bufio.NewScanner(out)
		for s.Scan() {
			h.lines <- s.Text()
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	h.expect(t, "ready")
	return h
}

func (h *helper) expect(t *testing.T, line string) {
	t.Helper()
	select {
	case got, ok := <-h.lines:
		if !ok || got != line {
			t.Fatalf("helper %d said %q (open %v), want %q", h.cmd.Process.Pid, got, ok, line)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("helper %d did not say %q", h.cmd.Process.Pid, line)
	}
}

// kill kills the helper with SIGKILL, in the middle of a read it never
// answers.
func (h *helper) kill(t *testing.T) {
	t.Helper()
	h.expect(t, "blocked")
	if err := h.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	h.cmd.Wait()
}

// TestTakeover kills the process serving a mount with SIGKILL twice while
// a program reads the mount, each time in the middle of a read it never
// answers; a new process takes the connection over from the fd holder
// each time (the second time, this test's own). Every read returns the
// right bytes and none fails. A file the kernel reads by passthrough
// stays open across the takeovers, and opening it again afterwards works:
// the new server names the backing file the kernel already uses.
func TestTakeover(t *testing.T) {
	tarball, want, err := takeoverLayer()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	socket := filepath.Join(t.TempDir(), "fd.sock")
	holderCtx, stopHolder := context.WithCancel(ctx)
	holderDone := make(chan error, 1)
	go func() { holderDone <- fdstore.Serve(holderCtx, socket, fdstore.ServeOptions{Grace: time.Minute}) }()
	t.Cleanup(func() {
		stopHolder()
		<-holderDone
	})
	holder, err := dialHolder(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()

	// f47 has a local copy, read by passthrough; f46 is not read until
	// the end.
	backing := t.TempDir()
	if err := os.WriteFile(filepath.Join(backing, "f47"), want["f47"], 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	first := startHelper(t, "mount", mnt, socket, backing, 10)
	pinned, err := os.Open(filepath.Join(mnt, "f47"))
	if err != nil {
		t.Fatal(err)
	}
	defer pinned.Close()
	if _, err := pinned.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	var reads atomic.Int64
	var readErrs []error
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for pass := range 2 {
			for i := range 46 {
				name := fmt.Sprintf("f%02d", i)
				got, err := os.ReadFile(filepath.Join(mnt, name))
				if err == nil && !bytes.Equal(got, want[name]) {
					err = fmt.Errorf("%d bytes differ from the layer's %d", len(got), len(want[name]))
				}
				if err != nil {
					mu.Lock()
					readErrs = append(readErrs, fmt.Errorf("pass %d, %s: %w", pass, name, err))
					mu.Unlock()
				}
				reads.Add(1)
			}
		}
	}()

	first.kill(t)
	second := startHelper(t, "resume", mnt, socket, backing, 0)
	second.kill(t)
	if n := reads.Load(); n >= 2*46 {
		t.Fatalf("the reader finished (%d files) before the last takeover", n)
	}
	tree, err := NewTree(Files(tocFromTar(t, tarball)), nil)
	if err != nil {
		t.Fatal(err)
	}
	src := &recordingSource{b: tarball}
	root, err := NewRoot(tree, src, Options{Backing: backingDir(backing)})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := resumeFromHolder(ctx, holder, mnt, root)
	if err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for _, err := range readErrs {
		t.Error(err)
	}
	if src.reads.Load() == 0 {
		t.Error("the last server read nothing: no read was in flight across the takeovers")
	}

	// Passthrough reads go to the backing file itself: change it, and
	// both files see the change, the one opened before the takeovers and
	// the one opened after (which the kernel would refuse to open if the
	// new server named another backing file).
	marker := bytes.Repeat([]byte("P"), len(want["f47"]))
	if err := os.WriteFile(filepath.Join(backing, "f47"), marker, 0o644); err != nil {
		t.Fatal(err)
	}
	again, err := os.Open(filepath.Join(mnt, "f47"))
	if err != nil {
		t.Fatalf("open f47 again after the takeovers: %v", err)
	}
	for _, f := range []*os.File{pinned, again} {
		if got, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<30)); err != nil || !bytes.Equal(got, marker) {
			t.Errorf("f47, opened %s the takeovers, is not read from its backing file: %d bytes, %v",
				map[*os.File]string{pinned: "before", again: "after"}[f], len(got), err)
		}
	}
	// f46 gets a local copy only now: the last server registers it.
	if err := os.WriteFile(filepath.Join(backing, "f46"), marker[:len(want["f46"])], 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "f46")); err != nil || !bytes.Equal(got, marker[:len(want["f46"])]) {
		t.Errorf("f46 is not read from the backing file the resumed server registered: %d bytes, %v", len(got), err)
	}
	pinned.Close()
	again.Close()
	if err := srv.Unmount(); err != nil {
		t.Error(err)
	}
}

// recordingSource serves a tar from memory and counts its reads.
type recordingSource struct {
	b     []byte
	reads atomic.Int64
}

func (s *recordingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.reads.Add(1)
	return bytes.NewReader(s.b).ReadAt(p, off)
}

// dialHolder connects to the holder on socket once it answers.
func dialHolder(ctx context.Context, socket string) (*fdstore.Client, error) {
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		c, err := fdstore.Dial(ctx, socket)
		if err == nil || time.Since(start) > 10*time.Second {
			return c, err
		}
	}
}
