package soci_test

// Helpers of the engine's tests: Create and Convert run in-process against
// real registries (registrytest), on images built by socitest.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/spanpull/spanpull/registry"
	"github.com/spanpull/spanpull/soci"
	"github.com/spanpull/spanpull/soci/socitest"
	"github.com/spanpull/spanpull/store"
)

// repo returns the repository of ref on a plain-HTTP test registry.
func repo(t testing.TB, ref string) *registry.Repository {
	t.Helper()
	r, err := registry.New(ref, registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// newCache opens a fresh local zTOC cache, closed when the test ends.
func newCache(t testing.TB) *store.ZtocCache {
	t.Helper()
	c, err := store.OpenZtocCache(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// sharedBase is two images of one repository, tags "a" and "b", that share
// a base layer: a has layers base and a1, b has base and b1.
type sharedBase struct {
	base, a1, b1 socitest.Layer
}

// newSharedBase makes the layers (OCI gzip) from seeds seed, seed+1 and
// seed+2, of the sizes given.
func newSharedBase(seed uint64, baseSize, a1Size, b1Size int64) sharedBase {
	return sharedBase{
		base: socitest.GzipLayer(seed, baseSize, socitest.OCIGzip),
		a1:   socitest.GzipLayer(seed+1, a1Size, socitest.OCIGzip),
		b1:   socitest.GzipLayer(seed+2, b1Size, socitest.OCIGzip),
	}
}

// push pushes images a and b, linux/amd64, to repository name of the
// registry at addr.
func (s sharedBase) push(t testing.TB, addr, name string) (a, b socitest.Image) {
	t.Helper()
	a = socitest.PushImage(t, addr, name, "a", "linux/amd64", false, s.base, s.a1)
	b = socitest.PushImage(t, addr, name, "b", "linux/amd64", false, s.base, s.b1)
	return a, b
}

// outcome is what one run of the engine gave.
type outcome struct {
	res     *soci.Result
	err     error
	elapsed time.Duration
}

// failure is the run's error, or the errors of its failed platforms (what
// the indexer reports as its exit status); nil when everything succeeded.
func (o outcome) failure() error {
	if o.err != nil {
		return o.err
	}
	var errs []error
	for _, p := range o.res.Failed() {
		errs = append(errs, fmt.Errorf("%s: %w", platforms.Format(p.Platform), p.Err))
	}
	return errors.Join(errs...)
}

// runCreate runs Create on ref, bounded by ctx.
func runCreate(ctx context.Context, t testing.TB, ref string, opts soci.Options) outcome {
	t.Helper()
	start := time.Now()
	res, err := soci.Create(ctx, repo(t, ref), opts)
	o := outcome{res: res, err: err, elapsed: time.Since(start)}
	t.Logf("create %s (%s): %s", ref, o.elapsed.Round(time.Millisecond), describe(o))
	return o
}

// tryCreate runs Create on ref, bounded by two minutes.
func tryCreate(t testing.TB, ref string, opts soci.Options) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return runCreate(ctx, t, ref, opts)
}

// create runs Create and fails the test unless every platform succeeded.
func create(t testing.TB, ref string, opts soci.Options) *soci.Result {
	t.Helper()
	o := tryCreate(t, ref, opts)
	if err := o.failure(); err != nil {
		t.Fatalf("create %s: %v", ref, err)
	}
	return o.res
}

// tryConvert runs Convert from src to dst, bounded by two minutes.
func tryConvert(t testing.TB, src, dst string, opts soci.Options) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	res, err := soci.Convert(ctx, repo(t, src), repo(t, dst), opts)
	o := outcome{res: res, err: err, elapsed: time.Since(start)}
	t.Logf("convert %s %s (%s): %s", src, dst, o.elapsed.Round(time.Millisecond), describe(o))
	return o
}

// convert runs Convert and fails the test unless every platform succeeded.
func convert(t testing.TB, src, dst string, opts soci.Options) *soci.Result {
	t.Helper()
	o := tryConvert(t, src, dst, opts)
	if err := o.failure(); err != nil {
		t.Fatalf("convert %s %s: %v", src, dst, err)
	}
	return o.res
}

// describe summarizes an outcome for the test log.
func describe(o outcome) string {
	if o.err != nil {
		return "error: " + o.err.Error()
	}
	var b strings.Builder
	if o.res.Image.Digest != "" {
		fmt.Fprintf(&b, "image %s\n", o.res.Image.Digest)
	}
	for _, p := range o.res.Platforms {
		fmt.Fprintf(&b, "%s manifest %s index %s err %v\n", platforms.Format(p.Platform), p.Manifest.Digest, p.Index.Digest, p.Err)
		for _, l := range p.Layers {
			fmt.Fprintf(&b, "  %s %s reason=%v cache=%v ztoc=%s err=%v\n", l.Layer.Digest, l.Status, l.Reason, l.FromCache, l.Ztoc.Digest, l.Err)
		}
	}
	return b.String()
}

// statuses maps layer digest to status over all platforms of a result.
func statuses(res *soci.Result) map[digest.Digest]soci.LayerStatus {
	m := map[digest.Digest]soci.LayerStatus{}
	for _, p := range res.Platforms {
		for _, l := range p.Layers {
			m[l.Layer.Digest] = l.Status
		}
	}
	return m
}

// layerResult returns the result of layer d (of any platform).
func layerResult(t testing.TB, res *soci.Result, d digest.Digest) soci.LayerResult {
	t.Helper()
	for _, p := range res.Platforms {
		for _, l := range p.Layers {
			if l.Layer.Digest == d {
				return l
			}
		}
	}
	t.Fatalf("no result for layer %s", d)
	return soci.LayerResult{}
}

// ztocs returns the zTOC digests of a result.
func ztocs(res *soci.Result) []digest.Digest {
	var out []digest.Digest
	for _, p := range res.Platforms {
		for _, l := range p.Layers {
			if l.Ztoc.Digest != "" {
				out = append(out, l.Ztoc.Digest)
			}
		}
	}
	return out
}

// artifacts returns the blobs a run published: the zTOCs and their packs.
func artifacts(res *soci.Result) []digest.Digest {
	out := ztocs(res)
	for _, p := range res.Platforms {
		for _, l := range p.Layers {
			for _, d := range []digest.Digest{l.Pack.Head.Digest, l.Pack.Windows.Digest} {
				if d != "" {
					out = append(out, d)
				}
			}
		}
	}
	return out
}

// withZtoc counts a platform's layers that have a zTOC in its index.
func withZtoc(p soci.PlatformResult) int {
	n := 0
	for _, l := range p.Layers {
		if l.Ztoc.Digest != "" {
			n++
		}
	}
	return n
}

func mustPlatform(t testing.TB, s string) ocispec.Platform {
	t.Helper()
	p, err := platforms.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// recorder is an Observer that records what it is told.
type recorder struct {
	mu      sync.Mutex
	started map[digest.Digest]int
	stopped map[digest.Digest]int
	read    map[digest.Digest]int64
	done    map[digest.Digest][]soci.LayerResult
}

func newRecorder() *recorder {
	return &recorder{started: map[digest.Digest]int{}, stopped: map[digest.Digest]int{}, read: map[digest.Digest]int64{},
		done: map[digest.Digest][]soci.LayerResult{}}
}

func (r *recorder) LayerStarted(l ocispec.Descriptor) func(int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started[l.Digest]++
	return func(n int64) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.read[l.Digest] = max(r.read[l.Digest], n)
	}
}

func (r *recorder) LayerStopped(l ocispec.Descriptor) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopped[l.Digest]++
}

func (r *recorder) LayerDone(l soci.LayerResult) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done[l.Layer.Digest] = append(r.done[l.Layer.Digest], l)
}

// check fails the test unless the observer was told about every layer of
// res exactly once, with its result, and saw every indexed layer stream
// from start to end.
func (r *recorder) check(t testing.TB, res *soci.Result) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[digest.Digest]bool{}
	for _, p := range res.Platforms {
		for _, l := range p.Layers {
			if seen[l.Layer.Digest] {
				continue
			}
			seen[l.Layer.Digest] = true
			done := r.done[l.Layer.Digest]
			if len(done) != 1 || done[0].Status != l.Status || done[0].Ztoc.Digest != l.Ztoc.Digest {
				t.Errorf("layer %s: observer told %+v, result %+v", l.Layer.Digest, done, l)
			}
			streamed := l.Status == soci.LayerIndexed
			if n := r.started[l.Layer.Digest]; (n == 1) != streamed || r.stopped[l.Layer.Digest] != n {
				t.Errorf("layer %s (%s): started %d, stopped %d times", l.Layer.Digest, l.Status, n, r.stopped[l.Layer.Digest])
			}
			if streamed && r.read[l.Layer.Digest] != l.Layer.Size {
				t.Errorf("layer %s: progress reached %d of %d bytes", l.Layer.Digest, r.read[l.Layer.Digest], l.Layer.Size)
			}
		}
	}
	if len(r.done) != len(seen) {
		t.Errorf("observer told about %d layers, the result has %d", len(r.done), len(seen))
	}
}
