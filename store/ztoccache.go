package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"

	"github.com/spanpull/spanpull/internal/atomicfile"
)

// ZtocCache remembers the zTOCs this machine built, keyed by (layer digest,
// span size), so that indexing the same layer again (a shared base layer of
// many images, a re-run of CI) does not stream and inflate it again, and
// the pack of each zTOC (ztoc.MarshalPack), keyed by zTOC digest: a pack
// built with the layer has a chunk table that one rebuilt from a reused
// zTOC cannot have. The index lives in bbolt; the blobs are files named by
// their digest.
type ZtocCache struct {
	db  *bolt.DB
	dir string
}

var (
	ztocBucket = []byte("ztocs")
	packBucket = []byte("packs") // zTOC digest -> "<head digest> <windows digest>"
)

// OpenZtocCache opens (creating) the cache in dir. It waits at most a few
// seconds for another process that holds the cache open.
func OpenZtocCache(dir string) (*ZtocCache, error) {
	blobs := filepath.Join(dir, "blobs")
	if err := makeBlobDir(blobs, 0o755); err != nil {
		return nil, fmt.Errorf("open zTOC cache: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dir, "ztocs.db"), 0o644, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open zTOC cache %s: %w", dir, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{ztocBucket, packBucket} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("open zTOC cache %s: %w", dir, err)
	}
	return &ZtocCache{db: db, dir: dir}, nil
}

// Close releases the cache.
func (c *ZtocCache) Close() error { return c.db.Close() }

func ztocKey(layer digest.Digest, spanSize int64) []byte {
	k := binary.BigEndian.AppendUint64(nil, uint64(spanSize))
	return append(k, layer...)
}

// Get returns the cached zTOC of layer at spanSize. ok is false when there
// is none (or its blob is gone or damaged, which is treated as a miss).
func (c *ZtocCache) Get(layer digest.Digest, spanSize int64) (b []byte, d digest.Digest, ok bool, err error) {
	err = c.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(ztocBucket).Get(ztocKey(layer, spanSize)); v != nil {
			d = digest.Digest(v)
		}
		return nil
	})
	if err != nil || d == "" {
		return nil, "", false, err
	}
	b, ok, err = c.readBlob("zTOC", d)
	if !ok {
		return nil, "", false, err
	}
	return b, d, true, nil
}

// readBlob reads blob d; ok is false when it is missing or damaged.
func (c *ZtocCache) readBlob(what string, d digest.Digest) (b []byte, ok bool, err error) {
	if d.Validate() != nil {
		return nil, false, nil
	}
	b, err = os.ReadFile(filepath.Join(c.dir, "blobs", d.Encoded()))
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read cached %s %s: %w", what, d, err)
	}
	if digest.FromBytes(b) != d {
		return nil, false, nil
	}
	return b, true, nil
}

// writeBlob stores b under its digest and returns the digest.
func (c *ZtocCache) writeBlob(what string, b []byte) (digest.Digest, error) {
	d := digest.FromBytes(b)
	if err := atomicfile.WriteFile(filepath.Join(c.dir, "blobs"), d.Encoded(), b); err != nil {
		return "", fmt.Errorf("cache %s %s: %w", what, d, err)
	}
	return d, nil
}

// Put records zTOC bytes b as the zTOC of layer at spanSize.
func (c *ZtocCache) Put(layer digest.Digest, spanSize int64, b []byte) error {
	d, err := c.writeBlob("zTOC", b)
	if err != nil {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(ztocBucket).Put(ztocKey(layer, spanSize), []byte(d))
	})
}

// GetPack returns the cached pack (head and windows blobs) of the zTOC
// with digest ztoc. ok is false when there is none (or a blob of it is
// gone or damaged).
func (c *ZtocCache) GetPack(ztoc digest.Digest) (head, windows []byte, ok bool, err error) {
	var v string
	err = c.db.View(func(tx *bolt.Tx) error {
		v = string(tx.Bucket(packBucket).Get([]byte(ztoc)))
		return nil
	})
	hd, wd, found := strings.Cut(v, " ")
	if err != nil || !found {
		return nil, nil, false, err
	}
	if head, ok, err = c.readBlob("pack head", digest.Digest(hd)); !ok {
		return nil, nil, false, err
	}
	if windows, ok, err = c.readBlob("pack windows", digest.Digest(wd)); !ok {
		return nil, nil, false, err
	}
	return head, windows, true, nil
}

// PutPack records head and windows as the pack of the zTOC with digest
// ztoc, replacing any pack recorded before.
func (c *ZtocCache) PutPack(ztoc digest.Digest, head, windows []byte) error {
	hd, err := c.writeBlob("pack head", head)
	if err != nil {
		return err
	}
	wd, err := c.writeBlob("pack windows", windows)
	if err != nil {
		return err
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(packBucket).Put([]byte(ztoc), []byte(hd.String()+" "+wd.String()))
	})
}
