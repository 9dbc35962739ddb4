package fdstore

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/internal/syncio"
	"github.com/spanpull/spanpull/internal/testutil/selfexec"
)

// Helper processes of the tests: the test binary runs as one of them when
// an environment variable says so.
const (
	envHolder = "FDSTORE_TEST_HOLDER" // socket path: run a holder
	envGrace  = "FDSTORE_TEST_GRACE"  // its grace period
	envPutter = "FDSTORE_TEST_PUTTER" // socket path: put a memfd, then wait
)

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(envHolder) != "":
		grace, _ := time.ParseDuration(os.Getenv(envGrace))
		if err := Serve(context.Background(), os.Getenv(envHolder), ServeOptions{Grace: grace}); err != nil {
			fmt.Fprintln(os.Stderr, "holder:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case os.Getenv(envPutter) != "":
		if err := putAndWait(os.Getenv(envPutter)); err != nil {
			fmt.Fprintln(os.Stderr, "putter:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// putAndWait puts a memfd holding "from a dead client" and waits to be
// killed.
func putAndWait(socket string) error {
	ctx := context.Background()
	c, err := Dial(ctx, socket)
	if err != nil {
		return err
	}
	f := memfd("from a dead client")
	if err := c.Put(ctx, "k", []byte("state"), f); err != nil {
		return err
	}
	fmt.Println("ready")
	select {}
}

func memfd(content string) *os.File {
	fd, err := unix.MemfdCreate("fdstore-test", unix.MFD_CLOEXEC)
	if err != nil {
		panic(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	if _, err := f.WriteString(content); err != nil {
		panic(err)
	}
	return f
}

func content(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// holderRun is a holder running in the test process.
type holderRun struct {
	socket string
	done   chan struct{} // closed when Serve returns
	err    error         // what it returned
}

// startHolder runs a holder in the test process until the test ends.
func startHolder(t *testing.T, grace time.Duration, logs io.Writer) *holderRun {
	t.Helper()
	h := &holderRun{socket: filepath.Join(t.TempDir(), "fd.sock"), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	l := logrus.New()
	if logs != nil {
		l.SetOutput(logs)
	}
	go func() {
		defer close(h.done)
		h.err = Serve(ctx, h.socket, ServeOptions{Grace: grace, Logger: logrus.NewEntry(l)})
	}()
	t.Cleanup(func() {
		cancel()
		<-h.done
	})
	waitDial(t, h.socket)
	return h
}

func waitDial(t *testing.T, socket string) {
	t.Helper()
	for start := time.Now(); time.Since(start) < 10*time.Second; time.Sleep(10 * time.Millisecond) {
		if c, err := Dial(context.Background(), socket); err == nil {
			c.Close()
			return
		}
	}
	t.Fatalf("no holder on %s", socket)
}

func TestPutListDelete(t *testing.T) {
	socket := startHolder(t, time.Minute, nil).socket
	ctx := context.Background()
	c, err := Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	big := bytes.Repeat([]byte("s"), 3<<20)
	a1, a2, b := memfd("a1"), memfd("a2"), memfd("b")
	for _, put := range []struct {
		key   string
		state []byte
		files []*os.File
	}{{"/mnt/a", []byte("old"), []*os.File{a1}}, {"/mnt/b", big, []*os.File{b, a2}}, {"/mnt/a", []byte("new"), []*os.File{a2, b}}} {
		if err := c.Put(ctx, put.key, put.state, put.files...); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []*os.File{a1, a2, b} {
		f.Close() // the holder has its own
	}
	es, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 || es[0].Key != "/mnt/a" || es[1].Key != "/mnt/b" {
		t.Fatalf("List = %v", es)
	}
	if string(es[0].State) != "new" || len(es[0].Files) != 2 || content(t, es[0].Files[0]) != "a2" || content(t, es[0].Files[1]) != "b" {
		t.Errorf("entry a: state %q, %d files", es[0].State, len(es[0].Files))
	}
	if !bytes.Equal(es[1].State, big) || len(es[1].Files) != 2 || content(t, es[1].Files[0]) != "b" {
		t.Errorf("entry b: %d bytes of state, %d files", len(es[1].State), len(es[1].Files))
	}
	for i := range es {
		es[i].Close()
	}
	if err := c.Delete(ctx, "/mnt/a"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "/mnt/missing"); err != nil {
		t.Errorf("Delete of a missing key: %v", err)
	}
	if err := c.Put(ctx, "", nil); err == nil {
		t.Error("Put with an empty key succeeded")
	}
	es, err = c.List(ctx)
	if err != nil || len(es) != 1 || es[0].Key != "/mnt/b" {
		t.Errorf("List after Delete = %v, %v", es, err)
	}
	for i := range es {
		es[i].Close()
	}
	// A frame of a version the holder does not speak is refused.
	raw, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Write([]byte{Version + 1, kindList, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	f, err := readFrame(raw.(*net.UnixConn))
	if err != nil || f.kind != kindError || !strings.Contains(string(f.data), "version 2") {
		t.Errorf("answer to version 2: %q %q, %v", f.kind, f.data, err)
	}
}

// TestHolderSurvivesClientKill kills a client with SIGKILL after it put a
// descriptor: the holder keeps it for the next client.
func TestHolderSurvivesClientKill(t *testing.T) {
	h := startHolder(t, time.Minute, nil)
	socket := h.socket
	cmd, out := selfexec.Start(t, envPutter+"="+socket)
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("client: %q, %v", line, err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	select {
	case <-h.done:
		t.Fatalf("the holder stopped with its client: %v", h.err)
	case <-time.After(200 * time.Millisecond):
	}
	c, err := Dial(context.Background(), socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	es, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || string(es[0].State) != "state" || len(es[0].Files) != 1 || content(t, es[0].Files[0]) != "from a dead client" {
		t.Fatalf("after the client's death the holder has %v", es)
	}
	es[0].Close()
}

// TestGraceAbortsFUSE holds the only descriptor of a FUSE connection that
// nobody serves: a program stuck on the mount gets an error once the
// grace period passes without a client, and the holder exits.
func TestGraceAbortsFUSE(t *testing.T) {
	mnt := t.TempDir()
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("fdstore-test", mnt, "fuse.fdstore-test", unix.MS_RDONLY,
		fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	dev := os.NewFile(uintptr(fd), "/dev/fuse")

	var logs syncio.Buffer
	const grace = time.Second
	h := startHolder(t, grace, &logs)
	c, err := Dial(context.Background(), h.socket)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(context.Background(), mnt, nil, dev); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	c.Close()
	start := time.Now()

	// Nothing answers the kernel: a stat waits until the connection ends.
	statErr := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		statErr <- unix.Stat(mnt, &st)
	}()
	select {
	case err := <-statErr:
		t.Fatalf("stat of the unserved mount returned at once: %v", err)
	case <-time.After(grace / 2):
	}
	select {
	case err := <-statErr:
		if !errors.Is(err, unix.ECONNABORTED) && !errors.Is(err, unix.ENOTCONN) {
			t.Errorf("stat after the grace period: %v, want ECONNABORTED or ENOTCONN", err)
		}
		if took := time.Since(start); took < grace {
			t.Errorf("the connection ended after %v, before the grace period", took)
		}
	case <-time.After(grace + 10*time.Second):
		t.Fatal("stat still waits after the grace period")
	}
	select {
	case <-h.done:
		if h.err != nil {
			t.Errorf("Serve: %v", h.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the holder did not exit")
	}
	if !strings.Contains(logs.String(), "aborted FUSE connection") {
		t.Errorf("the holder did not abort the connection through the control filesystem: %s", logs.String())
	}
}

// TestEnsure starts a holder as a process of its own, and finds it again.
func TestEnsure(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "fd.sock")
	t.Setenv(envHolder, socket)
	t.Setenv(envGrace, "300ms")
	argv := selfexec.Argv()
	ctx := context.Background()
	c, err := Ensure(ctx, socket, argv)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(ctx, "k", []byte("v"), memfd("x")); err != nil {
		t.Fatal(err)
	}
	pid := holderPID(t, socket)
	if pid == os.Getpid() {
		t.Fatal("the holder runs in the test process")
	}
	if sid, _ := unix.Getsid(pid); sid != pid {
		t.Errorf("the holder's session is %d, want its own (%d)", sid, pid)
	}
	c2, err := Ensure(ctx, socket, argv)
	if err != nil {
		t.Fatal(err)
	}
	if p := holderPID(t, socket); p != pid {
		t.Errorf("a second Ensure reached holder %d, want %d", p, pid)
	}
	es, err := c2.List(ctx)
	if err != nil || len(es) != 1 {
		t.Fatalf("List = %v, %v", es, err)
	}
	es[0].Close()
	c.Close()
	c2.Close()
	// Without clients the holder exits after its grace period.
	for start := time.Now(); unix.Kill(pid, 0) == nil; time.Sleep(50 * time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			unix.Kill(pid, unix.SIGKILL)
			t.Fatal("the holder did not exit after its grace period")
		}
	}
}

// holderPID returns the pid of the process serving socket.
func holderPID(t *testing.T, socket string) int {
	t.Helper()
	conn, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	raw, _ := conn.(*net.UnixConn).SyscallConn()
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if err != nil {
		t.Fatal(err)
	}
	return int(cred.Pid)
}
