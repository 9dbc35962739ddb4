package resolver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/spanpull/spanpull/fdstore"
	"github.com/spanpull/spanpull/fusefs"
	"github.com/spanpull/spanpull/internal/atomicfile"
	"github.com/spanpull/spanpull/record"
	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/snapshotter"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/store"
	"github.com/spanpull/spanpull/ztoc"
)

// Verification states of a lazy layer (snapshotter.LabelVerified).
const (
	stateUnverified  = "unverified"
	stateVerified    = "verified"
	stateQuarantined = "quarantined"
)

// lazyLayer is a layer served lazily over FUSE: its TOC (a mapped file),
// the span engine that reads its blob, the FUSE server, and the background
// work that completes and verifies it.
type lazyLayer struct {
	r   *Resolver
	rec store.RemoteLayer
	log *log.Entry

	toc  *mappedFile
	tocr *ztoc.TOCReader
	tree *fusefs.Tree
	root *fusefs.Root
	srv  *fusefs.Server // nil once a big layer is removed
	// big says the TOC is at least bigTOC bytes: building the tree and
	// removing the layer return the memory they free to the OS at once.
	big bool
	// spans and z (the span table, without Files) change when a
	// quarantined layer is repaired.
	spans atomic.Pointer[span.Layer]
	z     atomic.Pointer[ztoc.Ztoc]
	// windows gives the checkpoint windows of a layer mounted from a
	// pack (nil otherwise).
	windows *soci.Windows

	recorder *record.LayerRecorder
	state    atomic.Value // string: stateUnverified, ...
	// checking is set while checkIndex runs; lastCheck is when the last
	// one started (UnixNano), see suspect.
	checking  atomic.Bool
	lastCheck atomic.Int64

	ctx    context.Context // background work: prefetch, fill, verification
	cancel context.CancelFunc
	wg     sync.WaitGroup

	releaseOnce sync.Once
	removeOnce  sync.Once
	removeErr   error
}

var _ snapshotter.RemoteMount = (*lazyLayer)(nil)

// A pack's windows are kept on disk and fetched for a whole layer at once
// by the fill.
var _ span.WindowKeeper = (*soci.Windows)(nil)

// layerDesc is the layer blob's descriptor as the record knows it.
func (l *lazyLayer) layerDesc() ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: l.rec.LayerMediaType, Digest: l.rec.LayerDigest, Size: l.rec.LayerSize}
}

// openLazy builds the lazy layer of record rec from li (its TOC, span
// table and windows) without mounting it. It takes li's TOC: li.TOC (and
// its pack head's) is nil afterwards.
func (r *Resolver) openLazy(rec store.RemoteLayer, li *soci.LayerIndex, repo *registry.Repository) (_ *lazyLayer, err error) {
	l := &lazyLayer{r: r, rec: rec, log: r.log.WithField("layer", rec.LayerDigest)}
	l.state.Store(stateUnverified)
	if rec.Verification != "" {
		l.state.Store(rec.Verification)
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			l.closeParts()
		}
	}()
	if l.toc, err = r.mapTOC(rec, li); err != nil {
		return nil, err
	}
	// From here on the TOC is read from the mapped file: the decoded copy
	// (li's, shared with its pack head) must be garbage while the tree is
	// built (over 100 MB for a million entries).
	li.TOC = nil
	if li.Pack != nil {
		li.Pack.TOC = nil
	}
	if l.tocr, err = ztoc.NewTOCReader(l.toc.Bytes()); err != nil {
		return nil, err
	}
	// The span table must not keep the blob it was decoded from alive.
	z := *li.Ztoc
	z.Checkpoints = append([]byte(nil), z.Checkpoints...)
	var windows span.WindowSource
	if li.Windows != nil {
		li.Windows.OnFetch(func(n int64) { r.cfg.Metrics.fetched("window", n) })
		li.Windows.KeepIn(r.windowsDir(rec))
		windows, l.windows = li.Windows, li.Windows
	}
	sl, err := r.newSpanLayer(repo, l.layerDesc(), &z, windows)
	if err != nil {
		return nil, err
	}
	l.spans.Store(sl)
	l.z.Store(&z)
	if err := l.buildTree(); err != nil {
		return nil, err
	}
	l.root, err = fusefs.NewRoot(l.tree, streamReader{l, sl}, l.rootOptions())
	return l, err
}

// Memory of big layers: the TOC of a million entries is about 140 MB,
// loading it leaves as much garbage, and decoding its entries one by one
// some 600 B each, which the runtime's pacing (GOGC) lets a daemon of
// 100 MB live memory grow to several times that before collecting.
const (
	// bigTOC is the TOC size from which building a layer's tree collects
	// garbage as it goes (every tocReleaseEvery entries) and returns freed
	// memory to the OS after.
	bigTOC = 16 << 20
	// tocReleaseEvery is how many entries of the mapped TOC are read
	// between releases of its pages.
	tocReleaseEvery = 1 << 16
)

// buildTree builds the layer's FUSE tree from its mapped TOC, releasing
// the pages read as it goes, so that a big TOC is never resident next to
// the tree being built from it. For a big TOC it also bounds the garbage
// (measured for a million entries: peak RSS 372 MiB without, the tree
// itself about 100 MiB).
func (l *lazyLayer) buildTree() (err error) {
	big := len(l.toc.Bytes()) >= bigTOC
	collect := func() {
		if big {
			runtime.GC()
		}
	}
	collect() // the decoded TOC the layer was loaded from is garbage now
	n := 0
	l.tree, err = fusefs.NewTree(func(fn func(*ztoc.FileMetadata) error) error {
		return ztoc.DecodeFiles(l.toc.Bytes(), func(f *ztoc.FileMetadata) error {
			if n++; n%tocReleaseEvery == 0 {
				l.toc.release()
				collect()
			}
			return fn(f)
		})
	}, l.log)
	l.toc.release()
	if big {
		l.big = true
		debug.FreeOSMemory()
	}
	return err
}

// newSpanLayer returns the span engine of layer desc described by z,
// reading the blob from repo through the daemon's scheduler and caches.
func (r *Resolver) newSpanLayer(repo *registry.Repository, desc ocispec.Descriptor, z *ztoc.Ztoc, windows span.WindowSource) (*span.Layer, error) {
	blob, err := repo.BlobReader(desc)
	if err != nil {
		return nil, err
	}
	opts := span.Options{Cache: r.spans, Memory: r.mem, Scheduler: r.sched, FetchTimeout: r.cfg.FetchTimeout, Windows: windows}
	if r.cfg.Metrics != nil {
		opts.Metrics = r.cfg.Metrics
	}
	return span.NewLayer(desc.Digest, z, blob, opts)
}

// rootOptions are the daemon's hooks into the layer's FUSE filesystem.
func (l *lazyLayer) rootOptions() fusefs.Options {
	return fusefs.Options{Logger: l.log, Backing: l.backing, VerifyEntry: l.verifyEntry, Observer: observer{l}}
}

// mapTOC maps the layer's TOC flatbuffer: the stored zTOC itself, or for a
// layer mounted from a pack head the TOC it holds, kept in a file of its
// own next to the span cache.
func (r *Resolver) mapTOC(rec store.RemoteLayer, li *soci.LayerIndex) (*mappedFile, error) {
	if rec.HeadDigest == "" {
		p, err := r.meta.BlobPath(rec.ZtocDigest)
		if err != nil {
			return nil, err
		}
		return mapFile(p)
	}
	dir := filepath.Join(r.cfg.Root, "tocs")
	name := rec.HeadDigest.Encoded()
	if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		if err := atomicfile.WriteFile(dir, name, li.TOC); err != nil {
			return nil, fmt.Errorf("store the TOC of pack head %s: %w", rec.HeadDigest, err)
		}
	}
	return mapFile(filepath.Join(dir, name))
}

// serve mounts the layer on dir, or takes over the live connection a
// previous daemon left in the fd holder, and hands the connection to the
// holder. A held connection that cannot be taken over (the daemon's tree
// differs, the kernel dropped it) is dropped and the layer mounted anew.
func (l *lazyLayer) serve(ctx context.Context, dir string) error {
	h := l.r.holder
	if held, ok := h.take(dir); ok {
		srv, err := fusefs.Resume(ctx, dir, held, l.root, l.r.mountOptions(l.rec))
		if err == nil {
			held.Close()
			l.srv = srv
			l.log.Info("spanpull: took over the live FUSE connection of the previous daemon")
			return nil
		}
		l.log.WithError(err).Warn("spanpull: cannot take over the held FUSE connection; mounting the layer again")
		if derr := dropHandoff(dir, held); derr != nil {
			l.log.WithError(derr).Warn("spanpull: dropping the held FUSE connection")
		}
		// A new Root: a failed Resume may have marked this one mounted.
		if err := l.renewRoot(); err != nil {
			return err
		}
	}
	// A mount left by a daemon that had no holder, or whose connection is
	// gone: its reads could only fail.
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("remove old mount on %s: %w", dir, err)
	}
	srv, err := fusefs.Mount(ctx, dir, l.root, l.r.mountOptions(l.rec))
	if err != nil {
		return err
	}
	l.srv = srv
	if err := h.keep(ctx, dir, srv); err != nil {
		// Serving works; only a restart would break the layer's readers.
		l.log.WithError(err).Warn("spanpull: the fd holder does not keep the layer's FUSE connection")
	}
	return nil
}

// dropHandoff ends a held connection that cannot be served.
func dropHandoff(dir string, h *fusefs.Handoff) error {
	err := mount.UnmountRecursive(dir, unix.MNT_DETACH)
	return errors.Join(err, fdstore.Abort(h.FUSE), h.Close())
}

// renewRoot makes a fresh Root over the same tree and hooks.
func (l *lazyLayer) renewRoot() error {
	root, err := fusefs.NewRoot(l.tree, streamReader{l, l.spans.Load()}, l.rootOptions())
	if err != nil {
		return err
	}
	l.root = root
	return nil
}

// mountOptions are the FUSE mount options of the layer of rec.
func (r *Resolver) mountOptions(rec store.RemoteLayer) fusefs.MountOptions {
	return fusefs.MountOptions{FsName: rec.LayerDigest.String()}
}

// start begins the layer's background work: the recorded prefetch (ids,
// possibly none), then the background fill (unless disabled), then, once
// every byte is local, the layer's verification.
func (l *lazyLayer) start(prefetch []ztoc.SpanID) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		if len(prefetch) > 0 {
			start := time.Now()
			if err := l.spans.Load().Prefetch(l.ctx, prefetch); err != nil {
				if l.ctx.Err() == nil {
					l.log.WithError(err).Warn("spanpull: recorded prefetch stopped")
				}
				return
			}
			l.log.WithFields(log.Fields{"spans": len(prefetch), "duration": time.Since(start)}).Debug("spanpull: recorded prefetch done")
		}
	}()
	if l.r.cfg.FillRate < 0 {
		return
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		// The scheduler holds the fill back (FillDelay, demand reads).
		if err := l.spans.Load().Fill(l.ctx); err != nil {
			if l.ctx.Err() == nil {
				l.log.WithError(err).Warn("spanpull: background fill stopped")
			}
			return
		}
		l.completed(l.ctx)
	}()
}

// stopWork stops the layer's background work and waits for it.
func (l *lazyLayer) stopWork() {
	l.cancel()
	l.wg.Wait()
	l.recorder.Freeze()
}

// Release implements snapshotter.RemoteMount: the daemon is stopping. With
// an fd holder the layer stays mounted and keeps its connection, for the
// next daemon to take over; the FUSE server serves until the process
// exits. Without one it is unmounted.
func (l *lazyLayer) Release() error {
	var err error
	l.releaseOnce.Do(func() {
		l.stopWork()
		if l.r.holder != nil || l.srv == nil {
			return
		}
		err = l.srv.Unmount()
		l.closeParts()
	})
	return err
}

// Remove implements snapshotter.RemoteMount: the snapshot is gone. The
// layer is unmounted, its connection dropped from the holder, and what
// only it needed deleted: its record, its stored zTOC (unless shared), its
// cached spans and local files (unless another snapshot serves the same
// layer).
func (l *lazyLayer) Remove() error {
	l.removeOnce.Do(func() {
		l.stopWork()
		ctx := context.Background()
		errs := []error{l.srv.Unmount(), l.r.holder.forget(ctx, l.rec.Key)}
		l.closeParts()
		if err := l.r.meta.DeleteLayer(ctx, l.rec.Key); err != nil && !errors.Is(err, store.ErrNotFound) {
			errs = append(errs, err)
		}
		errs = append(errs, l.r.removeUnused(ctx, l.rec))
		l.removeErr = errors.Join(errs...)
		if l.big {
			// The tree is garbage once the layer lets go of it, but it
			// survived the first GC after removal when measured (freed at
			// the second: a sync.Pool's victim cache, such as go-fuse's
			// request pool, holding the server would do that): collect
			// twice.
			l.tree, l.root, l.srv = nil, nil, nil
			debug.FreeOSMemory()
			debug.FreeOSMemory()
		}
	})
	return l.removeErr
}

// closeParts releases the span engine and the mapped TOC.
func (l *lazyLayer) closeParts() {
	if sl := l.spans.Load(); sl != nil {
		sl.Close()
	}
	if l.toc != nil {
		l.toc.Close()
	}
}

// Labels implements snapshotter.RemoteMount.
func (l *lazyLayer) Labels() map[string]string {
	return map[string]string{snapshotter.LabelMode: "lazy", snapshotter.LabelVerified: l.state.Load().(string)}
}

// Usage implements snapshotter.RemoteMount: the layer's cached spans and
// local files.
func (l *lazyLayer) Usage() snapshots.Usage {
	n := l.r.spans.Usage(l.rec.LayerDigest) + l.r.trees.usage(l.rec.LayerDigest)
	return snapshots.Usage{Size: n}
}

// windowsDir keeps the checkpoint windows of rec's layer fetched from its
// pack's windows blob.
func (r *Resolver) windowsDir(rec store.RemoteLayer) string {
	return filepath.Join(r.cfg.Root, "windows", rec.WindowsDigest.Encoded())
}

// removeUnused deletes the cached spans, windows, local files and stored
// TOC of rec's layer when no other record uses them.
func (r *Resolver) removeUnused(ctx context.Context, rec store.RemoteLayer) error {
	layers, err := r.meta.ListLayers(ctx)
	if err != nil {
		return err
	}
	layerUsed, headUsed, windowsUsed := false, false, false
	for _, o := range layers {
		layerUsed = layerUsed || o.LayerDigest == rec.LayerDigest
		headUsed = headUsed || rec.HeadDigest != "" && o.HeadDigest == rec.HeadDigest
		windowsUsed = windowsUsed || rec.WindowsDigest != "" && o.WindowsDigest == rec.WindowsDigest
	}
	var errs []error
	if !headUsed && rec.HeadDigest != "" {
		p := filepath.Join(r.cfg.Root, "tocs", rec.HeadDigest.Encoded())
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if !windowsUsed && rec.WindowsDigest != "" {
		errs = append(errs, os.RemoveAll(r.windowsDir(rec)))
	}
	if !layerUsed {
		errs = append(errs, r.spans.RemoveLayer(ctx, rec.LayerDigest), r.trees.remove(rec.LayerDigest))
		r.cfg.Metrics.localTrees(r.trees.total())
	}
	return errors.Join(errs...)
}

// streamReader is the layer's uncompressed tar stream as a Root reads it:
// its span engine, with the demand reads fed to the layer's recorder.
type streamReader struct {
	l     *lazyLayer
	spans *span.Layer
}

func (s streamReader) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if s.l.state.Load() == stateQuarantined {
		return 0, errQuarantined
	}
	s.l.recorder.Range(s.spans.Spans(), off, int64(len(p)))
	n, err := s.spans.ReadAt(ctx, p, off)
	if err != nil {
		s.l.suspect(err)
	}
	return n, err
}

// errQuarantined fails the reads of a layer whose index was found to lie.
var errQuarantined = fmt.Errorf("layer is quarantined: its index does not match the layer: %w", fusefs.ErrRejected)

// observer feeds the files a workload opens to the layer's recorder.
type observer struct{ l *lazyLayer }

func (o observer) Opened(e fusefs.Entry)               { o.l.recorder.File(e.Path()) }
func (o observer) Read(e fusefs.Entry, _ int64, _ int) {}

// layerDigestOf returns the layer digest in labels, or an error.
func layerDigestOf(labels map[string]string, key string) (digest.Digest, error) {
	d, err := digest.Parse(labels[key])
	if err != nil {
		return "", fmt.Errorf("no valid layer digest label: %w", snapshotter.ErrNoRemote)
	}
	return d, nil
}
