package ztoc

import (
	"bytes"
	"context"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// gzipChecker walks a gzip layer's deflate stream with the builder's
// inflate state (gzipInflater: the history window, member boundaries,
// output chunks), but where the builder chooses checkpoints, it checks
// the zTOC's: each must be a block boundary that the walk meets, at the
// same compressed offset, leftover bits and uncompressed offset, with the
// same window. The walk is the builder's Z_BLOCK walk, so a checkpoint the
// builder could have recorded passes.
type gzipChecker struct {
	*gzipInflater // its spanRecorder collects the checkpoints met so far
	want          checkpoints
	// seen is a block boundary met at the next checkpoint's uncompressed
	// offset but before its compressed offset (a run of empty blocks has
	// several); it names the real offsets when the checkpoint is missed.
	seen *Checkpoint
}

// checkInflate is VerifyLayer's inflate stage for a gzip layer: it
// inflates the blob's chunks from in to out (in chunks of outSize bytes),
// checking the checkpoints want, and hands each input chunk to hashed with
// the places where spans start in it. It closes neither out nor hashed.
func checkInflate(ctx context.Context, first chunk, in <-chan chunk, out chan<- chunk, hashed chan<- hashChunk, want checkpoints, outSize int) error {
	inf, err := newInflater(windowBitsGzip)
	if err != nil {
		first.release()
		return err
	}
	defer inf.close()
	g := &gzipInflater{inf: inf, s: &spanRecorder{}, out: out, outPool: newBufferPool(outputChunks, WindowSize+outSize)}
	c := &gzipChecker{gzipInflater: g, want: want}
	if err := g.run(ctx, first, in, hashed, c.inflateChunk); err != nil {
		return err
	}
	if err := g.finish(ctx); err != nil {
		return err
	}
	if k := len(g.s.checkpoints); k < len(want.list) {
		return c.missed(k)
	}
	return nil
}

// checkpoints are the checkpoints VerifyLayer checks, with their windows
// in the list or, for a zTOC from a pack head, decoded one at a time.
type checkpoints struct {
	list    []Checkpoint
	windows func(SpanID) ([]byte, error) // nil: the list has the windows
}

// window returns checkpoint k's window.
func (c checkpoints) window(k int) ([]byte, error) {
	if c.windows == nil {
		return c.list[k].Window, nil
	}
	return c.windows(SpanID(k))
}

// inflateChunk inflates one input chunk, as gzipInflater.inflateChunk
// does, recording in hc where the spans of the checkpoints met start.
func (c *gzipChecker) inflateChunk(ctx context.Context, data []byte, hc *hashChunk) error {
	for len(data) > 0 {
		if c.memberDone {
			var err error
			if data, err = c.betweenMembers(data); err != nil {
				return err
			}
			if c.memberDone {
				continue
			}
		}
		consumed, err := c.step(ctx, data, hc)
		if err != nil {
			return err
		}
		data = data[consumed:]
	}
	return nil
}

// step runs inflate once on data and returns how much of it was consumed.
// Inflate runs freely up to one byte before the next checkpoint's
// uncompressed offset; from there it stops at every block boundary
// (Z_BLOCK) until the checkpoint is met or passed.
func (c *gzipChecker) step(ctx context.Context, data []byte, hc *hashChunk) (int, error) {
	g := c.gzipInflater
	out, flush := g.cur[g.pos:], zNoFlush
	k := len(g.s.checkpoints)
	near := k < len(c.want.list)
	if near {
		if room := c.want.list[k].Out - 1 - g.totOut; room > 0 {
			out, near = out[:min(int64(len(out)), room)], false
		} else {
			flush = zBlock
		}
	}
	consumed, produced, ret, dt, err := g.inflate(data, out, flush)
	if err != nil {
		return 0, err
	}
	if near {
		if err := c.check(dt, hc); err != nil {
			return 0, err
		}
	}
	if g.pos == len(g.cur) {
		if err := g.emit(ctx); err != nil {
			return 0, err
		}
	}
	if consumed == 0 && produced == 0 && !g.memberDone && ret != zOK {
		return 0, fmt.Errorf("gzip data at compressed offset %d: inflate made no progress", g.totIn)
	}
	return consumed, nil
}

// check compares where inflate stopped (zlib's data_type dt) with the
// next checkpoint, and records the checkpoint once it is met.
func (c *gzipChecker) check(dt int, hc *hashChunk) error {
	g := c.gzipInflater
	k := len(g.s.checkpoints)
	want := &c.want.list[k]
	// A boundary a reader can resume at: the end of a block that is not
	// a member's last, or the end of a member's header (as the builder).
	resumable := dt&128 != 0 && dt&64 == 0 && !g.memberDone
	bits := uint8(dt & 7)
	switch {
	case g.totOut > want.Out:
		return c.missed(k)
	case g.totOut < want.Out || !resumable:
		return nil
	case g.totIn < want.In:
		c.seen = &Checkpoint{In: g.totIn, Out: g.totOut, Bits: bits}
		return nil
	case g.totIn > want.In:
		return &MismatchError{Part: PartCheckpoint, Index: k, Field: "in",
			Got: fmt.Sprint(g.totIn), Want: fmt.Sprint(want.In)}
	case bits != want.Bits:
		return &MismatchError{Part: PartCheckpoint, Index: k, Field: "bits",
			Got: fmt.Sprint(bits), Want: fmt.Sprint(want.Bits)}
	}
	wantWindow, err := c.want.window(k)
	if err != nil {
		return fmt.Errorf("checkpoint %d: %w", k, err)
	}
	if window := g.cur[g.pos-WindowSize : g.pos]; !bytes.Equal(window, wantWindow) {
		return &MismatchError{Part: PartCheckpoint, Index: k, Field: "window",
			Got: digest.FromBytes(window).String(), Want: digest.FromBytes(wantWindow).String()}
	}
	hc.cuts = append(hc.cuts, streamCut{in: g.totIn, out: g.totOut, bits: bits, span: true})
	g.s.checkpoints = append(g.s.checkpoints, Checkpoint{In: g.totIn, Out: g.totOut, Bits: bits})
	g.lastOut, c.seen = g.totOut, nil
	return nil
}

// missed reports checkpoint k, which the walk has passed without meeting.
func (c *gzipChecker) missed(k int) error {
	want := &c.want.list[k]
	if c.seen != nil {
		return &MismatchError{Part: PartCheckpoint, Index: k, Field: "in",
			Got: fmt.Sprintf("%d (bits %d)", c.seen.In, c.seen.Bits), Want: fmt.Sprintf("%d (bits %d)", want.In, want.Bits)}
	}
	return &MismatchError{Part: PartCheckpoint, Index: k, Field: "out",
		Got: fmt.Sprintf("no resumable block boundary at uncompressed offset %d", want.Out), Want: fmt.Sprint(want.Out)}
}
