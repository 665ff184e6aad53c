package streamstate

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The counters and histograms below feed the streams app's Prometheus
// metrics. They are never reset, so that the metrics only go up across
// reloads, and they are only touched where the event already happens: a
// refused connection, a dropped datagram, a dial, a connection's end. The
// relay of bytes does no extra work for them.

// BlockReason says why a connection, or the datagram of a new UDP client,
// was refused before it was relayed.
type BlockReason uint8

// Block reasons, as the metrics name them.
const (
	// BlockACL: the whitelist or blacklist refused the source.
	BlockACL BlockReason = iota
	// BlockMaxConnections: max_connections were open.
	BlockMaxConnections
	// BlockNATTableFull: a UDP stream address held its cap of entries
	// (FDBudget.NATCap, or MaxNATCap with max_connections set).
	BlockNATTableFull
	// BlockConnectionCap: with max_connections 0, the stream held its
	// default cap of connections (FDBudget.ConnCap).
	BlockConnectionCap
	// BlockMaxPerIP: the source held max_connections_per_ip.
	BlockMaxPerIP
	// BlockRateLimited: the source opened connection_rate_per_ip within
	// the window.
	BlockRateLimited
	// BlockSourceShare: with max_connections_per_ip 0, the source held its
	// default share of the stream's NAT entries or TLS handshakes in
	// progress (1/SourceShare).
	BlockSourceShare
	// BlockSourcesFull: the per-source table had no room for a new
	// source (MaxSources busy ones).
	BlockSourcesFull
	// BlockProxyHeaderInvalid: a malformed or incomplete PROXY header
	// (accept_proxy_protocol).
	BlockProxyHeaderInvalid
	// BlockProxyHeaderUntrusted: a PROXY header, or under required any
	// connection, from a source outside trusted_proxy_cidrs.
	BlockProxyHeaderUntrusted
	// BlockProxyHeaderMissing: no PROXY header under required.
	BlockProxyHeaderMissing
	numBlockReasons
)

var blockNames = [numBlockReasons]string{
	BlockACL:            "acl_denied",
	BlockMaxConnections: "max_connections",
	BlockNATTableFull:   "nat_table_full",
	BlockConnectionCap:  "connection_cap",
	BlockMaxPerIP:       "max_connections_per_ip",
	BlockRateLimited:    "rate_limited",
	BlockSourceShare:    "source_share",
	BlockSourcesFull:    "source_table_full",

	BlockProxyHeaderInvalid:   "proxy_header_invalid",
	BlockProxyHeaderUntrusted: "proxy_header_untrusted",
	BlockProxyHeaderMissing:   "proxy_header_missing",
}

func (r BlockReason) String() string {
	if r < numBlockReasons {
		return blockNames[r]
	}
	return "unknown"
}

// LogReason is the disconnect reason the connection log gives a refusal
// for r.
func (r BlockReason) LogReason() Reason {
	switch r {
	case BlockACL:
		return ReasonACLDenied
	case BlockMaxPerIP:
		return ReasonMaxPerIP
	case BlockRateLimited:
		return ReasonRateLimited
	case BlockSourceShare:
		return ReasonSourceShare
	case BlockSourcesFull:
		return ReasonSourceTableFull
	case BlockConnectionCap:
		return ReasonConnectionCap
	case BlockProxyHeaderInvalid:
		return ReasonProxyHeaderInvalid
	case BlockProxyHeaderUntrusted:
		return ReasonProxyHeaderUntrusted
	case BlockProxyHeaderMissing:
		return ReasonProxyHeaderMissing
	}
	return ReasonMaxConnections
}

// BlockReasons lists every block reason, in order.
func BlockReasons() []BlockReason {
	out := make([]BlockReason, numBlockReasons)
	for i := range out {
		out[i] = BlockReason(i)
	}
	return out
}

// DropReason says why a UDP datagram was dropped.
type DropReason uint8

// Drop reasons, as the metrics name them.
const (
	// DropRateLimit: over the entry's upload or download rate.
	DropRateLimit DropReason = iota
	// DropBufferFull: the socket could not take it now (send buffer full),
	// or the entry closed meanwhile.
	DropBufferFull
	// DropUpstreamRefused: the upstream answered with ICMP port
	// unreachable; the entry is closed.
	DropUpstreamRefused
	// DropUpstreamUnresolved: the upstream's host name has not resolved.
	DropUpstreamUnresolved
	// DropUpstreamSocket: no upstream socket could be opened for a new
	// client (e.g. out of file descriptors).
	DropUpstreamSocket
	// DropTruncated: a client datagram larger than the read buffer, or
	// without a readable source address.
	DropTruncated
	// DropListenerClosed: a reply had no listening socket to leave from.
	DropListenerClosed
	numDropReasons
)

var dropNames = [numDropReasons]string{
	DropRateLimit:          "rate_limit",
	DropBufferFull:         "buffer_full",
	DropUpstreamRefused:    "upstream_refused",
	DropUpstreamUnresolved: "upstream_unresolved",
	DropUpstreamSocket:     "upstream_socket_error",
	DropTruncated:          "truncated",
	DropListenerClosed:     "listener_closed",
}

func (r DropReason) String() string {
	if r < numDropReasons {
		return dropNames[r]
	}
	return "unknown"
}

// DropReasons lists every drop reason, in order.
func DropReasons() []DropReason {
	out := make([]DropReason, numDropReasons)
	for i := range out {
		out[i] = DropReason(i)
	}
	return out
}

// Histogram buckets, in seconds.
var (
	// DurationBuckets spans a connection's life: a quick request to a
	// long-lived session.
	DurationBuckets = []float64{0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400}
	// DialBuckets spans a dial: a loopback connect to a slow network.
	DialBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}
)

func (s *State) initMetrics() {
	for k := range s.durations {
		s.durations[k] = prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "aegis_stream_connection_duration_seconds", Help: "How long connections lasted.", Buckets: DurationBuckets,
		})
	}
	s.dials = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "aegis_stream_dial_duration_seconds", Help: "How long successful dials took.", Buckets: DialBuckets,
	})
}

// Block counts a refused connection (or datagram of a new UDP client) for
// reason r, in Blocked and in BlockedBy.
func (s *State) Block(r BlockReason) {
	s.Blocked.Add(1)
	s.blockedBy[r].Add(1)
}

// BlockedBy counts the refusals for reason r since the state was created.
func (s *State) BlockedBy(r BlockReason) uint64 { return s.blockedBy[r].Load() }

// DropDatagrams counts n dropped UDP datagrams for reason r, in
// DatagramsDropped and in DroppedBy.
func (s *State) DropDatagrams(r DropReason, n uint64) {
	s.DatagramsDropped.Add(n)
	s.droppedBy[r].Add(n)
}

// DroppedBy counts the datagrams dropped for reason r since the state was
// created.
func (s *State) DroppedBy(r DropReason) uint64 { return s.droppedBy[r].Load() }

// ObserveDial records how long a successful dial to the upstream took.
func (s *State) ObserveDial(d time.Duration) { s.dials.Observe(d.Seconds()) }

func (s *State) observeDuration(udp bool, d time.Duration) {
	k := TCP
	if udp {
		k = UDP
	}
	s.durations[k].Observe(d.Seconds())
}

// ConnectionDurations is the histogram of how long the stream's
// connections (TCP) or NAT entries (UDP) lasted, since the state was
// created. It is for reading (Write); the state observes it.
func (s *State) ConnectionDurations(k Kind) prometheus.Metric { return s.durations[k] }

// DialDurations is the histogram of the successful dials to the upstream,
// since the state was created. It is for reading (Write).
func (s *State) DialDurations() prometheus.Metric { return s.dials }

// Totals are counters since the state was created, across reloads.
type Totals struct {
	// Connections is Total's count: TCP connections accepted (blocked
	// ones included) and UDP NAT entries opened.
	Connections uint64
	// BytesSent went client→upstream, BytesReceived upstream→client.
	BytesSent, BytesReceived uint64
}

// Cumulative returns the counters that ResetTotals zeroes, as if it never
// had.
func (s *State) Cumulative() Totals {
	s.totalsMu.Lock()
	defer s.totalsMu.Unlock()
	b := s.bytesLocked()
	return Totals{
		Connections:   s.carried.Connections + s.Total.Load(),
		BytesSent:     b[dirSent],
		BytesReceived: b[dirReceived],
	}
}

// SinceReload returns the counters since the last ResetTotals: the
// connections of Total and the bytes relayed since.
func (s *State) SinceReload() Totals {
	s.totalsMu.Lock()
	defer s.totalsMu.Unlock()
	b := s.bytesLocked()
	return Totals{
		Connections:   s.Total.Load(),
		BytesSent:     b[dirSent] - s.baseBytes[dirSent],
		BytesReceived: b[dirReceived] - s.baseBytes[dirReceived],
	}
}
