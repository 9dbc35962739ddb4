package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// progress draws one status line of the layers being indexed on a
// terminal; it is a no-op when the output is not a terminal.
type progress struct {
	w      io.Writer
	on     bool
	mu     sync.Mutex
	layers map[digest.Digest]*layerProgress
	stop   chan struct{}
	done   chan struct{}
	drawn  bool
}

type layerProgress struct {
	size  int64
	read  *atomic.Int64
	start time.Time
}

func newProgress(w io.Writer, on bool) *progress {
	p := &progress{w: w, on: on, layers: make(map[digest.Digest]*layerProgress), stop: make(chan struct{}), done: make(chan struct{})}
	if on {
		go p.loop()
	} else {
		close(p.done)
	}
	return p
}

// start registers a layer and returns the counter of its bytes read.
func (p *progress) start(d digest.Digest, size int64) *atomic.Int64 {
	c := new(atomic.Int64)
	p.mu.Lock()
	p.layers[d] = &layerProgress{size: size, read: c, start: time.Now()}
	p.mu.Unlock()
	return c
}

func (p *progress) finish(d digest.Digest) {
	p.mu.Lock()
	delete(p.layers, d)
	p.mu.Unlock()
}

func (p *progress) loop() {
	defer close(p.done)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			p.draw()
		}
	}
}

func (p *progress) draw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	var parts []string
	for d, l := range p.layers {
		n := l.read.Load()
		rate := float64(n) / max(time.Since(l.start).Seconds(), 1e-3)
		parts = append(parts, fmt.Sprintf("%s %s/%s %s/s", short(d)[7:15], humanBytes(n), humanBytes(l.size), humanBytes(int64(rate))))
	}
	if len(parts) == 0 {
		return
	}
	line := "indexing " + strings.Join(parts, " | ")
	if len(line) > 150 {
		line = line[:150]
	}
	fmt.Fprintf(p.w, "\r\033[K%s", line)
	p.drawn = true
}

// clear erases the status line before a regular line is printed.
func (p *progress) clear() {
	if !p.on {
		return
	}
	p.mu.Lock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
	p.mu.Unlock()
}

// close stops the drawing goroutine and erases the status line.
func (p *progress) close() {
	if p.on {
		close(p.stop)
		<-p.done
		p.clear()
	}
}
