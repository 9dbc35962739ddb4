package recordrun

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// maxLine bounds the partial line readyWatch keeps: a program printing
// megabytes without a newline is matched on their last part.
const maxLine = 64 << 10

// tailSize is how much of the container's output an error quotes.
const tailSize = 2 << 10

// readyWatch is the container's stdout and stderr: it copies them to out
// and closes ready once a line matches re (an unfinished line is matched
// too, for prompts). It keeps the output's tail for error messages.
type readyWatch struct {
	re  *regexp.Regexp
	out io.Writer

	mu    sync.Mutex
	line  []byte
	tail  []byte
	ready chan struct{}
	once  sync.Once
}

func newReadyWatch(re *regexp.Regexp, out io.Writer) *readyWatch {
	return &readyWatch{re: re, out: out, ready: make(chan struct{})}
}

// Write implements io.Writer; stdout and stderr write concurrently.
func (w *readyWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.out.Write(p)
	w.tail = append(w.tail, p...)
	if len(w.tail) > 2*tailSize {
		w.tail = append(w.tail[:0], w.tail[len(w.tail)-tailSize:]...)
	}
	rest := p
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			w.line = append(w.line, rest...)
			if len(w.line) > maxLine {
				w.line = append(w.line[:0], w.line[len(w.line)-maxLine:]...)
			}
			w.match(w.line)
			break
		}
		w.line = append(w.line, rest[:i]...)
		w.match(w.line)
		w.line, rest = w.line[:0], rest[i+1:]
	}
	return len(p), nil
}

func (w *readyWatch) match(line []byte) {
	if w.re.Match(line) {
		w.once.Do(func() { close(w.ready) })
	}
}

// outputTail returns the last bytes the container printed.
func (w *readyWatch) outputTail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	t := w.tail
	if len(t) > tailSize {
		t = t[len(t)-tailSize:]
	}
	return string(t)
}

// runUntilReady runs a container of the pulled image with the given
// command (the image's own when empty) and returns once its output
// matched the ready pattern. The task and the container are left for
// e.close, which kills and deletes them.
func (e *env) runUntilReady(ctx context.Context, img containerd.Image) (time.Duration, error) {
	id := namespace
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(e.o.Cmd) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(e.o.Cmd...))
	}
	if e.o.HostNetwork {
		specOpts = append(specOpts, oci.WithHostNamespace(specs.NetworkNamespace), oci.WithHostHostsFile, oci.WithHostResolvconf)
	}
	c, err := e.client.NewContainer(ctx, id, containerd.WithImage(img), containerd.WithSnapshotter(snapshotterName),
		containerd.WithNewSnapshot(id, img), containerd.WithNewSpec(specOpts...))
	if err != nil {
		return 0, fmt.Errorf("create container: %w", err)
	}
	e.container = c
	watch := newReadyWatch(e.o.Ready, e.o.Output)
	task, err := c.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, watch, watch), cio.WithFIFODir(filepath.Join(e.dir, "fifo"))))
	if err != nil {
		return 0, fmt.Errorf("create task: %w", err)
	}
	e.task = task
	exited, err := task.Wait(ctx)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := task.Start(ctx); err != nil {
		return 0, fmt.Errorf("start task: %w", err)
	}
	timer := time.NewTimer(e.o.Timeout)
	defer timer.Stop()
	select {
	case <-watch.ready:
		return time.Since(start), nil
	case st := <-exited:
		task.IO().Wait() // the last output, copied
		select {
		case <-watch.ready: // matched in the last output before exiting
			return time.Since(start), nil
		default:
		}
		return 0, fmt.Errorf("the container exited (status %d) before its output matched %q; its output ends:\n%s", st.ExitCode(), e.o.Ready, watch.outputTail())
	case <-timer.C:
		return 0, fmt.Errorf("the container's output did not match %q within %v; its output ends:\n%s", e.o.Ready, e.o.Timeout, watch.outputTail())
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// removeContainer kills and deletes the task and deletes the container
// with its snapshot.
func (e *env) removeContainer(ctx context.Context) error {
	var err error
	if e.task != nil {
		_ = e.task.Kill(ctx, syscall.SIGKILL)
		if _, derr := e.task.Delete(ctx, containerd.WithProcessKill); derr != nil {
			err = fmt.Errorf("delete task: %w", derr)
		}
	}
	if e.container != nil {
		if derr := e.container.Delete(ctx, containerd.WithSnapshotCleanup); derr != nil && err == nil {
			err = fmt.Errorf("delete container: %w", derr)
		}
	}
	return err
}
