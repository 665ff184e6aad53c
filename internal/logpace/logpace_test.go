package logpace

import (
	"testing"
	"time"
)

// pauses runs n pauses of a fresh Pacer whose sleeps each take took, and
// returns how many of them slept.
func pauses(t *testing.T, n int, took time.Duration) int {
	t.Helper()
	var clock time.Time
	slept := 0
	now = func() time.Time { return clock }
	sleep = func(d time.Duration) {
		if d != Pause {
			t.Fatalf("slept %v, want %v", d, Pause)
		}
		slept++
		clock = clock.Add(took)
	}
	t.Cleanup(func() { now, sleep = time.Now, time.Sleep })
	var p Pacer
	for range n {
		p.Pause()
	}
	return slept
}

func TestPacerPausesWhileBusy(t *testing.T) {
	// Sleeps that end about on time: another goroutine had the P meanwhile.
	if got := pauses(t, 100, 80*time.Microsecond); got != 100 {
		t.Fatalf("%d of 100 pauses slept, want all", got)
	}
}

func TestPacerSkipsPausesWhenIdle(t *testing.T) {
	// Sleeps that end a millisecond late: nothing else wanted the CPU, so
	// the next idleRun slices go without a pause, then it sleeps again.
	n := 3 * (idleRun + 1)
	if got := pauses(t, n, time.Millisecond); got != 3 {
		t.Fatalf("%d of %d pauses slept, want 3 (one per %d)", got, n, idleRun+1)
	}
}
