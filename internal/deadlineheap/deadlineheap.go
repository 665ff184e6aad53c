// Package deadlineheap orders things by deadline, soonest first: the idle
// and connect deadlines of the TCP event loop's and the parker's
// connections, and the idle deadlines of the UDP relay's NAT entries. Its
// SetWake sets the read deadline at which the goroutine that waits for
// them wakes.
package deadlineheap

import (
	"os"
	"time"
)

// SetWake sets the read deadline of f, the epoll instance a goroutine
// reads through its RawConn, to t (unix nanoseconds; 0: none), and *at to
// t, unless *at is t already: the goroutine then wakes at the soonest
// deadline of its Heap as it does for an event. A caller whose deadline
// has passed sets *at to a value no deadline has (-1), so that the next
// call sets the file's again.
func SetWake(f *os.File, at *int64, t int64) {
	if t == *at {
		return
	}
	*at = t
	if t == 0 {
		_ = f.SetReadDeadline(time.Time{})
		return
	}
	_ = f.SetReadDeadline(time.Unix(0, t))
}

// Timed is what a Heap orders: something with a deadline (unix
// nanoseconds) and its place in the heap (-1: not in it), both kept in
// the item itself so that removing one is O(log n) without a search.
type Timed interface {
	comparable
	Deadline() int64
	HeapIndex() *int
}

// Heap orders items by deadline, soonest first. Its methods allocate
// nothing once the slice has grown, unlike container/heap's, which box
// each item. It is not safe for concurrent use.
type Heap[T Timed] []T

// Top is the soonest item; the heap must not be empty.
func (h Heap[T]) Top() T { return h[0] }

func (h *Heap[T]) Push(x T) {
	*x.HeapIndex() = len(*h)
	*h = append(*h, x)
	h.up(len(*h) - 1)
}

// Remove takes x out, if it is in the heap.
func (h *Heap[T]) Remove(x T) {
	i := *x.HeapIndex()
	if i < 0 {
		return
	}
	n := len(*h) - 1
	if i != n {
		h.swap(i, n)
	}
	var zero T
	(*h)[n] = zero
	*h = (*h)[:n]
	*x.HeapIndex() = -1
	if i != n {
		h.Fix(i)
	}
}

// Fix restores the order after the deadline of the item at i changed.
func (h Heap[T]) Fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h Heap[T]) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	*h[i].HeapIndex(), *h[j].HeapIndex() = i, j
}

func (h Heap[T]) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if h[i].Deadline() <= h[j].Deadline() {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h Heap[T]) down(i0 int) bool {
	i, n := i0, len(h)
	for {
		j := 2*i + 1
		if j >= n || j < 0 {
			break
		}
		if r := j + 1; r < n && h[r].Deadline() < h[j].Deadline() {
			j = r
		}
		if h[j].Deadline() >= h[i].Deadline() {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}
