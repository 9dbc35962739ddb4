package span

import (
	"context"
	"sync"
	"time"
)

// SchedulerOptions tune a Scheduler. Zero values mean the defaults.
type SchedulerOptions struct {
	// DemandFetches bounds the demand fetches in flight. Default
	// DefaultDemandFetches.
	DemandFetches int
	// PrefetchFetches bounds the prefetch fetches in flight. Default
	// DefaultPrefetchFetches.
	PrefetchFetches int
	// FillFetches bounds the fill fetches in flight. Default
	// DefaultFillFetches.
	FillFetches int
	// FillQuiet is how long a layer must have had no demand fetch before
	// its fill goes on. Default DefaultFillQuiet; negative: no wait.
	FillQuiet time.Duration
	// FillDelay is how long after a layer is opened its fill may start
	// (zero: at once).
	FillDelay time.Duration
	// FillRate bounds the fill of each layer, in compressed bytes per
	// second (zero: no bound).
	FillRate int64
}

// Defaults of SchedulerOptions.
const (
	// DefaultDemandFetches lets the reads of a starting container fetch
	// in parallel without opening hundreds of connections.
	DefaultDemandFetches = 8
	// DefaultPrefetchFetches keeps prefetch to a few connections, so that
	// demand fetches keep most of the link.
	DefaultPrefetchFetches = 3
	// DefaultFillFetches: fill is background work, one span at a time.
	DefaultFillFetches = 1
	// DefaultFillQuiet waits out the bursts of reads of a starting
	// container before the fill of its layer goes on.
	DefaultFillQuiet = 1500 * time.Millisecond
)

// Scheduler orders the fetches of every layer of a daemon, so that the
// reads containers wait on keep the link: demand fetches start at once
// (up to DemandFetches), prefetch fetches run beside them with bounded
// parallelism (a demand fetch never waits for a prefetch slot), and fill
// fetches start only while no demand or prefetch fetch is queued or in
// flight anywhere, once their layer has had no demand fetch for FillQuiet
// and was opened FillDelay ago. A fill fetch in flight when demand
// arrives finishes; no new one starts. Pass one Scheduler to every Layer
// of a daemon (Options.Scheduler).
type Scheduler struct {
	opts     SchedulerOptions
	demand   chan struct{} // slots of demand fetches
	prefetch chan struct{} // slots of prefetch fetches

	mu      sync.Mutex
	busy    int           // demand and prefetch fetches queued or in flight
	fills   int           // fill fetches in flight
	changed chan struct{} // closed (and replaced) when fill may go on
}

// NewScheduler returns a Scheduler with opts (zero fields: defaults).
func NewScheduler(opts SchedulerOptions) *Scheduler {
	if opts.DemandFetches <= 0 {
		opts.DemandFetches = DefaultDemandFetches
	}
	if opts.PrefetchFetches <= 0 {
		opts.PrefetchFetches = DefaultPrefetchFetches
	}
	if opts.FillFetches <= 0 {
		opts.FillFetches = DefaultFillFetches
	}
	if opts.FillQuiet == 0 {
		opts.FillQuiet = DefaultFillQuiet
	}
	return &Scheduler{
		opts:     opts,
		demand:   make(chan struct{}, opts.DemandFetches),
		prefetch: make(chan struct{}, opts.PrefetchFetches),
		changed:  make(chan struct{}),
	}
}

// layerState is a layer's part of the scheduler's state, guarded by
// Scheduler.mu.
type layerState struct {
	opened     time.Time
	lastDemand time.Time // start or end of the layer's last demand fetch
	nextFill   time.Time // FillRate: the layer's next fill fetch may start then
}

// notify wakes the fills waiting for their turn. s.mu must be held.
func (s *Scheduler) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// acquireDemand waits for a demand slot. The fetch counts as queued (fill
// waits) from the call until release.
func (s *Scheduler) acquireDemand(ctx context.Context, ls *layerState) (release func(), err error) {
	s.mu.Lock()
	s.busy++
	ls.lastDemand = time.Now()
	s.mu.Unlock()
	done := func() {
		s.mu.Lock()
		s.busy--
		ls.lastDemand = time.Now()
		s.notify()
		s.mu.Unlock()
	}
	select {
	case s.demand <- struct{}{}:
		return func() { <-s.demand; done() }, nil
	case <-ctx.Done():
		done()
		return nil, ctx.Err()
	}
}

// queuePrefetch counts n prefetch fetches as queued: fill waits until each
// is released (acquirePrefetch's release) or unqueued.
func (s *Scheduler) queuePrefetch(n int) {
	s.mu.Lock()
	s.busy += n
	s.mu.Unlock()
}

// unqueuePrefetch removes n queued prefetch fetches that will not run.
func (s *Scheduler) unqueuePrefetch(n int) {
	if n == 0 {
		return
	}
	s.mu.Lock()
	s.busy -= n
	s.notify()
	s.mu.Unlock()
}

// acquirePrefetch waits for a prefetch slot for a fetch queued with
// queuePrefetch. On error the fetch is still queued.
func (s *Scheduler) acquirePrefetch(ctx context.Context) (release func(), err error) {
	select {
	case s.prefetch <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return func() {
		<-s.prefetch
		s.unqueuePrefetch(1)
	}, nil
}

// acquireFill waits for the turn of a fill fetch of size compressed bytes
// of a layer (see Scheduler).
func (s *Scheduler) acquireFill(ctx context.Context, ls *layerState, size int64) (release func(), err error) {
	for {
		s.mu.Lock()
		wait, ok := s.fillWait(ls, time.Now())
		if ok {
			s.fills++
			if s.opts.FillRate > 0 {
				next := ls.nextFill
				if now := time.Now(); now.After(next) {
					next = now
				}
				ls.nextFill = next.Add(time.Duration(float64(size) / float64(s.opts.FillRate) * float64(time.Second)))
			}
			s.mu.Unlock()
			return func() {
				s.mu.Lock()
				s.fills--
				s.notify()
				s.mu.Unlock()
			}, nil
		}
		changed := s.changed
		s.mu.Unlock()
		if err := waitChange(ctx, changed, wait); err != nil {
			return nil, err
		}
	}
}

// fillWait reports whether a fill fetch of the layer may start now, and if
// not, how long to wait at least (0: until something changes). s.mu must
// be held.
func (s *Scheduler) fillWait(ls *layerState, now time.Time) (time.Duration, bool) {
	if s.busy > 0 || s.fills >= s.opts.FillFetches {
		return 0, false
	}
	for _, t := range []time.Time{
		ls.opened.Add(s.opts.FillDelay),
		ls.lastDemand.Add(max(s.opts.FillQuiet, 0)),
		ls.nextFill,
	} {
		if d := t.Sub(now); d > 0 {
			return d, false
		}
	}
	return 0, true
}

// waitChange waits until changed is closed, or wait has passed (wait > 0),
// or ctx ends.
func waitChange(ctx context.Context, changed <-chan struct{}, wait time.Duration) error {
	var timeout <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-changed:
	case <-timeout:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}
