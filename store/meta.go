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
	// HeadDigest, when set, says that the layer is mounted from the pack
	// head of its zTOC (the stored blob) rather than from the zTOC, and
	// WindowsDigest and WindowsSize name the pack's windows blob.
	HeadDigest    digest.Digest `json:"headDigest,omitempty"`
	WindowsDigest digest.Digest `json:"windowsDigest,omitempty"`
	WindowsSize   int64         `json:"windowsSize,omitempty"`
	// LayerSize and LayerMediaType describe the layer blob, as the image
	// manifest does.
	LayerSize      int64  `json:"layerSize,omitempty"`
	LayerMediaType string `json:"layerMediaType,omitempty"`
	// ManifestDigest is the image manifest the layer was mounted for, and
	// DiffID the layer's uncompressed digest from that image's config:
	// with LayerDigest, what the layer is verified against.
	ManifestDigest digest.Digest `json:"manifestDigest,omitempty"`
	DiffID         digest.Digest `json:"diffID,omitempty"`
	// Verification is the layer's last known verification state
	// ("unverified", "verified", "quarantined").
	Verification string `json:"verification,omitempty"`
}

// BlobDigest is the digest of the stored blob the layer is mounted from:
// its pack head, or else its zTOC.
func (l *RemoteLayer) BlobDigest() digest.Digest {
	if l.HeadDigest != "" {
		return l.HeadDigest
	}
	return l.ZtocDigest
}

func (l *RemoteLayer) validate() error {
	if l.Key == "" {
		return errors.New("empty snapshot key")
	}
	for _, d := range []struct {
		name string
		d    digest.Digest
	}{{"layer", l.LayerDigest}, {"zTOC", l.ZtocDigest}, {"index", l.IndexDigest}, {"head", l.HeadDigest},
		{"windows", l.WindowsDigest}, {"manifest", l.ManifestDigest}, {"diff ID", l.DiffID}} {
		if d.d == "" && d.name != "layer" && d.name != "zTOC" && d.name != "index" {
			continue // optional
		}
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
	if err := makeBlobDir(ztocs, 0o700); err != nil {
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
// and stores the blob it is mounted from, which must match l.BlobDigest().
func (m *MetaStore) PutLayer(ctx context.Context, l RemoteLayer, blob []byte) error {
	if err := l.validate(); err != nil {
		return fmt.Errorf("record remote layer %q: %w", l.Key, err)
	}
	bd := l.BlobDigest()
	if got := bd.Algorithm().FromBytes(blob); got != bd {
		return fmt.Errorf("record remote layer %q: zTOC blob has digest %s, want %s", l.Key, got, bd)
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
	if err := atomicfile.WriteFile(m.ztocsDir, bd.Encoded(), blob); err != nil {
		return fmt.Errorf("record remote layer %q: store zTOC %s: %w", l.Key, bd, err)
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
	if old != nil && old.BlobDigest() != bd {
		return m.pruneZtoc(old.BlobDigest())
	}
	return nil
}

// SetVerification records the verification state of the layer of key.
func (m *MetaStore) SetVerification(ctx context.Context, key, state string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketLayers)
		v := b.Get([]byte(key))
		if v == nil {
			return ErrNotFound
		}
		var l RemoteLayer
		if err := json.Unmarshal(v, &l); err != nil {
			return err
		}
		l.Verification = state
		nv, err := json.Marshal(l)
		if err != nil {
			return err
		}
		return b.Put([]byte(key), nv)
	})
	if err != nil {
		return fmt.Errorf("record verification of remote layer %q: %w", key, err)
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
	return m.pruneZtoc(l.BlobDigest())
}

// pruneZtoc deletes a zTOC blob that no record uses. m.mu must be held.
func (m *MetaStore) pruneZtoc(d digest.Digest) error {
	used := false
	err := m.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			var l RemoteLayer
			if json.Unmarshal(v, &l) == nil && l.BlobDigest() == d {
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

// BlobPath is the file holding stored blob d (a zTOC or a pack head) while
// a record uses it: the runtime maps it into memory rather than keeping a
// copy. The file must not be written.
func (m *MetaStore) BlobPath(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("stored blob %q: %w", d, err)
	}
	return m.ztocPath(d), nil
}

// Ztoc returns a stored blob (a zTOC or a pack head), checked against its
// digest, or an error wrapping ErrNotFound.
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
