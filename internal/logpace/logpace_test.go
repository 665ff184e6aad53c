package logpace

import (
	"testing"
	"time"
)

// pauses calls p.Pause n times and returns how many of them slept.
func pauses(t *testing.T, p *Pacer, n int) int {
	t.Helper()
	slept := 0
	sleep = func(d time.Duration) {
		if d != Pause {
			t.Fatalf("slept %v, want %v", d, Pause)
		}
		slept++
	}
	t.Cleanup(func() { sleep = time.Sleep })
	for range n {
		p.Pause()
	}
	if p.Slept() != slept {
		t.Errorf("Slept() = %d, want %d", p.Slept(), slept)
	}
	return slept
}

// unwatched makes the pacers of a test see no watched relay.
func unwatched(t *testing.T) {
	relays = func() Relays { return Unwatched }
	t.Cleanup(func() { relays = Waiting })
}

func TestPacerPausesBetweenEverySlice(t *testing.T) {
	unwatched(t)
	if got := pauses(t, new(Pacer), 100); got != 100 {
		t.Fatalf("%d of 100 calls slept, want all", got)
	}
}

func TestHurriedPacerPausesOncePer32Slices(t *testing.T) {
	relays = func() Relays { return Ready } // a Hurried pacer never yields
	t.Cleanup(func() { relays = Waiting })
	if got := pauses(t, Hurried(), 100); got != 3 {
		t.Fatalf("%d of 100 calls slept, want 3 (once per %d)", got, hurriedEvery)
	}
}
