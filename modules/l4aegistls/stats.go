package l4aegistls

import "github.com/aegis-proxy/caddy-aegis/modules/streamstate"

// HandshakeStats counts the TLS handshakes of a stream since its shared
// state was created (streamstate.Handshakes). The three totals are
// disjoint.
type HandshakeStats struct {
	// Succeeded counts completed handshakes.
	Succeeded uint64
	// Failed counts handshakes begun that did not complete: a timeout, a
	// client that does not speak TLS or gives up, no certificate for the
	// cert_id, a protocol error.
	Failed uint64
	// Rejected counts connections closed before any handshake because
	// max_handshakes were in progress, or max_handshakes_per_ip from their
	// source.
	Rejected uint64
	// RejectedPerIP counts those of Rejected closed for
	// max_handshakes_per_ip.
	RejectedPerIP uint64
	// InProgress is the number of handshakes running now.
	InProgress int64
}

func snapshot(hs *streamstate.Handshakes) HandshakeStats {
	return HandshakeStats{
		Succeeded:     hs.Succeeded.Load(),
		Failed:        hs.Failed.Load() + hs.TimedOut.Load(),
		Rejected:      hs.Rejected.Load(),
		RejectedPerIP: hs.RejectedPerIP.Load(),
		InProgress:    hs.InProgress.Load(),
	}
}

// Stats returns the handshake counters of stream streamID, and false when
// no provisioned aegis_tls handler has that stream_id.
func Stats(streamID int64) (HandshakeStats, bool) {
	st := streamstate.Lookup(streamID)
	if st == nil || !st.Handshakes().Attached() {
		return HandshakeStats{}, false
	}
	return snapshot(st.Handshakes()), true
}
