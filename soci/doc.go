// Package soci is spanpull's indexing engine. It makes an image that is
// already in a registry lazily pullable: every gzip or tar layer is streamed
// once from the registry through the zTOC builder, and the zTOCs are
// published next to the image as a SOCI index, either attached to the image
// as an OCI referrer (Create, SOCI index v1) or inside a SOCI-enabled copy of
// the image (Convert, SOCI index v2). It also finds the SOCI indexes an image
// already has (Discover, FindIndex, List, Info): the indexer reuses their
// zTOCs, the inspection commands list them, and the snapshotter's resolver
// picks the one it mounts, all through the same discovery code.
//
// The engine is shaped by what indexing in CI needs:
//
//   - It works from registry to registry (package registry): layers are
//     streamed, never stored, and the layer blobs of a converted image are
//     mounted across repositories rather than copied through the indexer.
//   - A layer is indexed at most once per run however many platforms share
//     it, and not at all when the destination registry or the local cache
//     already has its zTOC for the span size: base layers are shared by many
//     images, and streaming them is the whole cost of indexing.
//   - One failing platform does not stop the others. What happened to each
//     platform and layer is a result (PlatformResult, LayerResult); an error
//     is returned only when the run as a whole cannot go on.
//   - It prints nothing. Progress reaches the caller through an Observer and
//     results are structs, so a command line, a CI plugin or a test decides
//     what to show. Flags and their spelling belong to the caller; the
//     defaults they show are defined here, once.
package soci
