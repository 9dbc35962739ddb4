// Package syncio holds writers that goroutines can share: each write is
// serialized by a mutex, so lines from different goroutines never
// interleave. The record run's stderr (progress and the container's
// output) and the tests that capture a logger's output while the code
// under test logs from its own goroutines all need one; sharing the
// package keeps a single, race-free implementation.
package syncio

import (
	"bytes"
	"io"
	"sync"
)

// Writer serializes writes to an io.Writer that is not safe for
// concurrent use, such as a command's stderr written by several
// goroutines.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter returns a Writer that serializes writes to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: w}
}

// Write writes p to the underlying writer, holding the lock.
func (l *Writer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Buffer is a bytes.Buffer that goroutines may write to while another
// reads it: tests hand it to a logger the code under test uses from its
// own goroutines and check what was logged. Its zero value is an empty
// buffer ready to use.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p to the buffer.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
