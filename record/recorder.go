package record

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/spanpull/spanpull/ztoc"
)

// Defaults of the recorder (Config, Options).
const (
	// DefaultWindow is how long after a layer's mount its accesses are
	// recorded: a start reads what it needs within seconds, and what comes
	// later is the workload, not its start.
	DefaultWindow = 60 * time.Second
	// DefaultMaxEntries bounds the spans plus files recorded per layer (a
	// Python start reads a few hundred files).
	DefaultMaxEntries = 100_000
	// maxImages is how many images' records a Store keeps; the oldest is
	// dropped first.
	maxImages = 64
)

// ErrNoRecord says that a daemon has no record of an image: it mounted no
// layer of it lazily since it started (or since the record was dropped).
var ErrNoRecord = errors.New("no access record")

// Config is the [record] table of the daemon's config file.
type Config struct {
	// Disable turns recording off.
	Disable bool `toml:"disable"`
	// WindowSeconds is how long after a layer's mount its accesses are
	// recorded.
	WindowSeconds int `toml:"window_seconds"`
	// MaxEntries bounds the spans plus files recorded per layer.
	MaxEntries int `toml:"max_entries"`
}

// DefaultConfig returns the [record] defaults.
func DefaultConfig() Config {
	return Config{WindowSeconds: int(DefaultWindow / time.Second), MaxEntries: DefaultMaxEntries}
}

// Validate checks the values a recorder cannot run with.
func (c Config) Validate() error {
	if c.WindowSeconds <= 0 {
		return fmt.Errorf("record.window_seconds must be positive, got %d", c.WindowSeconds)
	}
	if c.MaxEntries <= 0 {
		return fmt.Errorf("record.max_entries must be positive, got %d", c.MaxEntries)
	}
	return nil
}

// Options tune a Store.
type Options struct {
	// Window is how long after a layer's mount its accesses are recorded;
	// zero means DefaultWindow.
	Window time.Duration
	// MaxEntries bounds the spans plus files recorded per layer; zero
	// means DefaultMaxEntries.
	MaxEntries int
	// OnFrozen, when set, is called when every mounted layer of an image
	// has frozen (window over or entry bound reached): the record is
	// complete. The daemon logs LogReady there. It is called from the
	// goroutine that froze the last layer, with no lock held.
	OnFrozen func(Image)
}

// Options returns the Store options of c (OnFrozen left for the caller).
func (c Config) Options() Options {
	return Options{Window: time.Duration(c.WindowSeconds) * time.Second, MaxEntries: c.MaxEntries}
}

// Store keeps the access records of the images a daemon mounts lazily: one
// record per image (reference and manifest digest), one LayerRecorder per
// mounted layer. It keeps the records of the last 64 images. A nil *Store
// records nothing (recording disabled). It is safe for concurrent use.
type Store struct {
	opts Options

	mu     sync.Mutex
	images []*imageRecord // oldest first
	closed bool
}

// imageRecord is the record of one image being made.
type imageRecord struct {
	img    Image
	layers []*LayerRecorder // mount order; guarded by Store.mu
}

// NewStore returns an empty Store.
func NewStore(o Options) *Store {
	if o.Window <= 0 {
		o.Window = DefaultWindow
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	return &Store{opts: o}
}

// LayerInfo describes a mounted layer to its recorder.
type LayerInfo struct {
	// Digest is the layer blob's digest.
	Digest digest.Digest
	// Spans is the layer's number of spans: span IDs are 0 to Spans-1.
	Spans int
	// Nodes bounds the node IDs that LayerRecorder.Node tracks in a bitmap
	// (others go to a map): the number of nodes of the layer's tree.
	Nodes int
	// Path returns the path (a tar entry name, cleaned by the recorder) of
	// a node of the layer's filesystem. It is called once per node, on its
	// first access. Nil: Node records nothing.
	Path func(node uint64) string
}

// Layer starts recording a layer of img that was just mounted, and
// returns its recorder. The layer's window starts now. A layer mounted
// again after its recorder froze (a new start of the image) is recorded
// afresh; while its recorder is live, that recorder is returned. It
// returns nil, a recorder that records nothing, for a nil or closed Store.
func (s *Store) Layer(img Image, info LayerInfo) *LayerRecorder {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	ir := s.image(img)
	for i, l := range ir.layers {
		if l.digest != info.Digest {
			continue
		}
		if !l.frozen.Load() {
			return l
		}
		ir.layers = slices.Delete(ir.layers, i, i+1)
		break
	}
	l := newLayerRecorder(s, ir, info)
	ir.layers = append(ir.layers, l)
	return l
}

// image returns the record of img, creating it (and dropping the oldest
// beyond maxImages). s.mu is held.
func (s *Store) image(img Image) *imageRecord {
	for _, ir := range s.images {
		if ir.img == img {
			return ir
		}
	}
	ir := &imageRecord{img: img}
	s.images = append(s.images, ir)
	if len(s.images) > maxImages {
		for _, l := range s.images[0].layers {
			l.stop()
		}
		s.images = slices.Delete(s.images, 0, 1)
	}
	return ir
}

// Record returns the record of an image so far, named name (DefaultName
// when empty). image is the reference the image was pulled as (Docker
// Hub's short forms match their long ones) or its manifest digest; the
// latest image that matches wins. It returns ErrNoRecord when no layer of
// such an image was recorded.
func (s *Store) Record(image, name string) (*Record, error) {
	if name == "" {
		name = DefaultName
	}
	if s == nil {
		return nil, fmt.Errorf("%s: %w", image, ErrNoRecord)
	}
	s.mu.Lock()
	var ir *imageRecord
	for i := len(s.images) - 1; i >= 0 && ir == nil; i-- {
		if matches(s.images[i].img, image) {
			ir = s.images[i]
		}
	}
	var layers []*LayerRecorder
	if ir != nil {
		layers = slices.Clone(ir.layers)
	}
	s.mu.Unlock()
	if ir == nil || len(layers) == 0 {
		return nil, fmt.Errorf("%s: %w", image, ErrNoRecord)
	}
	r := &Record{Version: Version, Name: name, Image: ir.img, Layers: make([]Layer, len(layers))}
	for i, l := range layers {
		r.Layers[i] = l.snapshot()
	}
	return r, nil
}

// matches reports whether query names img: its reference (also in Docker
// Hub's short or long form) or its manifest digest.
func matches(img Image, query string) bool {
	if query == img.Reference || query == img.Manifest.String() {
		return true
	}
	q, err := reference.ParseDockerRef(query)
	if err != nil {
		return false
	}
	r, err := reference.ParseDockerRef(img.Reference)
	return err == nil && q.String() == r.String()
}

// Close freezes every recorder and stops their timers. Records stay
// readable; new layers are not recorded.
func (s *Store) Close() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, ir := range s.images {
		for _, l := range ir.layers {
			l.stop()
		}
	}
}

// frozen is called once per layer recorder that froze; it calls OnFrozen
// when that completes its image's record.
func (s *Store) frozen(l *LayerRecorder) {
	s.mu.Lock()
	done := !s.closed && slices.Contains(l.image.layers, l)
	for _, other := range l.image.layers {
		done = done && other.frozen.Load()
	}
	s.mu.Unlock()
	if done && s.opts.OnFrozen != nil {
		s.opts.OnFrozen(l.image.img)
	}
}

// LayerRecorder records the first accesses of one mounted layer's spans
// and files, until its window ends or it holds MaxEntries entries; then it
// freezes. Its methods are meant for the hot path (an observer calls them
// on every FUSE open and read and every span read): after an ID's first
// access they cost an atomic load or two, and nothing at all once frozen.
// A nil *LayerRecorder records nothing. It is safe for concurrent use.
type LayerRecorder struct {
	store    *Store
	image    *imageRecord
	digest   digest.Digest
	mounted  time.Time
	deadline time.Time
	max      int
	numSpans int
	path     func(uint64) string

	frozen   atomic.Bool
	spanSeen []atomic.Uint64 // bitmap of span IDs
	nodeSeen []atomic.Uint64 // bitmap of node IDs below LayerInfo.Nodes

	mu        sync.Mutex
	timer     *time.Timer // ends the window
	spans     []Span
	files     []File
	fileSeen  map[string]bool
	otherSeen map[uint64]bool // node IDs past the bitmap
}

func newLayerRecorder(s *Store, ir *imageRecord, info LayerInfo) *LayerRecorder {
	now := time.Now()
	l := &LayerRecorder{
		store: s, image: ir, digest: info.Digest, path: info.Path,
		mounted: now, deadline: now.Add(s.opts.Window), max: s.opts.MaxEntries, numSpans: info.Spans,
		spanSeen:  make([]atomic.Uint64, (max(info.Spans, 0)+63)/64),
		nodeSeen:  make([]atomic.Uint64, (max(info.Nodes, 0)+63)/64),
		fileSeen:  make(map[string]bool),
		otherSeen: make(map[uint64]bool),
	}
	// The timer's callback reads l.timer (freeze): set it under the lock.
	l.mu.Lock()
	l.timer = time.AfterFunc(s.opts.Window, l.freeze)
	l.mu.Unlock()
	return l
}

// firstTime sets bit id of bits and reports whether it was clear: the
// first access of id. IDs past the bitmap report false.
func firstTime(bits []atomic.Uint64, id uint64) bool {
	if id/64 >= uint64(len(bits)) {
		return false
	}
	w, bit := &bits[id/64], uint64(1)<<(id%64)
	return w.Load()&bit == 0 && w.Or(bit)&bit == 0
}

// Span records an access of span id (the first one counts). IDs outside
// the layer's spans are ignored.
func (l *LayerRecorder) Span(id ztoc.SpanID) {
	if l == nil || l.frozen.Load() || id < 0 || int(id) >= l.numSpans || !firstTime(l.spanSeen, uint64(id)) {
		return
	}
	l.add(func(at int64) bool {
		l.spans = append(l.spans, Span{ID: id, AtMicros: at})
		return true
	})
}

// Range records the spans holding uncompressed bytes [off, off+n) of the
// layer's tar stream, spans being the layer's span table (ztoc.Ztoc.Spans):
// a reader of the stream (the FUSE filesystem's, not prefetch or fill)
// calls it on every read. Bytes outside the spans are ignored.
func (l *LayerRecorder) Range(spans []ztoc.Span, off, n int64) {
	if l == nil || l.frozen.Load() || n <= 0 {
		return
	}
	first, ok := ztoc.SpanForOffset(spans, off)
	if !ok {
		return
	}
	for id := first; int(id) < len(spans) && spans[id].UncompressedStart < off+n; id++ {
		l.Span(id)
	}
}

// Node records an access (open or read) of the file that node is in the
// layer's filesystem (the first one counts); its path comes from
// LayerInfo.Path.
func (l *LayerRecorder) Node(node uint64) {
	if l == nil || l.path == nil || l.frozen.Load() {
		return
	}
	if node/64 < uint64(len(l.nodeSeen)) {
		if !firstTime(l.nodeSeen, node) {
			return
		}
	} else {
		l.mu.Lock()
		seen := l.otherSeen[node]
		l.otherSeen[node] = true
		l.mu.Unlock()
		if seen {
			return
		}
	}
	l.File(l.path(node))
}

// File records an access of the file at name (a tar entry name or path of
// the layer; the first access counts).
func (l *LayerRecorder) File(name string) {
	if l == nil || l.frozen.Load() {
		return
	}
	p := CleanPath(name)
	l.add(func(at int64) bool {
		if l.fileSeen[p] {
			return false
		}
		l.fileSeen[p] = true
		l.files = append(l.files, File{Path: p, AtMicros: at})
		return true
	})
}

// add runs record under the lock with the time since mount, unless the
// window is over, and freezes the recorder when the window is over or the
// entry bound is reached. record reports whether it added an entry. The
// time is taken under the lock, so entries are in time order.
func (l *LayerRecorder) add(record func(at int64) bool) {
	l.mu.Lock()
	now := time.Now()
	over := !now.Before(l.deadline)
	if !over && !l.frozen.Load() && record(now.Sub(l.mounted).Microseconds()) {
		over = len(l.spans)+len(l.files) >= l.max
	}
	l.mu.Unlock()
	if over {
		l.freeze()
	}
}

// Freeze ends the recording of the layer (at unmount, say): it keeps what
// it has.
func (l *LayerRecorder) Freeze() {
	if l != nil {
		l.freeze()
	}
}

// freeze stops recording, once, and tells the store.
func (l *LayerRecorder) freeze() {
	if l.frozen.CompareAndSwap(false, true) {
		l.stopTimer()
		l.store.frozen(l)
	}
}

func (l *LayerRecorder) stopTimer() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.timer.Stop()
}

// stop freezes the recorder without telling anyone (the store is closing
// or dropping it). The store's lock is held.
func (l *LayerRecorder) stop() {
	l.frozen.Store(true)
	l.stopTimer()
}

// Frozen reports whether the recorder stopped recording.
func (l *LayerRecorder) Frozen() bool { return l == nil || l.frozen.Load() }

// snapshot returns what the layer recorded so far.
func (l *LayerRecorder) snapshot() Layer {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Layer{Digest: l.digest, Spans: slices.Clone(l.spans), Files: slices.Clone(l.files)}
}
