// Package logpace paces the goroutines that write the connection log (the
// zap lines and the stored entries) so that they never hold the
// connections back for long.
//
// With GOMAXPROCS=1 (one P) a goroutine that does not block keeps every
// other from running, and a relay woken by the network waits until it
// does. So a log writer works in small slices with a short sleep between:
// long enough that Go's scheduler, finding nothing else to run, polls the
// network before it ends. Small slices matter: with INSERTs of 2 rows, not
// 16, when the stored log had a row per entry, the short-connection rate
// went from about 0.92 to 0.99 × HAProxy's in alternating rounds (the
// clients sat idle while a slice of 16 ran).
//
// When nothing else runs, a sleep lasts about a millisecond (the network
// poller waits in whole milliseconds), so an idle writer drains a backlog
// slowly; nothing else waits for it then. A writer that must finish soon
// (its stream stops, the store closes) uses a Hurried pacer.
//
// A sleep when no connection waits costs more than the lines it
// interleaves: with the P idle, Go's poller waits a millisecond for a
// 20 µs timer, its monitor thread (sysmon) wakes for the timer and starts
// another thread to run it, and the next write wakes the monitor again
// (1 client of UDP new flows: 2.5 context switches per flow against
// nginx's 2.0, about 6 µs of CPU). So the relays that run their own
// sockets (the UDP relay's listeners and reply poller, the TCP event
// loop) Watch their descriptors, and pacers ask them with one ppoll that
// does not wait whether anything is ready (Waiting). When nothing is, a pacer
// lets the writer go on. When something is, the writer yields until a
// relay says Served at the end of its wake-up (not a timer), so the P
// never idles between the two; if one is still ready then (under load),
// the writer sleeps for the rest of Pause, so the relays get the P as long
// as a sleep gave them. Connections on goroutines of their own (TLS, rate
// limits) are not watched: for them a pacer still sleeps once per
// blindSlices slices.
package logpace

import (
	"sync/atomic"
	"time"
)

const (
	// Slice is how many lines a stream's log goroutine writes between two
	// pauses. (The storage's LogWriter pauses between the halves of its
	// pages of entries instead, each about as long.)
	Slice = 2
	// Pause is how long a writer sleeps between two slices.
	Pause = 20 * time.Microsecond
	// hurriedEvery is how many slices a Hurried pacer lets go between two
	// pauses.
	hurriedEvery = 32
	// blindSlices is how many slices a pacer lets go between two sleeps
	// while no watched relay waits: the connections nobody watches get
	// one at least that often.
	blindSlices = 8
	// distrustFor is how long a pacer sleeps as if nothing were watched
	// after a yield that no relay served (yieldWait).
	distrustFor = 10 * time.Millisecond
)

// yieldWait bounds a yield: a relay that is ready but does not run, or does
// not say Served, makes the pacer sleep for distrustFor. A variable for
// tests.
var yieldWait = time.Millisecond

// relays is Waiting, but in tests.
var relays = Waiting

// sleep is time.Sleep, but in tests.
var sleep = time.Sleep

// Pacer tells one writer when to pause. Its zero value pauses between
// every two slices, unless relays are watched (see the package's doc). It
// is not safe for concurrent use.
type Pacer struct {
	every   int // pause once per this many slices; 0: every slice
	n       int // slices since the last pause
	slept   int // sleeps so far
	yielded int // yields to a relay so far

	timer    *time.Timer // bounds a yield
	distrust time.Time   // until then, sleep: a yield was not served
}

// Hurried returns a pacer for a writer that must finish soon: it pauses
// once per 32 slices, so that a stopping stream's backlog of thousands of
// entries is written in tens of milliseconds, not seconds, and still no
// connection waits behind more than a few hundred microseconds of it.
func Hurried() *Pacer { return &Pacer{every: hurriedEvery} }

// Pause is called between two slices. A Hurried pacer sleeps for Pause
// once per 32 calls. Another yields to the watched relays if one is
// ready, goes on if none is (sleeping once per blindSlices calls), and
// sleeps for Pause if nothing is watched.
func (p *Pacer) Pause() {
	if p.n++; p.n < p.every {
		return
	}
	if p.every == 0 && (p.distrust.IsZero() || time.Now().After(p.distrust)) {
		p.distrust = time.Time{}
		switch relays() {
		case Ready:
			p.n = 0
			p.yielded++
			p.yieldToRelays()
			return
		case Idle:
			if p.n < blindSlices {
				return
			}
		}
	}
	p.n = 0
	p.slept++
	sleep(Pause)
}

// yieldToRelays yields until a relay has run. If one is still ready then
// (under load), the writer sleeps for the rest of Pause: the relays have
// the P meanwhile, as long as a sleep gave them, and it is not idle.
func (p *Pacer) yieldToRelays() {
	start := time.Now()
	if !p.yield() {
		p.distrust = time.Now().Add(distrustFor)
		return
	}
	if relays() == Ready {
		if rest := Pause - time.Since(start); rest > 0 {
			p.slept++
			sleep(rest)
		}
	}
}

// yield waits until a relay says Served, or yieldWait; it reports whether
// a relay did.
func (p *Pacer) yield() bool {
	served := servedChan()
	if p.timer == nil {
		p.timer = time.NewTimer(yieldWait)
	} else {
		p.timer.Reset(yieldWait)
	}
	defer p.timer.Stop()
	select {
	case <-served:
		return true
	case <-p.timer.C:
		return false
	}
}

// Slept is how many times the pacer slept.
func (p *Pacer) Slept() int { return p.slept }

// Yielded is how many times the pacer yielded to a ready relay.
func (p *Pacer) Yielded() int { return p.yielded }

// Relays is what Waiting found in the watched relays.
type Relays int

const (
	Unwatched Relays = iota // nothing is watched (or not on this system)
	Idle                    // nothing watched is ready
	Ready                   // a watched descriptor is ready
)

// served is closed by the next Served: the yielding pacers wait on it.
var served atomic.Pointer[chan struct{}]

func servedChan() <-chan struct{} {
	for {
		if c := served.Load(); c != nil {
			return *c
		}
		c := make(chan struct{})
		if served.CompareAndSwap(nil, &c) {
			return c
		}
	}
}

// Served is called by a watched relay at the end of each wake-up: the
// writers that yielded to it go on. Without one waiting it is one atomic
// load.
func Served() {
	if c := served.Load(); c != nil && served.CompareAndSwap(c, nil) {
		close(*c)
	}
}
