package streamstate

import "sync/atomic"

// Handshakes are the TLS handshake counters of a stream, which its aegis_tls
// handlers share, so that a new handler (a reload, a chain swap) keeps
// counting and keeps max_handshakes true across the change. Each handshake
// counts in one of the four totals.
type Handshakes struct {
	// InProgress is the number of handshakes running now.
	InProgress atomic.Int64
	// Succeeded counts completed handshakes.
	Succeeded atomic.Uint64
	// Failed counts handshakes begun that did not complete, timeouts
	// not included: a client that does not speak TLS or gives up, no
	// certificate, a protocol error.
	Failed atomic.Uint64
	// TimedOut counts handshakes that did not complete within the
	// handshake timeout.
	TimedOut atomic.Uint64
	// Rejected counts connections closed before any handshake because
	// max_handshakes were in progress, or max_handshakes_per_ip from
	// their source.
	Rejected atomic.Uint64
	// RejectedPerIP counts those of Rejected closed for
	// max_handshakes_per_ip.
	RejectedPerIP atomic.Uint64

	handlers atomic.Int32 // aegis_tls handlers attached
}

// Handshakes returns the stream's TLS handshake counters.
func (s *State) Handshakes() *Handshakes { return &s.tls }

// Attach records that an aegis_tls handler counts into h; Detach that it
// no longer does.
func (h *Handshakes) Attach() { h.handlers.Add(1) }

// Detach undoes one Attach.
func (h *Handshakes) Detach() { h.handlers.Add(-1) }

// Attached reports whether an aegis_tls handler counts into h now.
func (h *Handshakes) Attached() bool { return h.handlers.Load() > 0 }
