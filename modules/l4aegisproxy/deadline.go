package l4aegisproxy

// timed is what a deadlineHeap orders: something with a deadline (unix
// nanoseconds) and its place in the heap (-1: not in it), both kept in
// the item itself so that removing one is O(log n) without a search.
type timed interface {
	comparable
	deadline() int64
	heapIndex() *int
}

// deadlineHeap orders items by deadline, soonest first. The parker's
// parked connections and the event loop's connections use it for their
// idle (and connect) deadlines. Its methods allocate nothing once the
// slice has grown, unlike container/heap's, which box each item.
type deadlineHeap[T timed] []T

// top is the soonest item; the heap must not be empty.
func (h deadlineHeap[T]) top() T { return h[0] }

func (h *deadlineHeap[T]) push(x T) {
	*x.heapIndex() = len(*h)
	*h = append(*h, x)
	h.up(len(*h) - 1)
}

// remove takes x out, if it is in the heap.
func (h *deadlineHeap[T]) remove(x T) {
	i := *x.heapIndex()
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
	*x.heapIndex() = -1
	if i != n {
		h.fix(i)
	}
}

// fix restores the order after the deadline of the item at i changed.
func (h deadlineHeap[T]) fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h deadlineHeap[T]) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	*h[i].heapIndex(), *h[j].heapIndex() = i, j
}

func (h deadlineHeap[T]) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if h[i].deadline() <= h[j].deadline() {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h deadlineHeap[T]) down(i0 int) bool {
	i, n := i0, len(h)
	for {
		j := 2*i + 1
		if j >= n || j < 0 {
			break
		}
		if r := j + 1; r < n && h[r].deadline() < h[j].deadline() {
			j = r
		}
		if h[j].deadline() >= h[i].deadline() {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}
