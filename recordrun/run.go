// Package recordrun records what an image's start reads without a node:
// it starts a private containerd and spanpull snapshotter daemon, pulls
// the image lazily, runs it once until its output says it is ready, and
// exports the access record the daemon made (package record). It is
// "snapshotter record run", the CI step between indexing an image and
// attaching its record as prefetch artifacts ("indexer prefetch attach").
//
// Everything lives in a private temporary directory: containerd's root,
// state and socket (CRI disabled, the snapshotter as its only proxy
// plugin), the daemon's root, socket and config, the FIFOs of the
// container. Run stops every process it started by PID, kills the shims
// that name its containerd, unmounts what is left below the directory and
// removes it, whether the run succeeded or not. It needs root.
package recordrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/distribution/reference"

	"github.com/spanpull/spanpull/internal/proc"
	"github.com/spanpull/spanpull/internal/unmount"
	"github.com/spanpull/spanpull/lazypull"
	"github.com/spanpull/spanpull/record"
)

// Defaults of Options.
const (
	// DefaultTimeout bounds the wait for the ready pattern.
	DefaultTimeout = 60 * time.Second
	// DefaultPullTimeout bounds the lazy pull (which fetches the image's
	// index and zTOCs, and the layers that are not indexed).
	DefaultPullTimeout = 10 * time.Minute
	// DefaultContainerd is the containerd binary, looked up in PATH.
	DefaultContainerd = "containerd"
)

// Options say what Run runs.
type Options struct {
	// Image is the reference to record (Docker Hub short forms allowed).
	Image string
	// Cmd replaces the image's command (entrypoint and cmd); empty: the
	// image's own.
	Cmd []string
	// Ready is matched against each line of the container's output
	// (stdout and stderr); the first match ends the start. Required.
	Ready *regexp.Regexp
	// Timeout bounds the wait for Ready after the container starts; zero
	// means DefaultTimeout.
	Timeout time.Duration
	// PullTimeout bounds the pull; zero means DefaultPullTimeout.
	PullTimeout time.Duration
	// Name is the record's name; empty: record.DefaultName.
	Name string
	// PlainHTTP talks plain HTTP to the image's registry (always for
	// loopback registries).
	PlainHTTP bool
	// Platform is the platform to pull; empty: this machine's.
	Platform string
	// HostsDir is containerd's registry host configuration (hosts.toml
	// per registry) for the pull and the daemon; empty: none.
	HostsDir string
	// HostNetwork runs the container in the host's network namespace.
	HostNetwork bool
	// Containerd is the containerd binary (a path, or a name looked up in
	// PATH); empty: DefaultContainerd.
	Containerd string
	// Snapshotter is the spanpull snapshotter binary; empty: this
	// program (Run is "snapshotter record run").
	Snapshotter string
	// WorkDir is where the private directory is made; empty: the system's
	// temporary directory. Unix socket paths must stay short: keep it so.
	WorkDir string
	// Log receives progress lines; nil: none.
	Log io.Writer
	// Output receives the container's output as it comes; nil: none.
	Output io.Writer
}

func (o Options) withDefaults() (Options, error) {
	if o.Image == "" {
		return o, errors.New("record run: no image")
	}
	if o.Ready == nil {
		return o, errors.New("record run: no ready pattern: the record ends when the container's output matches it")
	}
	if o.Name == "" {
		o.Name = record.DefaultName
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.PullTimeout <= 0 {
		o.PullTimeout = DefaultPullTimeout
	}
	if o.Containerd == "" {
		o.Containerd = DefaultContainerd
	}
	if o.Snapshotter == "" {
		exe, err := os.Executable()
		if err != nil {
			return o, fmt.Errorf("record run: the snapshotter binary: %w", err)
		}
		o.Snapshotter = exe
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Output == nil {
		o.Output = io.Discard
	}
	return o, nil
}

// env is one run: its directory, daemons and container.
type env struct {
	o   Options
	ref string // o.Image, normalized
	dir string

	snap, containerd *proc.Process
	snapSocket       string
	containerdSocket string
	metrics          string // the daemon's metrics address
	client           *containerd.Client
	container        containerd.Container
	task             containerd.Task
}

// Run records the start of o.Image (see the package documentation) and
// returns the record the daemon made, named o.Name.
func Run(ctx context.Context, o Options) (rec *record.Record, err error) {
	if o, err = o.withDefaults(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("record run starts containerd and mounts file systems: run it as root")
	}
	named, err := reference.ParseDockerRef(o.Image)
	if err != nil {
		return nil, fmt.Errorf("record run: image %q: %w", o.Image, err)
	}
	e := &env{o: o, ref: named.String()}
	if e.dir, err = os.MkdirTemp(o.WorkDir, "spanpull-record-"); err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, e.close(err != nil)) }()
	ctx = namespaces.WithNamespace(ctx, namespace)
	if err := e.startSnapshotter(ctx); err != nil {
		return nil, err
	}
	if err := e.startContainerd(ctx); err != nil {
		return nil, err
	}
	img, err := e.pull(ctx)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "running %s until its output matches %q (at most %v)\n", e.ref, o.Ready, o.Timeout)
	took, err := e.runUntilReady(ctx, img)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "ready after %v\n", took.Round(time.Millisecond))
	return e.export(ctx)
}

// pull pulls the image lazily and checks that some layer is lazy: only
// those are recorded.
func (e *env) pull(ctx context.Context) (containerd.Image, error) {
	pctx, cancel := context.WithTimeout(ctx, e.o.PullTimeout)
	defer cancel()
	start := time.Now()
	img, err := lazypull.Pull(pctx, e.client, e.ref, lazypull.Options{
		Snapshotter: snapshotterName, Platform: e.o.Platform, PlainHTTP: e.o.PlainHTTP, HostsDir: e.o.HostsDir,
	})
	if err != nil {
		return nil, err
	}
	layers, err := lazypull.Report(pctx, e.client, img, snapshotterName)
	if err != nil {
		return nil, err
	}
	lazy := 0
	for _, l := range layers {
		if l.Mode == lazypull.ModeLazy {
			lazy++
		}
		fmt.Fprintf(e.o.Log, "layer %s  %s\n", l.Digest, l.Mode)
	}
	fmt.Fprintf(e.o.Log, "pulled %s in %v: %d of %d layers lazy\n", e.ref, time.Since(start).Round(time.Millisecond), lazy, len(layers))
	if lazy == 0 {
		return nil, fmt.Errorf("no layer of %s is pulled lazily, so there is nothing to record: index the image first (indexer create or convert)", e.ref)
	}
	return img, nil
}

// export fetches the record of the image from the daemon.
func (e *env) export(ctx context.Context) (*record.Record, error) {
	ctx, cancel := context.WithTimeout(ctx, exportTimeout)
	defer cancel()
	rec, err := record.Export(ctx, e.metrics, e.ref, e.o.Name)
	if err != nil {
		return nil, err
	}
	if rec.Empty() {
		return nil, fmt.Errorf("the record of %s is empty: the start read nothing from its lazily pulled layers before its output matched %q", e.ref, e.o.Ready)
	}
	spans, files := 0, 0
	for _, l := range rec.Layers {
		spans += len(l.Spans)
		files += len(l.Files)
	}
	fmt.Fprintf(e.o.Log, "recorded %d spans and %d files in %d layers\n", spans, files, len(rec.Layers))
	return rec, nil
}

// close removes the container, stops containerd (and its shims) and the
// daemon by PID, unmounts what is left below the run's directory and
// removes it. After a failed run it shows the end of the daemons' logs
// first.
func (e *env) close(failed bool) error {
	var errs []error
	if e.client != nil {
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), namespace), time.Minute)
		errs = append(errs, e.removeContainer(ctx))
		cancel()
		errs = append(errs, e.client.Close())
	}
	for _, p := range []*proc.Process{e.containerd, e.snap} {
		if p == nil {
			continue
		}
		if failed {
			fmt.Fprintf(e.o.Log, "--- %s log (end) ---\n%s\n", p.Name, p.LogTail(4<<10))
		}
		errs = append(errs, stop(p, stopGrace))
		if p == e.containerd { // its shims outlive it by design
			errs = append(errs, proc.KillWithArg(e.containerdSocket))
		}
	}
	// Whatever else names the directory (a daemon's helper processes).
	errs = append(errs, proc.KillMatching(proc.Under(e.dir)))
	if err := unmount.Under(e.dir); err != nil {
		return errors.Join(append(errs, err)...) // never delete through a mount
	}
	errs = append(errs, os.RemoveAll(e.dir))
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("record run: clean up: %w", err)
	}
	return nil
}
