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
package logpace

import "time"

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
)

// sleep is time.Sleep, but in tests.
var sleep = time.Sleep

// Pacer tells one writer when to pause. Its zero value pauses between
// every two slices. It is not safe for concurrent use.
type Pacer struct {
	every int // pause once per this many slices; 0: every slice
	n     int // slices since the last pause
	slept int // pauses so far
}

// Hurried returns a pacer for a writer that must finish soon: it pauses
// once per 32 slices, so that a stopping stream's backlog of thousands of
// entries is written in tens of milliseconds, not seconds, and still no
// connection waits behind more than a few hundred microseconds of it.
func Hurried() *Pacer { return &Pacer{every: hurriedEvery} }

// Pause is called between two slices: it sleeps for Pause, or for a
// Hurried pacer, once per 32 calls.
func (p *Pacer) Pause() {
	if p.n++; p.n < p.every {
		return
	}
	p.n = 0
	p.slept++
	sleep(Pause)
}

// Slept is how many times the pacer paused.
func (p *Pacer) Slept() int { return p.slept }
