package streamstate

import (
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/cpu"
)

// Reason says why a connection ended.
type Reason uint32

// Disconnect reasons, as written in the connection log.
const (
	ReasonNone Reason = iota
	ReasonClientClose
	ReasonUpstreamClose
	ReasonClientError
	ReasonUpstreamError
	ReasonIdleTimeout
	ReasonDialFailed
	ReasonACLDenied
	ReasonMaxConnections
	ReasonShutdown
	ReasonStreamRemoved
	ReasonAdminClosed
	ReasonProxyHeaderFailed
	ReasonTLSHandshakeFailed
	ReasonConfigChanged
	ReasonStreamDisabled
	ReasonResponsesDone
	ReasonMaxPerIP
	ReasonRateLimited
	ReasonSourceShare
	ReasonSourceTableFull
	ReasonConnectionCap
	ReasonProxyHeaderInvalid
	ReasonProxyHeaderUntrusted
	ReasonProxyHeaderMissing
	ReasonUpstreamTLSFailed
	ReasonUpstreamLoop
)

var reasonNames = [...]string{
	ReasonNone:               "",
	ReasonClientClose:        "client_close",
	ReasonUpstreamClose:      "upstream_close",
	ReasonClientError:        "client_error",
	ReasonUpstreamError:      "upstream_error",
	ReasonIdleTimeout:        "idle_timeout",
	ReasonDialFailed:         "dial_failed",
	ReasonACLDenied:          "acl_denied",
	ReasonMaxConnections:     "max_connections",
	ReasonShutdown:           "shutdown",
	ReasonStreamRemoved:      "stream_removed",
	ReasonAdminClosed:        "admin_closed",
	ReasonProxyHeaderFailed:  "proxy_header_failed",
	ReasonTLSHandshakeFailed: "tls_handshake_failed",
	ReasonConfigChanged:      "config_changed",
	ReasonStreamDisabled:     "stream_disabled",
	ReasonResponsesDone:      "responses_done",
	ReasonMaxPerIP:           "max_connections_per_ip",
	ReasonRateLimited:        "rate_limited",
	ReasonSourceShare:        "source_share",
	ReasonSourceTableFull:    "source_table_full",
	ReasonConnectionCap:      "connection_cap",

	ReasonProxyHeaderInvalid:   "proxy_header_invalid",
	ReasonProxyHeaderUntrusted: "proxy_header_untrusted",
	ReasonProxyHeaderMissing:   "proxy_header_missing",
	ReasonUpstreamTLSFailed:    "upstream_tls_failed",
	ReasonUpstreamLoop:         "upstream_loop",
}

func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// SessionVar is the layer4 connection variable that holds the *Session the
// guard made for the connection.
const SessionVar = "aegis.session"

// DetachVar is the layer4 connection variable that the caller of a handler
// chain sets, to a func() that does its own end of the connection (the
// streams app: ConnDone), when the chain may return before the connection
// ends. A relay that parks a quiet connection then detaches its session
// (Session.Detach): the handlers return without ending it, and the relay
// ends it later (Session.Finish). Without it, as in a plain layer4 server,
// which closes the connection when the chain returns, nothing detaches.
const DetachVar = "aegis.detach"

// Waker is what holds a detached connection whose sockets no goroutine
// reads (a parked relay): Session.Close asks it to end the connection.
type Waker interface {
	// Wake ends ss's connection now if it is still held. It is called
	// before Close closes the sockets.
	Wake(ss *Session)
}

var lastSessionID atomic.Uint64

// Session is one open connection of a stream: a TCP connection, which the
// guard handler creates and the proxy handler relays through, or a UDP NAT
// entry. Counters are updated without locks.
type Session struct {
	ID     uint64
	State  *State
	Source netip.AddrPort
	Start  time.Time
	// UDP is true for a NAT entry of a UDP listener.
	UDP bool

	// IdleTimeout closes the connection when no byte moved either way for
	// this long; 0 disables it.
	IdleTimeout time.Duration

	// The bytes (and, for UDP, datagrams) each way, each pair written by
	// one direction's relay and kept in a cache line of its own, so the
	// two directions do not bounce one line between cores (bytes.go).
	_          cpu.CacheLinePad
	sent       atomic.Uint64
	dgSent     atomic.Uint64
	_          cpu.CacheLinePad
	received   atomic.Uint64
	dgReceived atomic.Uint64
	_          cpu.CacheLinePad
	folded     atomic.Bool  // the bytes were added to the stream's ended counters
	lastActive atomic.Int64 // unix nanoseconds
	reason     atomic.Uint32
	halfClose  atomic.Uint32 // the first side's end that half-close passed on
	closed     atomic.Bool
	idleTaken  atomic.Bool // a relay enforces the idle timeout (TakeIdle)
	slot       atomic.Bool // holds an Active slot of its stream
	cap        *Cap        // the listener's cap it holds one of, if any
	src        *Source     // its source's entry it holds a slot of, if any

	client   io.Closer
	conn     *Conn // the guard's wrapper of client (TCP), set before the relay starts
	upstream atomic.Pointer[net.Conn]
	peer     atomic.Pointer[Upstream] // the upstream it went to (SetPeer)
	// peerCounted: peer counts the session (SetPeer); written before
	// the session's relay starts, read by readers after peer.
	peerCounted bool
	port        atomic.Uint32 // the port it came in on, for a port range (SetListenPort)

	logger *zap.Logger
	name   string

	// endPolicy and done are what ends a detached connection (Finish):
	// the guard's policy and the chain's caller's own end (AllowDetach).
	endPolicy *Policy
	done      func()
	detached  atomic.Bool
	waker     atomic.Value // Waker, once detached
}

// newSession registers an open connection on the stream, holding no slot
// (Policy.Open registers an admitted one). client is the accepted
// connection (or the NAT entry); closing the session closes it. A UDP
// session has udp set before it is published.
func (s *State) newSession(client io.Closer, source netip.AddrPort, idle time.Duration, logger *zap.Logger, name string, udp bool) *Session {
	ss := &Session{
		UDP:         udp,
		ID:          lastSessionID.Add(1),
		State:       s,
		Source:      source,
		Start:       time.Now(),
		IdleTimeout: idle,
		client:      client,
		logger:      logger,
		name:        name,
	}
	s.sessions.Store(ss.ID, ss)
	if s.closing.Load() {
		// Shutdown has begun and may have missed this one.
		ss.Close(Reason(s.closeReason.Load()))
	}
	return ss
}

// SetListenPort records the port the connection came in on (a stream
// with a port range).
func (ss *Session) SetListenPort(p int) { ss.port.Store(uint32(p)) }

// ListenPort is the port SetListenPort recorded, or 0.
func (ss *Session) ListenPort() int { return int(ss.port.Load()) }

// Sent is the number of client→upstream bytes of this connection.
func (ss *Session) Sent() uint64 { return ss.sent.Load() }

// Received is the number of upstream→client bytes of this connection.
func (ss *Session) Received() uint64 { return ss.received.Load() }

// AddSent counts client→upstream bytes. The stream's counters see them
// when they are read (bytes.go); nothing shared is written.
func (ss *Session) AddSent(n int64) { ss.sent.Add(uint64(n)) }

// AddReceived counts upstream→client bytes, as AddSent does.
func (ss *Session) AddReceived(n int64) { ss.received.Add(uint64(n)) }

// AddDatagramSent counts one client→upstream datagram of n bytes.
func (ss *Session) AddDatagramSent(n int) {
	ss.dgSent.Add(1)
	ss.AddSent(int64(n))
}

// AddDatagramReceived counts one upstream→client datagram of n bytes.
func (ss *Session) AddDatagramReceived(n int) {
	ss.dgReceived.Add(1)
	ss.AddReceived(int64(n))
}

// DatagramsSent and DatagramsReceived count the datagrams of a UDP session.
func (ss *Session) DatagramsSent() uint64     { return ss.dgSent.Load() }
func (ss *Session) DatagramsReceived() uint64 { return ss.dgReceived.Load() }

// SetReason records why the connection ends; the first reason wins.
func (ss *Session) SetReason(r Reason) bool {
	return ss.reason.CompareAndSwap(uint32(ReasonNone), uint32(r))
}

// SetHalfClose records r, the end of one side that half-close passes on
// while the other direction goes on; the first one is kept. It is the
// connection's reason when it ends (End) with no other set: an idle
// timeout, a Close or an error that cuts the connection later is its
// reason instead.
func (ss *Session) SetHalfClose(r Reason) {
	ss.halfClose.CompareAndSwap(uint32(ReasonNone), uint32(r))
}

// SetFailure records r, an error of one side, when no reason is set yet or
// when the reason set is clean, that side's end of stream: a side that
// resets makes one direction read its end and the other fail, in either
// order, and data sent to a side that has closed is lost, which is an
// error too.
func (ss *Session) SetFailure(r, clean Reason) {
	if !ss.SetReason(r) {
		ss.reason.CompareAndSwap(uint32(clean), uint32(r))
	}
}

// Reason is the recorded disconnect reason.
func (ss *Session) Reason() Reason { return Reason(ss.reason.Load()) }

// SetUpstream records the upstream connection so that Close reaches it. If
// the session was closed meanwhile, the upstream is closed at once.
func (ss *Session) SetUpstream(c net.Conn) {
	ss.upstream.Store(&c)
	if ss.closed.Load() {
		c.Close()
	}
}

// Close ends the connection now for reason r: both sides are closed and
// the relay returns, or, if it parked the connection, ends it.
func (ss *Session) Close(r Reason) {
	ss.SetReason(r)
	ss.closed.Store(true)
	if w, ok := ss.waker.Load().(Waker); ok {
		w.Wake(ss)
	}
	ss.client.Close()
	if up := ss.upstream.Load(); up != nil {
		(*up).Close()
	}
}

// touch records activity now, for the idle timeout.
func (ss *Session) touch() { ss.lastActive.Store(time.Now().UnixNano()) }

// Closed reports whether Close was called.
func (ss *Session) Closed() bool { return ss.closed.Load() }

// ReleaseSlot gives back, once, the slots that Policy.Admit took for the
// session: its stream's Active slot (the max_connections count), its
// listener's cap and its source's slot in the per-source table. A relay
// that ends the connection calls it before it closes the client, so that a
// client which reconnects as soon as it sees the end is not refused for its
// own old slot; Policy.End calls it again,
// which is then a no-op.
func (ss *Session) ReleaseSlot() {
	if ss.slot.CompareAndSwap(true, false) {
		ss.State.Leave()
		if ss.cap != nil {
			ss.cap.n.Add(-1)
		}
		if ss.src != nil {
			ss.State.sources.release(ss.src)
		}
	}
}

// TakeIdle hands the idle timeout over to the relay that calls it: the
// guard's wrapper stops enforcing it, and the relay must, with the timeout
// it returns (0: none).
func (ss *Session) TakeIdle() time.Duration {
	ss.idleTaken.Store(true)
	return ss.IdleTimeout
}

// RawPath reports whether a relay may move the bytes of c, the client
// connection it was handed, between the raw sockets itself (splicing
// them): only when c is the session's own wrapper, with nothing in between
// that must see the bytes (TLS), and no rate limit applies. It returns the
// raw connection then, and the relay must count the bytes into the
// session (AddSent, AddReceived), which the wrapper no longer sees.
func (ss *Session) RawPath(c net.Conn) (*net.TCPConn, bool) {
	w := ss.conn
	if w == nil || c != net.Conn(w) || w.limited() {
		return nil, false
	}
	raw, ok := w.Conn.(*net.TCPConn)
	return raw, ok
}

// AllowDetach lets a relay finish the connection after the handlers have
// returned: p is the guard's policy, whose End the guard would run, and
// done the chain's caller's own end (the DetachVar's value).
func (ss *Session) AllowDetach(p *Policy, done func()) {
	ss.endPolicy, ss.done = p, done
}

// CanDetach reports whether AllowDetach was called.
func (ss *Session) CanDetach() bool { return ss.done != nil }

// Detach records that the relay took the end of the connection over (it
// parked it): the guard's Handle and its caller return without ending it,
// and the relay, or what holds it parked, calls Finish once, when it ends.
// Call it before the handlers return, once CanDetach.
func (ss *Session) Detach() { ss.detached.Store(true) }

// SetWaker makes Close ask w to end the connection (Waker) when it is
// parked in w. w is set once and stays the connection's.
func (ss *Session) SetWaker(w Waker) { ss.waker.Store(w) }

// Detached reports whether a relay took the end of the connection over.
func (ss *Session) Detached() bool { return ss.detached.Load() }

// Finish ends a detached connection, the one place that does what the
// handlers would have done on their way back: the guard's Policy.End
// (slots, counters, the connection log), then its caller's end, closing
// the client connection and the DetachVar's func. The relay calls it once,
// after it closed the upstream.
func (ss *Session) Finish() {
	ss.endPolicy.End(ss, ReasonClientClose)
	ss.client.Close()
	ss.done()
}

// End unregisters the connection, records its reason (defaulting to the
// end half-close passed on, if any, then to r, when none was set) and
// queues its log entry when log is true.
func (ss *Session) End(r Reason, log bool) {
	if h := Reason(ss.halfClose.Load()); h != ReasonNone {
		ss.SetReason(h)
	}
	ss.SetReason(r)
	ss.fold()
	ss.State.sessions.Delete(ss.ID)
	d := time.Since(ss.Start)
	ss.State.observeDuration(ss.UDP, d)
	if log {
		var upstream string
		if u := ss.peer.Load(); u != nil {
			upstream = u.Addr
		}
		ss.State.enqueueLog(logEntry{logger: ss.logger, rec: LogRecord{
			Upstream:          upstream,
			StreamID:          ss.State.ID,
			Stream:            ss.name,
			ConnID:            ss.ID,
			Source:            ss.Source,
			UDP:               ss.UDP,
			Reason:            ss.Reason(),
			Start:             ss.Start,
			Duration:          d,
			BytesSent:         ss.sent.Load(),
			BytesReceived:     ss.received.Load(),
			DatagramsSent:     ss.dgSent.Load(),
			DatagramsReceived: ss.dgReceived.Load(),
		}})
	}
}

// Discard unregisters a session that never carried a connection (a UDP
// NAT entry that lost the race to be stored): no log entry, and it is not
// counted in the connection duration metric.
func (ss *Session) Discard() {
	ss.fold()
	ss.State.sessions.Delete(ss.ID)
}
