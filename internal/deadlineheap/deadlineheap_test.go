package deadlineheap

import (
	"math/rand/v2"
	"slices"
	"testing"
)

type item struct {
	at   int64
	heap int
}

func (it *item) Deadline() int64 { return it.at }
func (it *item) HeapIndex() *int { return &it.heap }

// Random pushes, removals (of items in the heap and not) and deadline
// changes keep the heap's soonest item and each item's index right,
// against a plain list.
func TestHeapAgainstAList(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var h Heap[*item]
	var in []*item // what the heap should hold
	out := []*item{{heap: -1}}
	for step := range 20000 {
		switch op := rng.IntN(10); {
		case op < 4:
			it := &item{at: rng.Int64N(1000), heap: -1}
			h.Push(it)
			in = append(in, it)
		case op < 6 && len(in) > 0:
			i := rng.IntN(len(in))
			h.Remove(in[i])
			out = append(out, in[i])
			in = slices.Delete(in, i, i+1)
		case op < 7:
			h.Remove(out[rng.IntN(len(out))]) // not in it: nothing happens
		case op < 9 && len(in) > 0:
			it := in[rng.IntN(len(in))]
			it.at = rng.Int64N(1000)
			h.Fix(it.heap)
		default:
			if len(in) > 0 {
				h.Remove(h.Top())
				i := slices.IndexFunc(in, func(x *item) bool { return x.heap == -1 })
				out = append(out, in[i])
				in = slices.Delete(in, i, i+1)
			}
		}
		if len(h) != len(in) {
			t.Fatalf("step %d: %d in the heap, want %d", step, len(h), len(in))
		}
		for i, it := range h {
			if it.heap != i {
				t.Fatalf("step %d: item at %d says it is at %d", step, i, it.heap)
			}
		}
		for _, it := range out {
			if it.heap != -1 {
				t.Fatalf("step %d: a removed item says it is at %d", step, it.heap)
			}
		}
		if len(in) > 0 {
			least := slices.MinFunc(in, func(a, b *item) int { return int(a.at - b.at) })
			if h.Top().at != least.at {
				t.Fatalf("step %d: top at %d, want %d", step, h.Top().at, least.at)
			}
		}
	}
}
