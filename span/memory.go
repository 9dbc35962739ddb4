package span

import (
	"container/list"
	"sync"

	"github.com/spanpull/spanpull/ztoc"
)

// DefaultMemoryBytes is the size of the daemon's MemoryCache unless its
// config says otherwise: eight inflated 4 MiB spans, enough for the spans
// a container start reads in turn, and small enough that the daemon's
// peak RSS stays near 100 MiB (BENCHMARKS.md) with the fetches in flight.
const DefaultMemoryBytes = 32 << 20

// MemoryCache keeps recently inflated spans in memory, across the layers
// of a daemon, so that a run of small reads in one span (a file read 128
// KiB at a time, the files of a directory) inflates the span once rather
// than once per read from its checkpoint. It also holds the verified
// compressed bytes that the disk cache could not take (full disk), so that
// they are not fetched again while they stay here. The least recently used
// spans go first. Pass one MemoryCache to every Layer of a daemon
// (Options.Memory).
type MemoryCache struct {
	max int64

	mu      sync.Mutex
	lru     list.List // of *memEntry, most recently used first
	entries map[memKey]*list.Element
	total   int64
}

// NewMemoryCache returns a MemoryCache holding at most maxBytes (0: it
// holds nothing).
func NewMemoryCache(maxBytes int64) *MemoryCache {
	return &MemoryCache{max: maxBytes, entries: make(map[memKey]*list.Element)}
}

type memKey struct {
	l  *Layer
	id ztoc.SpanID
}

// inflated is what memory holds of one span. Its slices are never written
// once stored.
type inflated struct {
	// out is the span's uncompressed bytes from its start (nil: none).
	out []byte
	// comp is the span's verified compressed bytes from its start, kept
	// only while the disk cache does not hold them (nil: none).
	comp []byte
	// chunks is how many of the span's chunks out was inflated from (or
	// comp holds).
	chunks int
}

func (v inflated) bytes() int64 { return int64(len(v.out) + len(v.comp)) }

type memEntry struct {
	key memKey
	v   inflated
}

// get returns what memory holds of span id of layer l, marking it used.
func (m *MemoryCache) get(l *Layer, id ztoc.SpanID) (inflated, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	el := m.entries[memKey{l, id}]
	if el == nil {
		return inflated{}, false
	}
	m.lru.MoveToFront(el)
	return el.Value.(*memEntry).v, true
}

// put stores v for span id of layer l. It keeps the entry there when that
// was inflated from more chunks, and keeps its inflated bytes when v has
// none from as many chunks.
func (m *MemoryCache) put(l *Layer, id ztoc.SpanID, v inflated) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k := memKey{l, id}
	if el := m.entries[k]; el != nil {
		old := el.Value.(*memEntry).v
		if old.chunks > v.chunks {
			return
		}
		if v.out == nil && old.chunks == v.chunks {
			v.out = old.out
		}
		m.remove(el)
	}
	if v.bytes() == 0 || v.bytes() > m.max {
		return
	}
	m.entries[k] = m.lru.PushFront(&memEntry{key: k, v: v})
	m.total += v.bytes()
	for m.total > m.max {
		m.remove(m.lru.Back())
	}
}

// remove drops an entry. m.mu must be held.
func (m *MemoryCache) remove(el *list.Element) {
	e := m.lru.Remove(el).(*memEntry)
	delete(m.entries, e.key)
	m.total -= e.v.bytes()
}

// dropLayer forgets every span of layer l.
func (m *MemoryCache) dropLayer(l *Layer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for el := m.lru.Front(); el != nil; {
		next := el.Next()
		if el.Value.(*memEntry).key.l == l {
			m.remove(el)
		}
		el = next
	}
}
