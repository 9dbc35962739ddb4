package soci

import (
	"context"
	"errors"
	"fmt"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/index"
	"github.com/spanpull/spanpull/ztoc"
)

// maxReusedZtocSize bounds a zTOC fetched from the destination registry to
// make its pack (SOCI's zTOCs are a few percent of a layer; this leaves
// room for multi-GB layers).
const maxReusedZtocSize = 1 << 30

// publishPack encodes the pack of zTOC z, the zTOC of res, pushes it to
// dst and caches it, and records it in res.
func (ix *indexer) publishPack(ctx context.Context, res *LayerResult, z *ztoc.Ztoc) error {
	head, windows, err := ztoc.MarshalPack(z, res.Ztoc.Digest, res.Ztoc.Size)
	if err != nil {
		return fmt.Errorf("layer %s: %w", res.Layer.Digest, err)
	}
	if err := ix.pushPack(ctx, res, head, windows); err != nil {
		return err
	}
	if ix.opts.Cache != nil {
		if err := ix.opts.Cache.PutPack(res.Ztoc.Digest, head, windows); err != nil {
			res.CacheErr = errors.Join(res.CacheErr, err)
		}
	}
	return nil
}

// pushPack pushes a pack's blobs to dst (the windows blob only when it is
// not empty) and records the pack in res.
func (ix *indexer) pushPack(ctx context.Context, res *LayerResult, head, windows []byte) error {
	hd, err := ix.dst.PushBlobBytes(ctx, index.MediaTypePackHead, head)
	if err != nil {
		return err
	}
	p := index.Pack{LayerDigest: res.Layer.Digest, Ztoc: res.Ztoc.Digest, Head: hd}
	if len(windows) > 0 {
		if p.Windows, err = ix.dst.PushBlobBytes(ctx, index.MediaTypePackWindows, windows); err != nil {
			return err
		}
	}
	res.Pack = p
	return nil
}

// reusePack gives the reused zTOC of res its pack: the one an index in dst
// lists, the cached one, or one made from the zTOC (zb, fetched from dst
// when nil), which has no chunk table since the layer is not read.
func (ix *indexer) reusePack(ctx context.Context, res *LayerResult, zb []byte) error {
	if ix.opts.NoPack {
		return nil
	}
	zd := res.Ztoc
	if p, ok := ix.existingPacks[zd.Digest]; ok {
		res.Pack = p
		res.Pack.LayerDigest = res.Layer.Digest
		return nil
	}
	if head, windows, ok := ix.cachedPack(zd); ok {
		return ix.pushPack(ctx, res, head, windows)
	}
	if zb == nil {
		var err error
		if zb, err = ix.dst.FetchBlobBytes(ctx, zd, maxReusedZtocSize); err != nil {
			return err
		}
	}
	z, err := ztoc.Unmarshal(zb)
	if err != nil {
		return fmt.Errorf("zTOC %s: %w", zd.Digest, err)
	}
	return ix.publishPack(ctx, res, z)
}

// cachedPack returns the cached pack of zTOC zd, if the cache has one that
// decodes and names zd (a damaged or foreign one is a miss).
func (ix *indexer) cachedPack(zd ocispec.Descriptor) (head, windows []byte, ok bool) {
	if ix.opts.Cache == nil {
		return nil, nil, false
	}
	head, windows, ok, err := ix.opts.Cache.GetPack(zd.Digest)
	if err != nil || !ok {
		return nil, nil, false
	}
	h, err := ztoc.UnmarshalPackHead(head)
	if err != nil || h.ZtocDigest != zd.Digest || h.ZtocSize != zd.Size ||
		h.WindowsSize != int64(len(windows)) || h.WindowsDigest != digest.FromBytes(windows) {
		return nil, nil, false
	}
	return head, windows, true
}

// addExistingPacks records the packs of index sx whose blobs are in dst.
func (ix *indexer) addExistingPacks(ctx context.Context, sx *index.Index) {
	for _, p := range sx.Packs {
		if _, seen := ix.existingPacks[p.Ztoc]; seen {
			continue
		}
		blobs := []ocispec.Descriptor{p.Head}
		if p.Windows.Digest != "" {
			blobs = append(blobs, p.Windows)
		}
		ok := true
		for _, d := range blobs {
			if found, err := ix.dst.Exists(ctx, d); err != nil || !found {
				ok = false
			}
		}
		if ok {
			ix.existingPacks[p.Ztoc] = p
		}
	}
}

// indexPacks returns the packs of the zTOCs of layers, once per zTOC, in
// layer order.
func indexPacks(layers []LayerResult) []index.Pack {
	var packs []index.Pack
	seen := make(map[digest.Digest]bool)
	for _, r := range layers {
		if r.Ztoc.Digest == "" || r.Pack.Head.Digest == "" || seen[r.Pack.Ztoc] {
			continue
		}
		seen[r.Pack.Ztoc] = true
		packs = append(packs, r.Pack)
	}
	return packs
}
