package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"

	"github.com/spanpull/spanpull/internal/atomicfile"
)

// RemoteLayer is a snapshot served lazily from a remote layer: what is
// needed to mount it again after a restart without asking the registry
// for the index.
type RemoteLayer struct {
	// Key is the snapshot key.
	Key         string        `json:"key"`
	LayerDigest digest.Digest `json:"layerDigest"`
	ZtocDigest  digest.Digest `json:"ztocDigest"`
	// IndexDigest is the SOCI index the zTOC came from.
	IndexDigest digest.Digest `json:"indexDigest"`
	// ImageRef is the image reference to fetch spans from.
	ImageRef string `json:"imageRef"`
	// Mountpoint is where the layer's FUSE filesystem is mounted.
	Mountpoint string `json:"mountpoint"`
}

func (l *RemoteLayer) validate() error {
	if l.Key == "" {
		return errors.New("empty snapshot key")
	}
	for _, d := range []struct {
		name string
		d    digest.Digest
	}{{"layer", l.LayerDigest}, {"zTOC", l.ZtocDigest}, {"index", l.IndexDigest}} {
		if err := d.d.Validate(); err != nil {
			return fmt.Errorf("%s digest %q: %w", d.name, d.d, err)
		}
	}
	return nil
}

var bucketLayers = []byte("remote-layers.v1")

// MetaStore records the remote layers in a bbolt database (<root>/meta.db)
// and their zTOC blobs as files (<root>/ztocs/<hex>), shared by the layers
// that use the same zTOC. It is safe for concurrent use.
type MetaStore struct {
	db       *bolt.DB
	ztocsDir string
	// mu orders the changes that span the database and the zTOC files,
	// so that a zTOC is never deleted while a layer record needs it.
	mu sync.Mutex
}

// OpenMetaStore opens (creating it if needed) the metadata store under
// root. It fails rather than waits when another process holds the
// database.
func OpenMetaStore(root string) (*MetaStore, error) {
	ztocs := filepath.Join(root, "ztocs")
	if err := os.MkdirAll(ztocs, 0o700); err != nil {
		return nil, fmt.Errorf("create metadata store: %w", err)
	}
	if err := atomicfile.RemoveTemp(ztocs); err != nil {
		return nil, fmt.Errorf("open metadata store: %w", err)
	}
	dbPath := filepath.Join(root, "meta.db")
	db, err := bolt.Open(dbPath, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open metadata database %s: %w", dbPath, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketLayers)
		return err
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init metadata database %s: %w", dbPath, err)
	}
	return &MetaStore{db: db, ztocsDir: ztocs}, nil
}

// Close closes the database.
func (m *MetaStore) Close() error { return m.db.Close() }

func (m *MetaStore) ztocPath(d digest.Digest) string {
	return filepath.Join(m.ztocsDir, d.Encoded())
}

// PutLayer records a remote layer (replacing the record of the same key)
// and stores its zTOC blob, which must match l.ZtocDigest.
func (m *MetaStore) PutLayer(ctx context.Context, l RemoteLayer, ztocBlob []byte) error {
	if err := l.validate(); err != nil {
		return fmt.Errorf("record remote layer %q: %w", l.Key, err)
	}
	if got := l.ZtocDigest.Algorithm().FromBytes(ztocBlob); got != l.ZtocDigest {
		return fmt.Errorf("record remote layer %q: zTOC blob has digest %s, want %s", l.Key, got, l.ZtocDigest)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("record remote layer %q: %w", l.Key, err)
	}
	v, err := json.Marshal(l)
	if err != nil {
		return fmt.Errorf("record remote layer %q: %w", l.Key, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	// Written every time (atomically), so that a damaged copy heals.
	if err := atomicfile.WriteFile(m.ztocsDir, l.ZtocDigest.Encoded(), ztocBlob); err != nil {
		return fmt.Errorf("record remote layer %q: store zTOC %s: %w", l.Key, l.ZtocDigest, err)
	}
	var old *RemoteLayer
	err = m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLayers)
		if prev := b.Get([]byte(l.Key)); prev != nil {
			old = new(RemoteLayer)
			if err := json.Unmarshal(prev, old); err != nil {
				old = nil
			}
		}
		return b.Put([]byte(l.Key), v)
	})
	if err != nil {
		return fmt.Errorf("record remote layer %q: %w", l.Key, err)
	}
	if old != nil && old.ZtocDigest != l.ZtocDigest {
		return m.pruneZtoc(old.ZtocDigest)
	}
	return nil
}

// GetLayer returns the record of a snapshot key, or an error wrapping
// ErrNotFound.
func (m *MetaStore) GetLayer(ctx context.Context, key string) (RemoteLayer, error) {
	var l RemoteLayer
	err := m.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketLayers).Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		return json.Unmarshal(v, &l)
	})
	if err != nil {
		return RemoteLayer{}, fmt.Errorf("get remote layer %q: %w", key, err)
	}
	return l, nil
}

// ListLayers returns every record, sorted by key.
func (m *MetaStore) ListLayers(ctx context.Context) ([]RemoteLayer, error) {
	var ls []RemoteLayer
	err := m.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			var l RemoteLayer
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("record %q: %w", k, err)
			}
			ls = append(ls, l)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("list remote layers: %w", err)
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].Key < ls[j].Key })
	return ls, nil
}

// DeleteLayer deletes the record of a snapshot key, and its zTOC blob
// when no other record uses it. It returns an error wrapping ErrNotFound
// when there is no such record.
func (m *MetaStore) DeleteLayer(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete remote layer %q: %w", key, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var l RemoteLayer
	err := m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLayers)
		v := b.Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		if err := json.Unmarshal(v, &l); err != nil {
			return err
		}
		return b.Delete([]byte(key))
	})
	if err != nil {
		return fmt.Errorf("delete remote layer %q: %w", key, err)
	}
	return m.pruneZtoc(l.ZtocDigest)
}

// pruneZtoc deletes a zTOC blob that no record uses. m.mu must be held.
func (m *MetaStore) pruneZtoc(d digest.Digest) error {
	used := false
	err := m.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			var l RemoteLayer
			if json.Unmarshal(v, &l) == nil && l.ZtocDigest == d {
				used = true
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("check users of zTOC %s: %w", d, err)
	}
	if used {
		return nil
	}
	if err := os.Remove(m.ztocPath(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete zTOC %s: %w", d, err)
	}
	return nil
}

// Ztoc returns a stored zTOC blob, checked against its digest, or an
// error wrapping ErrNotFound.
func (m *MetaStore) Ztoc(ctx context.Context, d digest.Digest) ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("read zTOC %q: %w", d, err)
	}
	b, err := os.ReadFile(m.ztocPath(d))
	if err != nil {
		return nil, fmt.Errorf("read zTOC %s: %w", d, notFound(err))
	}
	if got := d.Algorithm().FromBytes(b); got != d {
		return nil, fmt.Errorf("read zTOC %s: stored blob has digest %s", d, got)
	}
	return b, nil
}

// notFound wraps ErrNotFound around a missing file's error.
func notFound(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return err
}
