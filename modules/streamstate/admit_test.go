package streamstate

import (
	"sync"
	"sync/atomic"
	"testing"
)

// At the cap, goroutines keep asking for a slot while another watches
// Active: every one is refused and Active never passes the cap, not even
// for an instant. Then they take and give back slots: none is lost.
func TestAdmitNeverPassesTheCap(t *testing.T) {
	const limit, workers, rounds = 8, 8, 20000
	s := New(0)
	defer s.Destruct()
	for range limit {
		if !s.Admit(limit) {
			t.Fatal("a free slot was refused")
		}
	}
	var (
		wg       sync.WaitGroup
		done     atomic.Bool
		maxSeen  atomic.Int64
		admitted atomic.Int64
	)
	var watch sync.WaitGroup
	watch.Go(func() {
		for !done.Load() {
			if n := s.Active.Load(); n > maxSeen.Load() {
				maxSeen.Store(n)
			}
		}
	})
	for range workers {
		wg.Go(func() {
			for range rounds {
				if s.Admit(limit) {
					admitted.Add(1)
				}
			}
		})
	}
	wg.Wait()
	done.Store(true)
	watch.Wait()
	if m, a := maxSeen.Load(), admitted.Load(); m > limit || a != 0 {
		t.Fatalf("at the cap of %d: Active reached %d, %d admitted", limit, m, a)
	}

	s.Active.Store(0)
	for range workers {
		wg.Go(func() {
			for range rounds / 10 {
				if s.Admit(limit) {
					admitted.Add(1)
					s.Active.Add(-1)
				}
			}
		})
	}
	wg.Wait()
	if a := s.Active.Load(); a != 0 || admitted.Load() == 0 {
		t.Fatalf("after every slot was given back: Active %d, %d admitted", a, admitted.Load())
	}
	if !s.Admit(0) || s.Active.Load() != 1 {
		t.Fatalf("without a cap: Active %d, want 1", s.Active.Load())
	}
	s.Active.Store(0)
}
