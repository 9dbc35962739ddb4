package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"

	"github.com/spanpull/spanpull/internal/atomicfile"
)

// ZtocCache remembers the zTOCs this machine built, keyed by (layer digest,
// span size), so that indexing the same layer again (a shared base layer of
// many images, a re-run of CI) does not stream and inflate it again. The
// index lives in bbolt; the zTOC blobs are files named by their digest.
type ZtocCache struct {
	db  *bolt.DB
	dir string
}

var ztocBucket = []byte("ztocs")

// OpenZtocCache opens (creating) the cache in dir. It waits at most a few
// seconds for another process that holds the cache open.
func OpenZtocCache(dir string) (*ZtocCache, error) {
	blobs := filepath.Join(dir, "blobs")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return nil, fmt.Errorf("open zTOC cache: %w", err)
	}
	if err := atomicfile.RemoveTemp(blobs); err != nil {
		return nil, fmt.Errorf("open zTOC cache: %w", err)
	}
	db, err := bolt.Open(filepath.Join(dir, "ztocs.db"), 0o644, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open zTOC cache %s: %w", dir, err)
	}
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(ztocBucket)
		return err
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
	if d.Validate() != nil {
		return nil, "", false, nil
	}
	b, err = os.ReadFile(filepath.Join(c.dir, "blobs", d.Encoded()))
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", false, nil
	}
	if err != nil {
		return nil, "", false, fmt.Errorf("read cached zTOC %s: %w", d, err)
	}
	if digest.FromBytes(b) != d {
		return nil, "", false, nil
	}
	return b, d, true, nil
}

// Put records zTOC bytes b as the zTOC of layer at spanSize.
func (c *ZtocCache) Put(layer digest.Digest, spanSize int64, b []byte) error {
	d := digest.FromBytes(b)
	if err := atomicfile.WriteFile(filepath.Join(c.dir, "blobs"), d.Encoded(), b); err != nil {
		return fmt.Errorf("cache zTOC %s: %w", d, err)
	}
	return c.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(ztocBucket).Put(ztocKey(layer, spanSize), []byte(d))
	})
}
