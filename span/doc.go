// Package span is the read engine of lazily pulled layers. Given a layer's
// zTOC and a BlobReader over its compressed blob, a Layer serves any byte
// range of the layer's uncompressed tar stream (and any file of the layer)
// by fetching only the compressed bytes the range needs, verifying them
// and inflating them from the span's checkpoint.
//
// What is fetched: a read that misses fetches its whole span in one range
// read, and is served as soon as the bytes it needs arrived: with chunk
// marks (ztoc.Ztoc.Chunks), each chunk is verified against its digest as
// it comes and inflated right after, so the read waits for the chunks
// from the span start through the one that covers it, not for the rest of
// the span; the whole span is then checked against its span digest. A
// span without marks is one chunk, verified against its span digest
// before anything is inflated. No byte reaches a reader before the bytes
// it was inflated from were verified. Fetching the rest of the span in
// the same request costs bytes but saves the round trips that later reads
// of the span would take (BENCHMARKS.md, "Whole spans, streamed"): over a
// link with 20 ms of round trip, a start that reads files one after the
// other is bound by round trips, not by bytes. ReadAtExact fetches less:
// the chunks through the one that covers its read, for reads that nothing
// else of the span is likely to follow (the tar header of a symlink,
// checked before the link is served); a later read of the span fetches
// the chunks it lacks.
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
// (Layer.startLoad, Layer.openChunks). A failed demand fetch is
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
