package resolver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/fusefs"
	"github.com/spanpull/spanpull/span"
	"github.com/spanpull/spanpull/store"
	"github.com/spanpull/spanpull/ztoc"
)

// What is verified when (the trust model; README "Trust"):
//
//   - Span bytes, on every fetch: against the span (or chunk) digests of
//     the index. They bind what is read to the index, not to the image.
//   - A regular file, before its first byte is served (verifyEntry): the
//     tar header blocks before its data are read through the same verified
//     span path and compared with its TOC entry (name, type, size, data
//     offset, mode, owners, times, link, device, PAX records). A forged
//     name, offset or metadata is caught there.
//   - The whole layer, once every byte is local (completed): the blob's
//     digest is the layer digest of the image manifest, its uncompressed
//     digest the diff_id of the image config, the tar headers and the TOC
//     are the same entries in the same order, and every checkpoint is a
//     real restart point with the real window. A forged window can only be
//     caught here: a window is the output of every earlier span.
//
// A mismatch quarantines the layer: every read fails with EIO, a metric
// counts it, one error line names the layer, the index and what differed.
// Then the layer is repaired: the whole blob is fetched by its digest, a
// zTOC is built from it with our own builder and checked against the
// diff_id, and the layer is served from that (its tree replaced live).
// containerd shares a committed snapshot by chain ID without asking the
// snapshotter, so this is how a legitimate image that shares the layer of
// a forged one ends up reading the right bytes: what a lazy layer serves
// depends on the layer alone, never on the index it was mounted from.

// verifyEntry implements fusefs.Options.VerifyEntry: the per-file binding.
func (l *lazyLayer) verifyEntry(ctx context.Context, e fusefs.Entry) error {
	switch l.state.Load() {
	case stateVerified:
		return nil
	case stateQuarantined:
		return errQuarantined
	}
	if l.r.cfg.NoEntryBinding {
		return nil
	}
	i := e.Index()
	if i < 0 {
		return nil
	}
	z, k, err := l.headerEntries(i)
	if err != nil {
		return err
	}
	start, end, err := ztoc.HeaderRange(z, k)
	if err == nil {
		var hdr []byte
		if hdr, err = l.readHeader(ctx, start, end, e.Size()); err != nil {
			l.suspect(err)
			return fmt.Errorf("read the tar header of %s: %w", e.Path(), err)
		}
		l.r.cfg.Metrics.headerChecked(int64(len(hdr)))
		err = ztoc.CheckHeader(hdr, &z.Files[k])
	}
	if err != nil {
		l.quarantine(fmt.Errorf("toc entry %d (%s): %w", i, e.Path(), err))
		return errQuarantined
	}
	return nil
}

// bindingReadAhead is how much of a file's data the header check reads
// along with the header: as much as the kernel's first read of the file
// usually asks for (its readahead window), so that the read the check
// stands in front of is served from the span loads the check waited for,
// also when the header ends one span and the data starts the next.
const bindingReadAhead = 128 << 10

// readHeader reads the header bytes [start, end) of a file of size bytes
// through the verified span path, together with the start of its data
// (bindingReadAhead). A read of the data follows the check, so the span is
// fetched whole (span.Layer.ReadAt); an entry without data (a symlink, an
// empty file) may be the only thing read in its span, so only the chunks
// of its header are (ReadAtExact).
func (l *lazyLayer) readHeader(ctx context.Context, start, end, size int64) ([]byte, error) {
	buf := make([]byte, end-start+min(max(size, 0), bindingReadAhead))
	read := l.spans.Load().ReadAt
	if size <= 0 {
		read = l.spans.Load().ReadAtExact
	}
	n, err := read(ctx, buf, start)
	if err != nil && !(errors.Is(err, io.EOF) && int64(n) >= end-start) {
		return nil, err
	}
	return buf[:end-start], nil
}

// headerEntries decodes TOC entry i and the one before it, as the Files of
// a zTOC for ztoc.HeaderRange, and returns the index of entry i in it.
func (l *lazyLayer) headerEntries(i int) (*ztoc.Ztoc, int, error) {
	cur, err := l.tocr.File(i)
	if err != nil {
		return nil, 0, err
	}
	if i == 0 {
		return &ztoc.Ztoc{Files: []ztoc.FileMetadata{*cur}}, 0, nil
	}
	prev, err := l.tocr.File(i - 1)
	if err != nil {
		return nil, 0, err
	}
	return &ztoc.Ztoc{Files: []ztoc.FileMetadata{*prev, *cur}}, 1, nil
}

// completed runs once every byte of the layer is local: it verifies the
// layer against the image and, when it matches, unpacks its files for
// passthrough reads; when it does not, it quarantines and repairs it.
func (l *lazyLayer) completed(ctx context.Context) {
	if l.state.Load() != stateUnverified {
		return
	}
	if l.rec.DiffID == "" {
		l.log.Warn("spanpull: layer complete but not verifiable: its image's diff_id is unknown")
		return
	}
	sl := l.spans.Load()
	sl.ForgetMemory()
	z, err := l.fullZtoc(ctx)
	if err != nil {
		l.log.WithError(err).Warn("spanpull: layer verification: read the TOC")
		return
	}
	rc, err := sl.OpenBlob(ctx)
	if err != nil {
		l.log.WithError(err).Warn("spanpull: layer verification: open the cached blob")
		return
	}
	_, err = ztoc.VerifyLayer(ctx, rc, z, ztoc.LayerDigests{Blob: l.rec.LayerDigest, DiffID: l.rec.DiffID})
	rc.Close()
	var mismatch *ztoc.MismatchError
	switch {
	case errors.As(err, &mismatch):
		l.quarantine(err)
		return
	case err != nil:
		if ctx.Err() == nil {
			l.log.WithError(err).Warn("spanpull: layer verification failed")
		}
		return
	}
	l.setState(stateVerified)
	l.log.Info("spanpull: layer verified against the image (layer digest, diff_id, TOC, checkpoints)")
	rc, err = sl.OpenBlob(ctx)
	if err != nil {
		l.log.WithError(err).Warn("spanpull: unpack verified layer")
		return
	}
	defer rc.Close()
	l.unpackFiles(ctx, rc)
}

// fullZtoc returns the layer's zTOC with every TOC entry decoded and every
// checkpoint's window: for a layer mounted from a pack head, the zTOC the
// head was made from, whose windows VerifyLayer takes one at a time from
// the layer's soci.Windows (kept on disk by the fill, else fetched).
func (l *lazyLayer) fullZtoc(ctx context.Context) (*ztoc.Ztoc, error) {
	if l.rec.HeadDigest != "" {
		return l.restoreZtoc(ctx)
	}
	z := *l.z.Load()
	z.Files = make([]ztoc.FileMetadata, 0, l.tocr.Len())
	err := ztoc.DecodeFiles(l.toc.Bytes(), func(f *ztoc.FileMetadata) error {
		z.Files = append(z.Files, *f)
		return nil
	})
	return &z, err
}

// restoreZtoc rebuilds the zTOC of a layer mounted from a pack head, with
// its windows.
func (l *lazyLayer) restoreZtoc(ctx context.Context) (*ztoc.Ztoc, error) {
	b, err := l.r.meta.Ztoc(ctx, l.rec.HeadDigest)
	if err != nil {
		return nil, err
	}
	h, err := ztoc.UnmarshalPackHead(b)
	if err != nil {
		return nil, err
	}
	// Not Restore: whoever calls this checks the zTOC against the layer
	// itself (VerifyLayer against the image's digests), so encoding it
	// again to compare with the zTOC digest would only take memory. The
	// check takes the windows one at a time (a layer at 1 MiB spans has
	// about a thousand, 32 MiB decoded): those the reads and the fill kept
	// on disk, else fetched one by one (and kept).
	if w := l.windows; w != nil {
		return h.WithWindowSource(func(id ztoc.SpanID) ([]byte, error) { return w.Window(ctx, id) }), nil
	}
	return h.AttachWindows(nil) // a layer without windows (tar)
}

// unpackFiles writes the tree of the verified layer, read from blob (its
// compressed bytes), for passthrough reads and for overlayfs, when it fits
// in the cache budget.
func (l *lazyLayer) unpackFiles(ctx context.Context, blob io.Reader) {
	r := l.r
	if r.cfg.NoLocalFiles {
		return
	}
	z := l.z.Load()
	if need := z.UncompressedArchiveSize; r.spans.Size()+r.trees.total()+need > r.maxBytes {
		l.log.WithField("bytes", need).Info("spanpull: verified layer not unpacked: over the cache budget")
		return
	}
	start := time.Now()
	if err := r.trees.unpack(ctx, l.rec.LayerDigest, z.Algorithm, blob); err != nil {
		if ctx.Err() == nil {
			l.log.WithError(err).Warn("spanpull: unpack verified layer")
		}
		return
	}
	r.cfg.Metrics.localTrees(r.trees.total())
	l.log.WithField("bytes", r.trees.usage(l.rec.LayerDigest)).WithField("duration", time.Since(start).Round(time.Millisecond)).
		Info(logUnpacked)
}

// logUnpacked is logged once a verified layer's local tree is written.
const logUnpacked = "spanpull: verified layer unpacked: new mounts stack its local tree, open files read it by passthrough"

// backing implements fusefs.Options.Backing: the file in the verified
// layer's local tree, read by the kernel without the daemon.
func (l *lazyLayer) backing(ctx context.Context, e fusefs.Entry) (*os.File, error) {
	if l.state.Load() != stateVerified || e.Size() == 0 {
		return nil, nil
	}
	return l.r.trees.open(l.rec.LayerDigest, e.Path())
}

// LocalDir implements snapshotter.RemoteMount: the verified layer's local
// tree, which overlayfs stacks in place of the FUSE mount.
func (l *lazyLayer) LocalDir() string {
	if l.state.Load() != stateVerified {
		return ""
	}
	return l.r.trees.path(l.rec.LayerDigest)
}

// setState records the layer's verification state.
func (l *lazyLayer) setState(s string) {
	l.state.Store(s)
	l.r.cfg.Metrics.layerState(l.rec.Key, s)
	if err := l.r.meta.SetVerification(context.Background(), l.rec.Key, s); err != nil && !errors.Is(err, store.ErrNotFound) {
		l.log.WithError(err).Warn("spanpull: record the layer's verification state")
	}
}

// suspectInterval is how long after checking a layer's index against the
// whole blob (suspect) bytes that fail their digest again lead to another
// check: a registry that keeps sending bad bytes costs one blob fetch per
// interval, not one per read.
const suspectInterval = time.Minute

// suspect is called when span bytes did not match their digest (err): the
// registry sent bad bytes, or the index lies about the layer (a span or
// chunk digest it gives is not the layer's). Only the whole blob, fetched
// and checked against the layer digest, tells which; in the background,
// one check at a time, the layer's index is verified against it
// (checkIndex). A lying index gets the layer quarantined and repaired;
// without this its reads would fail forever, also for every image that
// shares the snapshot.
func (l *lazyLayer) suspect(err error) {
	if !errors.Is(err, ztoc.ErrSpanDigest) || l.state.Load() != stateUnverified || l.ctx.Err() != nil {
		return
	}
	last := l.lastCheck.Load()
	if last != 0 && time.Since(time.Unix(0, last)) < suspectInterval || !l.checking.CompareAndSwap(false, true) {
		return
	}
	l.lastCheck.Store(time.Now().UnixNano())
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer l.checking.Store(false)
		l.checkIndex(l.ctx, err)
	}()
}

// checkIndex fetches the layer's blob (verified against the layer digest)
// and verifies the layer's index against it, after a span digest
// mismatch (cause). A mismatch quarantines the layer.
func (l *lazyLayer) checkIndex(ctx context.Context, cause error) {
	lg := l.log.WithField("cause", cause.Error())
	if l.rec.DiffID == "" {
		lg.Warn("spanpull: span bytes do not match the index; the layer cannot be checked: its image's diff_id is unknown")
		return
	}
	z, err := l.fullZtoc(ctx)
	if err != nil {
		lg.WithError(err).Warn("spanpull: span bytes do not match the index; read the TOC to check it")
		return
	}
	blob, err := l.fetchBlob(ctx)
	if err != nil {
		if ctx.Err() == nil {
			lg.WithError(err).Warn("spanpull: span bytes do not match the index; the layer blob to check it against cannot be fetched")
		}
		return
	}
	defer os.Remove(blob.Name())
	defer blob.Close()
	_, err = ztoc.VerifyLayer(ctx, io.NewSectionReader(blob, 0, l.rec.LayerSize), z, ztoc.LayerDigests{Blob: l.rec.LayerDigest, DiffID: l.rec.DiffID})
	var mismatch *ztoc.MismatchError
	switch {
	case errors.As(err, &mismatch) && mismatch.Part != ztoc.PartLayerDigest && mismatch.Part != ztoc.PartDiffID:
		l.quarantine(err)
	case err != nil:
		if ctx.Err() == nil {
			lg.WithError(err).Warn("spanpull: span bytes do not match the index; checking the index against the layer failed")
		}
	default:
		lg.Info("spanpull: span bytes did not match the index, but the index matches the layer: the registry sent bad bytes")
	}
}

// quarantine stops serving the layer from its index (reads fail with EIO)
// and starts its repair. Only the first mismatch is logged.
func (l *lazyLayer) quarantine(cause error) {
	if !l.state.CompareAndSwap(stateUnverified, stateQuarantined) {
		return
	}
	l.setState(stateQuarantined)
	l.r.cfg.Metrics.quarantined()
	l.log.WithFields(log.Fields{"index": l.rec.IndexDigest, "ztoc": l.rec.ZtocDigest, "image": l.rec.ImageRef}).WithError(cause).
		Error("spanpull: layer quarantined: its SOCI index does not match the layer; reads fail until it is repaired from the layer itself")
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		if err := l.repair(l.ctx); err != nil && l.ctx.Err() == nil {
			l.log.WithError(err).Error("spanpull: quarantined layer cannot be repaired; its reads keep failing")
		}
	}()
}

// repair serves the quarantined layer from a zTOC built here, from the
// whole blob fetched by its digest and checked against the diff_id. The
// blob primes the span cache (under the new zTOC's spans) and is unpacked
// for passthrough reads; later reads that miss the cache go to the
// registry with span digests that are now the layer's own.
func (l *lazyLayer) repair(ctx context.Context) error {
	blob, err := l.fetchBlob(ctx)
	if err != nil {
		return err
	}
	defer os.Remove(blob.Name())
	defer blob.Close()
	section := func() io.Reader { return io.NewSectionReader(blob, 0, l.rec.LayerSize) }
	z, _, err := ztoc.Build(ctx, section(), ztoc.BuildOptions{})
	if err != nil {
		return fmt.Errorf("build a zTOC of the layer: %w", err)
	}
	if l.rec.DiffID != "" {
		if _, err := ztoc.VerifyLayer(ctx, section(), z, ztoc.LayerDigests{Blob: l.rec.LayerDigest, DiffID: l.rec.DiffID}); err != nil {
			return fmt.Errorf("the layer itself does not match the image: %w", err)
		}
	}
	prime, err := span.NewLayer(l.rec.LayerDigest, z, span.LocalBlob(blob), span.Options{Cache: l.r.spans})
	if err != nil {
		return err
	}
	err = prime.Fill(ctx)
	prime.Close()
	if err != nil {
		return fmt.Errorf("cache the fetched layer: %w", err)
	}
	repo, err := l.r.repo(l.rec.ImageRef)
	if err != nil {
		return err
	}
	sl, err := l.r.newSpanLayer(repo, l.layerDesc(), z, nil)
	if err != nil {
		return err
	}
	if err := l.serveRepaired(ctx, z, sl); err != nil {
		sl.Close()
		return err
	}
	l.unpackFiles(ctx, section())
	return nil
}

// fetchBlob downloads the layer blob, verified against its digest, to a
// temporary file.
func (l *lazyLayer) fetchBlob(ctx context.Context) (*os.File, error) {
	repo, err := l.r.repo(l.rec.ImageRef)
	if err != nil {
		return nil, err
	}
	rc, err := repo.FetchBlob(ctx, l.layerDesc())
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	dir := filepath.Join(l.r.cfg.Root, "tocs")
	// Only layers mounted from a pack head have made it yet.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, "repair-*")
	if err != nil {
		return nil, err
	}
	n, err := io.Copy(f, rc)
	l.r.cfg.Metrics.fetched("repair", n)
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("fetch layer blob: %w", err)
	}
	return f, nil
}

// serveRepaired swaps the layer's tree and span engine for those of z, a
// zTOC built from the verified blob, and records z as the layer's zTOC.
func (l *lazyLayer) serveRepaired(ctx context.Context, z *ztoc.Ztoc, sl *span.Layer) error {
	zb, err := ztoc.Marshal(z)
	if err != nil {
		return err
	}
	tree, err := fusefs.NewTree(fusefs.Files(z.Files), l.log)
	if err != nil {
		return err
	}
	rec := l.rec
	rec.ZtocDigest, rec.HeadDigest, rec.WindowsDigest, rec.WindowsSize = digest.FromBytes(zb), "", "", 0
	rec.Verification = stateVerified
	if err := l.r.meta.PutLayer(ctx, rec, zb); err != nil {
		return err
	}
	root, err := fusefs.NewRoot(tree, streamReader{l, sl}, l.rootOptions())
	if err != nil {
		return err
	}
	// Verified before the swap: the new root's files need no binding.
	l.state.Store(stateVerified)
	if err := l.srv.Replace(ctx, root); err != nil {
		l.state.Store(stateQuarantined)
		return err
	}
	small := *z
	small.Files = nil
	old := l.spans.Swap(sl)
	l.z.Store(&small)
	l.root, l.tree = root, tree
	l.setState(stateVerified)
	if err := l.r.holder.keep(ctx, l.rec.Key, l.srv); err != nil {
		l.log.WithError(err).Warn("spanpull: the fd holder does not keep the repaired layer's FUSE connection")
	}
	old.Close()
	l.log.Info("spanpull: quarantined layer repaired: served from a zTOC built from the layer itself")
	return nil
}
