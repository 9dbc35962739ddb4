package ztoc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// Whole-layer verification. The root of trust is the image: the layer
// digest in the manifest and the diff_id in the image config. A zTOC
// passes VerifyLayer only if serving reads through it gives exactly the
// layer's bytes: its entries are the layer's tar entries, its span digests
// hash the layer's bytes, and each checkpoint restarts inflation exactly
// as the real stream runs (span digests alone do not prove that: they
// cover compressed bytes, not the window or the offsets a checkpoint
// claims).

// LayerDigests are what the image says a layer is.
type LayerDigests struct {
	// Blob is the layer digest: the digest of the (compressed) blob, from
	// the layer's descriptor in the image manifest.
	Blob digest.Digest
	// DiffID is the digest of the uncompressed tar stream, from the image
	// config's rootfs.diff_ids.
	DiffID digest.Digest
}

// VerifyResult is what a verification pass measured.
type VerifyResult struct {
	// Blob and DiffID are the digests of the blob and of its uncompressed
	// stream, as computed (empty when the pass stopped before the end).
	Blob, DiffID digest.Digest
	// CompressedSize is the blob's size; UncompressedSize the size of its
	// uncompressed stream (past the end-of-archive marker too).
	CompressedSize, UncompressedSize int64
	// Entries and Spans are the TOC entries and spans that were checked.
	Entries, Spans int
}

// The parts of a layer that a MismatchError can name.
const (
	PartLayerDigest = "layer digest" // the blob's digest is not the layer digest
	PartDiffID      = "diff_id"      // the uncompressed stream's digest is not the diff_id
	PartCompression = "compression"  // the blob is not compressed as the zTOC says
	PartLayerSize   = "layer size"   // the blob's size is not the zTOC's compressed size
	PartArchiveSize = "archive size" // the tar archive's end is not the zTOC's uncompressed size
	PartEntry       = "entry"        // a TOC entry is not the layer's tar entry at its index
	PartCheckpoint  = "checkpoint"   // a checkpoint is not a genuine restart point of the stream
	PartSpanDigest  = "span digest"  // a span digest is not the digest of the span's bytes
)

// MismatchError reports that a layer and its zTOC, or the image's digests,
// disagree. Errors of any other type from VerifyLayer are I/O errors, or
// say that the layer itself is not a valid gzip or tar stream.
type MismatchError struct {
	// Part is one of the Part* constants.
	Part string
	// Index is the number of the entry, checkpoint or span; -1 when the
	// part is the layer as a whole.
	Index int
	// Field is what differs within an entry (see HeaderMismatchError) or
	// a checkpoint ("in", "bits", "out", "window"); empty otherwise.
	Field string
	// Got is what the layer has, Want what the zTOC or the image says.
	Got, Want string
	// Err is the underlying error: a *HeaderMismatchError for an entry.
	Err error
}

func (e *MismatchError) Error() string {
	what := e.Part
	if e.Index >= 0 {
		what = fmt.Sprintf("%s %d", e.Part, e.Index)
	}
	if e.Err != nil {
		return fmt.Sprintf("zTOC does not match the layer: %s: %v", what, e.Err)
	}
	if e.Field != "" {
		what += " " + e.Field
	}
	source := "zTOC"
	if e.Part == PartLayerDigest || e.Part == PartDiffID {
		source = "image"
	}
	return fmt.Sprintf("zTOC does not match the layer: %s: layer has %s, %s says %s", what, e.Got, source, e.Want)
}

func (e *MismatchError) Unwrap() error { return e.Err }

// VerifyLayer reads a whole layer blob once, as a stream, and checks that
// z describes it and that the blob is the image's layer: the digest of
// the blob is want.Blob, the digest of its uncompressed stream is
// want.DiffID, the tar entries and the TOC's are the same entries in the
// same order (every field, as CheckHeader compares them), every span
// digest hashes the span's bytes, and every checkpoint lies on a deflate
// block boundary of the real stream, at the compressed offset, leftover
// bits and uncompressed offset it claims, with a window equal to the 32
// KiB of real output before it. A disagreement is a *MismatchError naming
// what failed; when the blob is not the layer, that is reported first
// (the rest of the blob is still read to find out). Throughput is close
// to the builder's: the same stages run concurrently.
func VerifyLayer(ctx context.Context, compressed io.Reader, z *Ztoc, want LayerDigests) (VerifyResult, error) {
	for _, d := range []digest.Digest{want.Blob, want.DiffID} {
		if err := d.Validate(); err != nil {
			return VerifyResult{}, fmt.Errorf("verify layer: digest %q: %w", d, err)
		}
	}
	if err := z.Validate(); err != nil {
		return VerifyResult{}, fmt.Errorf("verify layer: %w", err)
	}
	v := &layerVerifier{z: z}
	v.toc.each = v.checkEntry
	if err := v.pass(ctx, compressed, want); err != nil {
		return v.result, err
	}
	return v.result, v.check(want)
}

// layerVerifier is one VerifyLayer pass: the builder's pipeline, with the
// checkpoint-recording inflate stage replaced by a checking one and a
// stage hashing the uncompressed stream.
type layerVerifier struct {
	z      *Ztoc
	layer  layerReader
	spans  spanRecorder // span digests of the real bytes
	toc    tocBuilder   // the real tar entries
	diff   hash.Hash
	result VerifyResult

	// Mismatches found mid-stream, by the inflate and tar stages. They
	// stop those stages, but the blob is still read to its end.
	streamErr, tarErr error
	// entries counts the layer's tar entries; entryErr is the first that
	// differs from its TOC entry (a *MismatchError).
	entries  int
	entryErr error
}

// pass runs the stages over the blob.
func (v *layerVerifier) pass(ctx context.Context, compressed io.Reader, want LayerDigests) error {
	g, ctx := errgroup.WithContext(ctx)
	v.layer = layerReader{r: compressed, hash: want.Blob.Algorithm().Hash()}
	v.diff = want.DiffID.Algorithm().Hash()
	inputs := make(chan chunk, inputChunks-1)
	stream := make(chan chunk, outputChunks-1)
	tarStream := make(chan chunk, outputChunks-1)
	hashed := make(chan hashChunk, inputChunks-2)
	g.Go(func() error { return v.layer.run(ctx, inputs) })
	g.Go(func() error {
		err := v.decompress(ctx, inputs, stream, hashed)
		if err != nil && ctx.Err() == nil {
			// The stream is not what the zTOC says (or not a stream at
			// all): keep reading the blob, to tell a wrong blob apart.
			v.streamErr = err
			close(stream)
			close(hashed)
			drain(ctx, inputs)
			return nil
		}
		return err
	})
	g.Go(func() error { return hashSpans(ctx, hashed, &v.spans) })
	g.Go(func() error { return hashStream(ctx, stream, tarStream, v.diff, &v.result.UncompressedSize) })
	g.Go(func() error {
		err := v.toc.run(ctx, tarStream)
		if err != nil && ctx.Err() == nil {
			v.tarErr = fmt.Errorf("layer tar stream: %w", err)
			drain(ctx, tarStream)
			return nil
		}
		return err
	})
	if err := g.Wait(); err != nil {
		return fmt.Errorf("verify layer: %w", err)
	}
	v.result.CompressedSize = v.layer.total
	v.result.Blob = digest.NewDigest(want.Blob.Algorithm(), v.layer.hash)
	if v.streamErr == nil && v.tarErr == nil {
		v.result.DiffID = digest.NewDigest(want.DiffID.Algorithm(), v.diff)
	}
	return nil
}

// check compares what the pass found with want and z, the most basic
// disagreement first: a blob that is not the layer, then the stream and
// the tar entries, then the digests and sizes the zTOC records.
func (v *layerVerifier) check(want LayerDigests) error {
	z, r := v.z, &v.result
	if r.Blob != want.Blob {
		return &MismatchError{Part: PartLayerDigest, Index: -1, Got: r.Blob.String(), Want: want.Blob.String()}
	}
	if v.streamErr != nil {
		return v.streamErr
	}
	if v.tarErr != nil {
		return v.tarErr
	}
	if r.DiffID != want.DiffID {
		return &MismatchError{Part: PartDiffID, Index: -1, Got: r.DiffID.String(), Want: want.DiffID.String()}
	}
	if r.CompressedSize != z.CompressedArchiveSize {
		return &MismatchError{Part: PartLayerSize, Index: -1, Got: fmt.Sprint(r.CompressedSize), Want: fmt.Sprint(z.CompressedArchiveSize)}
	}
	if err := v.checkEntries(); err != nil {
		return err
	}
	if v.toc.archiveSize != z.UncompressedArchiveSize {
		return &MismatchError{Part: PartArchiveSize, Index: -1, Got: fmt.Sprint(v.toc.archiveSize), Want: fmt.Sprint(z.UncompressedArchiveSize)}
	}
	for i, d := range v.spans.digests {
		if i < len(z.SpanDigests) && d != z.SpanDigests[i] {
			return &MismatchError{Part: PartSpanDigest, Index: i, Got: d.String(), Want: z.SpanDigests[i].String()}
		}
	}
	if len(v.spans.digests) != len(z.SpanDigests) {
		// Checkpoints are checked one by one, so this is a tar layer.
		return &MismatchError{Part: PartSpanDigest, Index: -1, Got: fmt.Sprintf("%d spans", len(v.spans.digests)), Want: fmt.Sprintf("%d spans", len(z.SpanDigests))}
	}
	r.Spans = len(z.SpanDigests)
	return nil
}

// checkEntry compares the layer's next tar entry with the TOC's entry of
// the same index, as CheckHeader compares one, and keeps the first
// mismatch.
func (v *layerVerifier) checkEntry(got *FileMetadata) {
	i, toc := v.entries, v.z.Files
	v.entries++
	if v.entryErr != nil {
		return
	}
	if i >= len(toc) {
		name, _ := ConfinedPath(got.Name)
		v.entryMismatch(i, &HeaderMismatchError{Name: name, Field: "name", Header: fmt.Sprintf("%q", got.Name), TOC: "no more entries"})
		return
	}
	if err := compareEntry(got, &toc[i]); err != nil {
		v.entryMismatch(i, err.(*HeaderMismatchError))
	}
}

// entryMismatch records hm, the mismatch of entry i.
func (v *layerVerifier) entryMismatch(i int, hm *HeaderMismatchError) {
	v.result.Entries = i // the entries that matched
	v.entryErr = &MismatchError{Part: PartEntry, Index: i, Field: hm.Field, Got: hm.Header, Want: hm.TOC, Err: hm}
}

// checkEntries reports the first entry that differs from the TOC's, or a
// TOC with more entries than the layer.
func (v *layerVerifier) checkEntries() error {
	if v.entryErr != nil {
		return v.entryErr
	}
	if toc := v.z.Files; v.entries < len(toc) {
		name, _ := ConfinedPath(toc[v.entries].Name)
		v.entryMismatch(v.entries, &HeaderMismatchError{Name: name, Field: "header", Header: "the end of the archive", TOC: fmt.Sprintf("a %s entry", toc[v.entries].Type)})
		return v.entryErr
	}
	v.result.Entries = v.entries
	return nil
}

// decompress is VerifyLayer's second stage: the builder's, but a gzip
// layer goes through gzipChecker, which checks the zTOC's checkpoints
// instead of choosing its own.
func (v *layerVerifier) decompress(ctx context.Context, inputs <-chan chunk, stream chan<- chunk, hashed chan<- hashChunk) error {
	first, ok, err := recv(ctx, inputs)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("layer is empty")
	}
	isGzip := bytes.HasPrefix(first.data, gzipMagic)
	if isGzip != (v.z.Algorithm == Gzip) {
		first.release()
		got := Uncompressed
		if isGzip {
			got = Gzip
		}
		return &MismatchError{Part: PartCompression, Index: -1, Got: got.String(), Want: v.z.Algorithm.String()}
	}
	if isGzip {
		err = v.checkGzip(ctx, first, inputs, stream, hashed)
	} else {
		err = v.passTar(ctx, first, inputs, stream)
	}
	if err != nil {
		return err
	}
	close(stream)
	close(hashed)
	return nil
}

// passTar hashes the fixed-size spans of a tar layer as the builder does.
func (v *layerVerifier) passTar(ctx context.Context, first chunk, inputs <-chan chunk, stream chan<- chunk) error {
	spanSize, err := v.z.SpanSize()
	if err != nil {
		first.release()
		return err
	}
	return passTar(ctx, first, inputs, stream, spanSize, &v.spans)
}

// checkGzip inflates a gzip layer, checking the zTOC's checkpoints.
func (v *layerVerifier) checkGzip(ctx context.Context, first chunk, inputs <-chan chunk, stream chan<- chunk, hashed chan<- hashChunk) error {
	zi, err := v.z.gzipZinfo()
	if err == nil && v.z.windowless != nil && v.z.windows == nil {
		err = errors.New("the zTOC's checkpoints have no windows (attach the pack's windows blob)")
	}
	if err != nil {
		first.release()
		return err
	}
	// A small layer needs no 1 MiB output chunks (the chunk size does not
	// change what is checked).
	outSize := int(min(int64(outputChunkSize), max(v.z.UncompressedArchiveSize, 64<<10)))
	return checkInflate(ctx, first, inputs, stream, hashed, checkpoints{list: zi.Checkpoints, windows: v.z.windows}, outSize)
}

// hashStream hashes the uncompressed stream on its way from the inflate
// stage to the tar stage, counting its bytes in n.
func hashStream(ctx context.Context, in <-chan chunk, out chan<- chunk, h hash.Hash, n *int64) error {
	for {
		c, ok, err := recv(ctx, in)
		if err != nil {
			return err
		}
		if !ok {
			close(out)
			return nil
		}
		h.Write(c.data)
		*n += int64(len(c.data))
		if err := send(ctx, out, c); err != nil {
			return err
		}
	}
}

// drain releases every chunk left in ch, so that the stages before it run
// to the end of the blob.
func drain(ctx context.Context, ch <-chan chunk) {
	for {
		c, ok, err := recv(ctx, ch)
		if err != nil || !ok {
			return
		}
		c.release()
	}
}
