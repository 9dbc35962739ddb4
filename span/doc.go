// Package span is the read engine of lazily pulled layers. Given a layer's
// zTOC and a BlobReader over its compressed blob, a Layer serves any byte
// range of the layer's uncompressed tar stream (and any file of the layer)
// by fetching only the compressed bytes the range needs, verifying them
// and inflating them from the span's checkpoint.
//
// What is fetched: for a span without chunk marks, the whole span in one
// range read, verified against the span digest of the zTOC. For a span
// with chunk marks (ztoc.Ztoc.Chunks), the span from its start through the
// first chunk whose mark covers the end of the read, in one range read,
// each chunk verified against its digest; a later read past that prefix
// fetches only missing chunks (growing the prefix fourfold at least), and
// a span completed that way is checked against its span digest as well.
// No byte reaches a reader before the bytes it was inflated from were
// verified.
//
// Where bytes are kept: a Cache keeps verified compressed bytes on disk
// (whole spans or verified prefixes, plus the blob's header bytes), within
// a byte budget, least recently used first out, across all layers of a
// daemon; a MemoryCache keeps recently inflated spans, so that small
// reads in one span inflate it once. Bytes read back from disk are
// verified again. A write the disk refuses is not an error: the read is
// served from memory and the bytes are written when next loaded.
//
// Who fetches: a Scheduler shared by the layers of a daemon orders three
// classes of fetches. Demand fetches (reads a container waits on) start at
// once; Prefetch fetches listed spans beside them, a few at a time; Fill
// completes a layer in the background only while no demand or prefetch
// fetch is queued or in flight and once the layer has been quiet. Every
// fetch, whatever its class, goes through one verified path
// (Layer.startLoad, Layer.fetchChunks). A failed demand fetch is
// remembered briefly, so that the kernel's retry of a failed read fails at
// once rather than after another fetch timeout.
//
// The whole blob: once Fill made a layer Complete, OpenBlob streams its
// compressed blob from the cache for the pass that verifies the layer
// against its digest (the header bytes are verified only there).
//
// The snapshotter (through the resolver) serves FUSE reads, prefetch and
// fill from Layers sharing one Cache, MemoryCache and Scheduler; the
// indexer's "ztoc get-file" reads one file through a Layer with none. The
// zTOC primitives (span table, VerifySpan, InflateRange, file fragments)
// stay in package ztoc, which does no I/O.
package span
