package logpace

import (
	"net"
	"strconv"
	"testing"
	"time"
)

// watchedSocket is a UDP socket on loopback, watched until the test ends
// and closes it: a function that makes it ready, and its descriptor.
func watchedSocket(t *testing.T) (ready func(), fd int) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rc, err := pc.(*net.UDPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Control(func(s uintptr) { fd = int(s) }); err != nil {
		t.Fatal(err)
	}
	Watch(fd)
	t.Cleanup(func() {
		Unwatch(fd)
		pc.Close()
	})
	return func() {
		c, err := net.Dial("udp", pc.LocalAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("query")); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for Waiting() != Ready {
			if time.Now().After(deadline) {
				t.Fatal("a datagram waits on a watched socket, and Waiting does not say Ready")
			}
			time.Sleep(time.Millisecond)
		}
	}, fd
}

func TestWaitingSeesAWatchedSocket(t *testing.T) {
	if got := Waiting(); got != Unwatched {
		t.Fatalf("Waiting() = %v with nothing watched, want Unwatched (%v)", got, Unwatched)
	}
	t.Run("watched", func(t *testing.T) {
		ready, _ := watchedSocket(t)
		if got := Waiting(); got != Idle {
			t.Fatalf("Waiting() = %v with nothing to read, want Idle (%v)", got, Idle)
		}
		ready()
	})
	// Unwatched when its test ended, before it was closed.
	if got := Waiting(); got != Unwatched {
		t.Fatalf("Waiting() = %v after Unwatch, want Unwatched (%v)", got, Unwatched)
	}
}

func TestPacerGoesOnWhileWatchedRelaysAreIdle(t *testing.T) {
	watchedSocket(t)
	// Nothing waits: a sleep once per blindSlices calls, for what is not
	// watched.
	if got, want := pauses(t, new(Pacer), 10*blindSlices), 10; got != want {
		t.Fatalf("%d of %d calls slept, want %d (one per %d)", got, 10*blindSlices, want, blindSlices)
	}
}

func TestPacerYieldsToAReadyRelayUntilServed(t *testing.T) {
	ready, _ := watchedSocket(t)
	ready()
	yieldWait = time.Minute
	t.Cleanup(func() { yieldWait = time.Millisecond })
	sleep = func(time.Duration) { t.Error("slept: a ready relay is yielded to") }
	t.Cleanup(func() { sleep = time.Sleep })

	// Two writers yield at once; one Served lets both go.
	var ps [2]Pacer
	done := make(chan int, len(ps))
	for i := range ps {
		go func() {
			ps[i].Pause()
			done <- i
		}()
	}
	select {
	case i := <-done:
		t.Fatalf("writer %d went on before a relay said Served", i)
	case <-time.After(100 * time.Millisecond):
	}
	Served()
	for n := range len(ps) {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d writers went on after one Served", n, len(ps))
		}
	}
	for i := range ps {
		if ps[i].Yielded() != 1 || ps[i].Slept() != 0 {
			t.Errorf("writer %d: yielded %d, slept %d; want 1 and 0", i, ps[i].Yielded(), ps[i].Slept())
		}
	}
}

func TestPacerSleepsAfterAYieldNobodyServed(t *testing.T) {
	ready, _ := watchedSocket(t)
	ready()
	yieldWait = 5 * time.Millisecond
	t.Cleanup(func() { yieldWait = time.Millisecond })
	var p Pacer
	start := time.Now()
	p.Pause() // yields; no relay reads the socket, nobody says Served
	if waited := time.Since(start); waited < yieldWait {
		t.Fatalf("an unserved yield ended after %v, want at least %v", waited, yieldWait)
	}
	if p.Yielded() != 1 {
		t.Fatalf("yielded %d, want 1", p.Yielded())
	}
	// The socket is still ready, and the pacer no longer trusts it: it
	// sleeps at every call, as with nothing watched.
	if got := pauses(t, &p, 20); got != 20 {
		t.Fatalf("%d of 20 calls slept after an unserved yield, want all", got)
	}
	if p.Yielded() != 1 {
		t.Fatalf("yielded %d after an unserved yield, want still 1", p.Yielded())
	}
}

func TestADescriptorWatchedTwiceStaysUntilBothUnwatch(t *testing.T) {
	ready, fd := watchedSocket(t) // Unwatch at the end of the test
	ready()
	// The ready socket is watched a second time (a reload's new relay
	// takes it on) and unwatched once (the old relay lets it go).
	Watch(fd)
	Unwatch(fd)
	if got := Waiting(); got != Ready {
		t.Fatalf("Waiting() = %v after one of two Unwatch calls, want Ready (%v): the socket is still watched", got, Ready)
	}
}

// TestWaitingDoesNotAllocate: a pacer asks between every two slices of
// log lines, so the ask allocates nothing, with few descriptors watched
// and with more than a small buffer on the stack would hold.
func TestWaitingDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts mean nothing under the race detector")
	}
	for _, n := range []int{3, 40} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			for range n {
				watchedSocket(t)
			}
			if got := Waiting(); got != Idle {
				t.Fatalf("Waiting() = %v with %d idle sockets watched, want Idle", got, n)
			}
			if a := testing.AllocsPerRun(100, func() { Waiting() }); a != 0 {
				t.Fatalf("Waiting allocates %.1f times a call with %d descriptors watched, want none", a, n)
			}
		})
	}
}
