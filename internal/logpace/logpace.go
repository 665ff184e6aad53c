// Package logpace paces the goroutines that write the connection log (the
// zap lines and the stored entries) so that they never hold the
// connections back for long.
//
// With GOMAXPROCS=1 (one P) a goroutine that does not block keeps every
// other from running, and a relay woken by the network waits until it
// does. So a log writer works in small slices with a short sleep between:
// long enough that Go's scheduler, finding nothing else to run, polls the
// network before it ends. Small slices matter: with 2 entries, not 16, the
// short-connection rate went from about 0.92 to 0.99 × HAProxy's in
// alternating rounds (the clients sat idle while a slice of 16 ran).
//
// A sleep that ends much later than asked means nothing else wanted the
// CPU (the scheduler waited in the network poller, whose timeout is in
// milliseconds): the writer then writes the next entries without a pause,
// so that a burst written while the process is idle (a stream stopped with
// thousands of connections) is not spread over seconds of 1 ms sleeps.
package logpace

import "time"

const (
	// Slice is how many entries a writer writes between two pauses.
	Slice = 2
	// Pause is how long a writer sleeps between two slices.
	Pause = 20 * time.Microsecond
	// idle is how late a sleep must end for the process to count as idle.
	idle = 500 * time.Microsecond
	// idleRun is how many slices follow an idle sleep without a pause.
	idleRun = 32
)

// now and sleep are time.Now and time.Sleep, but in tests.
var (
	now   = time.Now
	sleep = time.Sleep
)

// Pacer tells one writer when to pause. Its zero value is ready; it is
// not safe for concurrent use.
type Pacer struct {
	free int // slices left to write without a pause
}

// Pause is called between two slices: it sleeps for Pause unless the last
// sleep found the process idle.
func (p *Pacer) Pause() {
	if p.free > 0 {
		p.free--
		return
	}
	start := now()
	sleep(Pause)
	if now().Sub(start) >= idle {
		p.free = idleRun
	}
}
