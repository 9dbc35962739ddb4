// Package span is the read engine of lazily pulled layers. Given a layer's
// zTOC and a BlobReader over its compressed blob, a Layer serves any byte
// range of the layer's uncompressed tar stream (and any file of the
// layer) by fetching only the compressed spans the range covers, one range
// read per span, verifying each against the span digest the zTOC records
// and inflating it from its checkpoint. Concurrent reads of a span share
// one fetch; a Cache, when given, keeps inflated spans on disk so that a
// span is fetched once.
//
// The snapshotter (through the resolver) serves FUSE reads, prefetch and
// background fill from a Layer with a Cache; the indexer's "ztoc get-file"
// reads one file through a Layer without one. The zTOC primitives (span
// table, VerifySpan, InflateRange, file fragments) stay in package ztoc,
// which does no I/O.
//
// Where the engine grows:
//   - Every compressed byte enters through one method, Layer.fetchSpan
//     (range read, verify, re-fetch on mismatch), and every fetch is
//     started in one place, Layer.startFetch. A fetch scheduler (demand
//     reads first, then prefetch lists, then background fill, with bounded
//     parallelism) belongs in startFetch.
//   - The Layer sees the cache only through Cache's small API (Has, Open,
//     Put, RemoveLayer); a bounded cache with LRU eviction changes Cache's
//     insides, not the Layer. A CachedSpan stays readable after its span
//     is removed, so eviction never breaks a read in progress.
//   - Files are read through Layer.WriteFile, one range of the stream per
//     file fragment: per-file verification goes there.
package span
