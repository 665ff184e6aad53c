package l4aegistls

import (
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// handshakes is the TLS state of one stream that its handlers share, so
// that a new handler (a reload, a chain swap) keeps counting and keeps
// max_handshakes true across the change.
type handshakes struct {
	inProgress atomic.Int64
	succeeded  atomic.Uint64
	failed     atomic.Uint64 // timeouts not included
	timedOut   atomic.Uint64
	rejected   atomic.Uint64
}

// Destruct implements caddy.Destructor.
func (*handshakes) Destruct() error { return nil }

func (hs *handshakes) snapshot() HandshakeStats {
	return HandshakeStats{
		Succeeded:  hs.succeeded.Load(),
		Failed:     hs.failed.Load() + hs.timedOut.Load(),
		Rejected:   hs.rejected.Load(),
		InProgress: hs.inProgress.Load(),
	}
}

// HandshakeStats counts the TLS handshakes of a stream since its first
// aegis_tls handler was provisioned. The three totals are disjoint.
type HandshakeStats struct {
	// Succeeded counts completed handshakes.
	Succeeded uint64
	// Failed counts handshakes begun that did not complete: a timeout, a
	// client that does not speak TLS or gives up, no certificate for the
	// cert_id, a protocol error.
	Failed uint64
	// Rejected counts connections closed before any handshake because
	// max_handshakes were in progress.
	Rejected uint64
	// InProgress is the number of handshakes running now.
	InProgress int64
}

// pool holds the handshake state of each stream_id (> 0) that a
// provisioned handler uses, released in Cleanup.
var pool = caddy.NewUsagePool()

func acquire(streamID int64) *handshakes {
	v, _, _ := pool.LoadOrNew(streamID, func() (caddy.Destructor, error) {
		return new(handshakes), nil
	})
	return v.(*handshakes)
}

func release(streamID int64) { _, _ = pool.Delete(streamID) }

// Stats returns the handshake counters of stream streamID, and false when
// no provisioned aegis_tls handler has that stream_id.
func Stats(streamID int64) (HandshakeStats, bool) {
	var hs *handshakes
	pool.Range(func(k, v any) bool {
		if k.(int64) == streamID {
			hs = v.(*handshakes)
			return false
		}
		return true
	})
	if hs == nil {
		return HandshakeStats{}, false
	}
	return hs.snapshot(), true
}

// Outcomes are the handshakes of a stream by outcome, for its metrics;
// each handshake counts in one of them.
type Outcomes struct {
	// OK is HandshakeStats.Succeeded.
	OK uint64
	// Failed counts the failures other than timeouts.
	Failed uint64
	// TimedOut counts the handshakes that did not complete within the
	// handshake timeout.
	TimedOut uint64
	// Rejected is HandshakeStats.Rejected: closed at max_handshakes.
	Rejected uint64
}

// AllOutcomes returns the handshake outcomes of every stream id that a
// provisioned aegis_tls handler uses.
func AllOutcomes() map[int64]Outcomes {
	out := map[int64]Outcomes{}
	pool.Range(func(k, v any) bool {
		hs := v.(*handshakes)
		out[k.(int64)] = Outcomes{OK: hs.succeeded.Load(), Failed: hs.failed.Load(), TimedOut: hs.timedOut.Load(), Rejected: hs.rejected.Load()}
		return true
	})
	return out
}
