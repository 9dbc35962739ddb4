package soci

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"

	"github.com/spanpull/spanpull/ztoc"
)

// windowRange is where one span's compressed window lies in the windows
// blob.
type windowRange struct {
	id     ztoc.SpanID
	off, n int64
}

// KeepWindows fetches the windows of spans ids that are not kept on disk
// yet with one streamed range read of the windows blob, from the first
// missing window to the end of the last, and keeps each after checking it
// against the head: a layer whose spans are all cached then reads without
// the registry, at the cost of one request instead of one per span. A
// window whose bytes do not match the head ends the read with an error;
// the windows kept before it stay. Without KeepIn there is nowhere to keep
// windows and it does nothing. It implements span.WindowKeeper.
func (w *Windows) KeepWindows(ctx context.Context, ids []ztoc.SpanID) error {
	dir := w.dir.Load()
	if dir == nil {
		return nil
	}
	missing := w.unkept(*dir, ids)
	if len(missing) == 0 {
		return nil
	}
	first, last := missing[0], missing[len(missing)-1]
	body, err := w.repo.ReadRange(ctx, w.desc, first.off, last.off+last.n-first.off)
	if err != nil {
		return fmt.Errorf("windows of %d spans: %w", len(missing), err)
	}
	defer body.Close()
	pos := first.off
	for _, r := range missing {
		if r.off < pos {
			continue // shares bytes with the window before it: left to Window
		}
		b, err := w.readWindow(body, pos, r)
		if err != nil {
			return err
		}
		pos = r.off + r.n
		w.keep(r.id, b)
	}
	return nil
}

// unkept returns where the windows of ids that have bytes to fetch and are
// not kept in dir lie, in the order of the windows blob.
func (w *Windows) unkept(dir string, ids []ztoc.SpanID) []windowRange {
	var out []windowRange
	for _, id := range ids {
		off, n := w.head.WindowRange(id)
		if n == 0 {
			continue
		}
		if _, err := os.Stat(filepath.Join(dir, keptName(id))); err == nil {
			continue
		}
		out = append(out, windowRange{id, off, n})
	}
	slices.SortFunc(out, func(a, b windowRange) int { return cmp.Compare(a.off, b.off) })
	return out
}

// readWindow reads window r from body, which is at offset pos of the
// windows blob, and checks it against the head.
func (w *Windows) readWindow(body io.Reader, pos int64, r windowRange) ([]byte, error) {
	skipped, err := io.CopyN(io.Discard, body, r.off-pos)
	w.count(skipped)
	if err != nil {
		return nil, fmt.Errorf("window of span %d: read %s: %w", r.id, w.desc.Digest, err)
	}
	b := make([]byte, r.n)
	got, err := io.ReadFull(body, b)
	w.count(int64(got))
	if err != nil {
		return nil, fmt.Errorf("window of span %d: read [%d, %d) of %s: %w", r.id, r.off, r.off+r.n, w.desc.Digest, err)
	}
	if _, err := w.head.DecodeWindow(r.id, b); err != nil {
		return nil, fmt.Errorf("windows blob %s: %w", w.desc.Digest, err)
	}
	return b, nil
}
