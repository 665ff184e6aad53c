package streamstate

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// DefaultUDPIdleTimeout ends a UDP NAT entry after no datagram moved
// either way for this long, when the stream sets no idle timeout. (A TCP
// connection without one is never ended for being idle.)
const DefaultUDPIdleTimeout = 60 * time.Second

// Limits are a stream's admission settings as its config states them. The
// TCP guard (aegis_guard) and the UDP relay (udpnat) take them from here,
// through one Policy, so that both transports apply them alike.
type Limits struct {
	// Name names the stream in the connection log.
	Name string
	// Whitelist, when not empty, allows only sources inside it; Blacklist
	// refuses sources inside it. CIDRs, or bare IPs (/32, /128).
	Whitelist, Blacklist []string
	// MaxConnections caps the stream's TCP connections and UDP NAT
	// entries open together; 0 = unlimited.
	MaxConnections int
	// UploadRate and DownloadRate are bytes per second per TCP connection
	// or UDP client (see Bucket); 0 = unlimited.
	UploadRate, DownloadRate int64
	// IdleTimeout ends a connection (NAT entry) when no byte moved either
	// way for this long; 0 = never for TCP, DefaultUDPIdleTimeout for UDP.
	IdleTimeout time.Duration
	// MaxConnectionsPerIP caps the TCP connections and UDP NAT entries
	// open together from one source (IPv6: one /64, see SourceKey);
	// 0 = on a listener whose cap has a Default (UDP), SourcePart of it;
	// otherwise unlimited.
	MaxConnectionsPerIP int
	// ConnectionRatePerIP admits at most that many new connections (UDP:
	// new NAT entries) per source in ConnectionRateWindow, as a token
	// bucket (Rate); 0 = unlimited.
	ConnectionRatePerIP int
	// ConnectionRateWindow is the rate's window; 0 = DefaultRateWindow.
	ConnectionRateWindow time.Duration
	// LogConnections logs every connection's end, and refused sources
	// once per source per BlockedLogEvery.
	LogConnections bool
	// ProxyAccept takes PROXY headers from the sources in TrustedProxies
	// (CIDRs or bare IPs, required unless ProxyAccept is ProxyOff): the
	// header's client is then the connection's source everywhere. A TCP
	// header must arrive within ProxyHeaderTimeout (0:
	// DefaultProxyHeaderTimeout).
	ProxyAccept        ProxyAccept
	TrustedProxies     []string
	ProxyHeaderTimeout time.Duration
}

// DefaultRateWindow is connection_rate_window_seconds' default.
const DefaultRateWindow = 60 * time.Second

// Policy is the admission policy of a stream: who may connect (the access
// lists), how many may be open (max_connections and a listener's own cap),
// the per-connection limits (rate buckets, idle timeout) and the logging
// of refusals. It is built once per config from the stream's settings and
// never changed: an edit builds a new one, which the guard's chain swap
// and the relay's SetConfig put in force atomically. Safe for concurrent
// use.
//
// A TCP connection goes Admit → Open → Wrap; a UDP datagram of a new
// client goes Admit → Open, its entry's buckets from Buckets.
type Policy struct {
	Limits
	acl     ACL
	rate    Rate
	connCap int // the default cap of TCP connections (Budget().ConnCap)
	trusted ipSet
	logger  *zap.Logger
}

// NewPolicy checks l and parses its access lists. logger is the one the
// policy's connection-log lines are queued with (the stream's connection
// logger takes precedence when set, see SetConnLogger). An error names the
// field and its value.
func NewPolicy(l Limits, logger *zap.Logger) (*Policy, error) {
	switch {
	case l.MaxConnections < 0:
		return nil, fmt.Errorf("max_connections %d: must be >= 0 (0 = unlimited)", l.MaxConnections)
	case l.UploadRate < 0:
		return nil, fmt.Errorf("upload_rate_bytes %d: must be >= 0 (0 = unlimited)", l.UploadRate)
	case l.DownloadRate < 0:
		return nil, fmt.Errorf("download_rate_bytes %d: must be >= 0 (0 = unlimited)", l.DownloadRate)
	case l.IdleTimeout < 0:
		return nil, fmt.Errorf("idle_timeout %s: must be >= 0 (0 = never)", l.IdleTimeout)
	case l.MaxConnectionsPerIP < 0:
		return nil, fmt.Errorf("max_connections_per_ip %d: must be >= 0 (0 = unlimited)", l.MaxConnectionsPerIP)
	case l.ConnectionRatePerIP < 0:
		return nil, fmt.Errorf("connection_rate_per_ip %d: must be >= 0 (0 = unlimited)", l.ConnectionRatePerIP)
	case l.ConnectionRateWindow < 0:
		return nil, fmt.Errorf("connection_rate_window %s: must be >= 0 (0 = %s)", l.ConnectionRateWindow, DefaultRateWindow)
	case l.ProxyHeaderTimeout < 0:
		return nil, fmt.Errorf("proxy_header_timeout %s: must be >= 0 (0 = %s)", l.ProxyHeaderTimeout, DefaultProxyHeaderTimeout)
	case l.ProxyAccept > ProxyRequired:
		return nil, fmt.Errorf("accept_proxy_protocol %d: must be off, optional or required", l.ProxyAccept)
	case l.ProxyAccept != ProxyOff && len(l.TrustedProxies) == 0:
		return nil, fmt.Errorf("trusted_proxy_cidrs: required when accept_proxy_protocol is %s; list the front proxies' addresses", l.ProxyAccept)
	}
	acl, err := NewACL(l.Whitelist, l.Blacklist)
	if err != nil {
		return nil, err
	}
	trusted, err := parseList("trusted_proxy_cidrs", l.TrustedProxies)
	if err != nil {
		return nil, err
	}
	if l.ProxyHeaderTimeout == 0 {
		l.ProxyHeaderTimeout = DefaultProxyHeaderTimeout
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	p := &Policy{Limits: l, acl: acl, trusted: newIPSet(trusted), connCap: Budget().ConnCap, logger: logger}
	if l.ConnectionRatePerIP > 0 {
		p.rate = Rate{N: l.ConnectionRatePerIP, Window: l.ConnectionRateWindow}
		if p.rate.Window == 0 {
			p.rate.Window = DefaultRateWindow
		}
	}
	return p, nil
}

// Allowed applies the access lists to ip.
func (p *Policy) Allowed(ip netip.Addr) bool { return p.acl.Allowed(ip) }

// Idle is the idle timeout of a TCP connection or (udp) a NAT entry.
func (p *Policy) Idle(udp bool) time.Duration {
	if udp && p.IdleTimeout <= 0 {
		return DefaultUDPIdleTimeout
	}
	return p.IdleTimeout
}

// A Cap bounds what one listener holds on top of max_connections: the UDP
// relay's NAT table of one stream address holds at most Max entries, and
// by default (max_connections 0) at most Default. Its count is the
// listener's own; the zero Cap is unbounded and counts.
type Cap struct {
	// Max is the bound; 0 = none.
	Max int64
	// Default is the bound while max_connections is 0 (0: Max); one
	// source may hold SourcePart of it unless max_connections_per_ip says
	// otherwise.
	Default int64
	n       atomic.Int64
}

// bound is c's bound under p; perSource what one source may hold by
// default (0: no default): a share of Default, whatever max_connections
// says (the default protects the process's descriptors; a lower
// max_connections bounds the source too).
func (c *Cap) bound(p *Policy) (bound, perSource int64) {
	bound = c.Max
	if c.Default > 0 {
		perSource = int64(SourcePart(int(c.Default)))
		if p.MaxConnections == 0 && (bound == 0 || c.Default < bound) {
			bound = c.Default
		}
	}
	return bound, perSource
}

// Admission is what an admitted connection holds until its session gives
// it back: a slot of the listener's cap and of its source's entry.
type Admission struct {
	cap *Cap
	src *Source
}

// Len is what the listener holds now.
func (c *Cap) Len() int64 { return c.n.Load() }

// Admit decides whether a new connection, or the first datagram of a new
// UDP client, from src may open on stream st. It checks, in order, the
// access lists; the per-source limits (max_connections_per_ip, or on a
// listener with a cap the source's default share of it, and
// connection_rate_per_ip), in st's per-source table; the listener's cap
// (nil: none); and max_connections, which counts the TCP connections and
// UDP entries of st together (0: for TCP, the default cap of
// FDBudget.ConnCap). Admitted, the connection holds one of st's Active
// slots, one of the cap's and one of its source's, which Open hands to its
// session (or Unadmit gives back); refused, it holds nothing, is counted
// in st's Blocked by reason, and its source is logged at most once per
// BlockedLogEvery. A stream without per-source limits does not touch the
// table.
func (p *Policy) Admit(st *State, src netip.AddrPort, udp bool, c *Cap) (Admission, bool) {
	ip := src.Addr().Unmap()
	if !p.acl.Allowed(ip) {
		p.refuse(st, src, udp, BlockACL)
		return Admission{}, false
	}
	a := Admission{cap: c}
	var bound int64
	perIP, share := int64(p.MaxConnectionsPerIP), false
	if c != nil {
		var part int64
		bound, part = c.bound(p)
		if perIP == 0 {
			perIP, share = part, true
		}
	}
	if perIP > 0 || p.rate.on() {
		s, r, ok := st.sources.take(ip, int32(min(perIP, 1<<30)), share, p.rate)
		if !ok {
			p.refuse(st, src, udp, r)
			return Admission{}, false
		}
		a.src = s
	}
	if c != nil {
		if n := c.n.Add(1); bound > 0 && n > bound {
			c.n.Add(-1)
			p.unsource(st, a)
			p.refuse(st, src, udp, BlockNATTableFull)
			return Admission{}, false
		}
	}
	max, why := p.MaxConnections, BlockMaxConnections
	if max == 0 && !udp {
		max, why = p.connCap, BlockConnectionCap
	}
	if !st.takeSlot(max) {
		if c != nil {
			c.n.Add(-1)
		}
		p.unsource(st, a)
		p.refuse(st, src, udp, why)
		return Admission{}, false
	}
	return a, true
}

// unsource gives back the source's slot and rate token of a connection
// refused after the per-source check.
func (p *Policy) unsource(st *State, a Admission) {
	if a.src != nil {
		st.sources.untake(a.src, p.rate)
	}
}

// Unadmit gives back what Admit took, for a connection admitted that could
// not open (its upstream socket failed). Its rate token stays spent.
func (p *Policy) Unadmit(st *State, a Admission) {
	st.Leave()
	if a.cap != nil {
		a.cap.n.Add(-1)
	}
	if a.src != nil {
		st.sources.release(a.src)
	}
}

// refuse counts and logs a refused connection; the caller closes it (TCP)
// or drops the datagram (UDP).
func (p *Policy) refuse(st *State, src netip.AddrPort, udp bool, r BlockReason) {
	st.Block(r)
	if p.LogConnections {
		st.LogBlocked(p.logger, p.Name, src, r.LogReason(), udp)
	}
}

// Open registers the session of an admitted connection on st: client is
// the accepted connection (or the NAT entry), which closing the session
// closes; a is what Admit gave. The session holds the slots Admit took and gives them back once
// (Session.ReleaseSlot), at the latest when it ends.
func (p *Policy) Open(st *State, client io.Closer, src netip.AddrPort, udp bool, a Admission) *Session {
	ss := st.newSession(client, src, p.Idle(udp), p.logger, p.Name, udp)
	ss.cap, ss.src = a.cap, a.src
	ss.slot.Store(true)
	return ss
}

// End ends session ss with reason r (unless one was recorded) and queues
// its connection-log line if the policy logs connections.
func (p *Policy) End(ss *Session, r Reason) {
	ss.ReleaseSlot()
	ss.End(r, p.LogConnections)
}

// Buckets returns the rate buckets of a new connection (nil: unlimited).
// A TCP connection's start empty, as it shapes; a UDP client's start full,
// as it polices (see Bucket).
func (p *Policy) Buckets(udp bool, now time.Time) (up, down *Bucket) {
	return NewBucket(p.UploadRate, udp, now), NewBucket(p.DownloadRate, udp, now)
}

// Wrap puts the guard's wrapper around the client connection c of TCP
// session ss: it counts the bytes, applies the rate limits and, until a
// relay takes it over (Session.TakeIdle), the idle timeout.
func (p *Policy) Wrap(c net.Conn, ss *Session) *Conn {
	up, down := p.Buckets(false, time.Now())
	return newConn(c, ss, up, down)
}

// takeSlot counts one more open connection (or UDP NAT entry) in Active,
// unless max (> 0) are open already, and reports whether it did; max <= 0
// means no limit. Unlike adding one and taking it back when over, it never
// puts Active above max, even for an instant: the stats never show the cap
// passed, and a connection is never refused for a slot that a refused one
// held for that instant. A refusal writes nothing shared.
func (s *State) takeSlot(max int) bool {
	if max <= 0 {
		s.Active.Add(1)
		return true
	}
	for {
		n := s.Active.Load()
		if n >= int64(max) {
			return false
		}
		if s.Active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Leave gives back a slot that takeSlot counted. The last one to leave while
// the stream shuts down wakes Destruct, which waits for it.
func (s *State) Leave() {
	if s.Active.Add(-1) == 0 && s.draining.Load() {
		signal(s.idle)
	}
}
