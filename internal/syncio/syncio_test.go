package syncio

import (
	"bytes"
	"strings"
	"sync"
	"testing"
)

// TestConcurrentWrites: writes from many goroutines arrive whole, through
// a Writer and into a Buffer, and String sees them all (run with -race).
func TestConcurrentWrites(t *testing.T) {
	var under bytes.Buffer
	w := NewWriter(&under)
	var b Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				if n, err := w.Write([]byte("line\n")); n != 5 || err != nil {
					t.Errorf("Writer.Write = %d, %v", n, err)
				}
				if n, err := b.Write([]byte("line\n")); n != 5 || err != nil {
					t.Errorf("Buffer.Write = %d, %v", n, err)
				}
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	want := strings.Repeat("line\n", 800)
	if under.String() != want {
		t.Errorf("Writer wrote %d bytes, want %d", under.Len(), len(want))
	}
	if b.String() != want {
		t.Errorf("Buffer holds %d bytes, want %d", len(b.String()), len(want))
	}
}
