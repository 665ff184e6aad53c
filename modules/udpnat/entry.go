package udpnat

import (
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// entry is one client's NAT entry: the client's address, its own upstream
// socket, counters and limits.
type entry struct {
	upSock // its socket connected to the upstream (poll_linux.go, entry_other.go)

	r    *Relay
	key  netip.AddrPort // the client's address as the socket reports it
	cfg  *config
	peer int // its upstream: cfg.picker.Peer(peer)
	ss   *streamstate.Session

	last atomic.Int64 // unix nanoseconds of the last datagram either way
	dead atomic.Bool
	// pending counts the replies still expected with Config.Responses:
	// each client datagram adds Responses, each reply takes one. The
	// reply that brings it to 0 makes it -1: the entry is closing, and
	// the client's next datagram opens a new entry.
	pending atomic.Int64

	up, down *streamstate.Bucket // nil: unlimited
	hdr      []byte              // PROXY v2 header put in front of each datagram
	to       replyAddr
}

// newEntry opens the upstream socket of a new client src that sent to
// dst; the PROXY header sent upstream, if any, names hsrc and hdst (the
// same, or a front proxy's client).
func (r *Relay) newEntry(s *socket, p *config, target, src, dst, hsrc, hdst netip.AddrPort) (*entry, error) {
	var hdr []byte
	if p.ProxyV2 {
		var err error
		if hdr, err = proxyHeader(hsrc, hdst); err != nil {
			return nil, err
		}
	}
	e := &entry{r: r, key: src, cfg: p, hdr: hdr}
	if err := e.dial(target); err != nil {
		return nil, err
	}
	now := time.Now()
	e.up, e.down = p.Policy.Buckets(true, now)
	e.to = makeReplyAddr(s, src, dst)
	e.last.Store(now.UnixNano())
	return e, nil
}

// proxyHeader is the PROXY v2 header (DGRAM) for datagrams from src to
// dst. IPv4-mapped addresses are written as IPv4; when the two families
// differ, both are written as IPv6.
func proxyHeader(src, dst netip.AddrPort) ([]byte, error) {
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	tp := proxyproto.UDPv4
	if !sa.Is4() || !da.Is4() {
		sa, da = netip.AddrFrom16(sa.As16()), netip.AddrFrom16(da.As16())
		tp = proxyproto.UDPv6
	}
	h := &proxyproto.Header{
		Version:           2,
		Command:           proxyproto.PROXY,
		TransportProtocol: tp,
		SourceAddr:        net.UDPAddrFromAddrPort(netip.AddrPortFrom(sa, src.Port())),
		DestinationAddr:   net.UDPAddrFromAddrPort(netip.AddrPortFrom(da, dst.Port())),
	}
	return h.Format()
}

// gone reports whether the entry has ended or is closing after its
// answers: a datagram of its client needs a new entry.
func (e *entry) gone() bool { return e.dead.Load() || e.pending.Load() < 0 }

// expect reports whether the entry takes a datagram from its client, and
// with Responses counts the replies it asks for. It is false once the
// entry has ended or is closing after its answers.
func (e *entry) expect() bool {
	n := int64(e.cfg.Responses)
	if n == 0 {
		return !e.dead.Load()
	}
	for {
		v := e.pending.Load()
		if v < 0 || e.dead.Load() {
			return false
		}
		if e.pending.CompareAndSwap(v, v+n) {
			return true
		}
	}
}

// unexpect takes back what expect counted for a datagram that was
// dropped: no reply will come for it. If that leaves nothing expected and
// replies came (to the datagrams before it, while it was on its way), the
// entry got its answers: it is marked closing, as answered would have,
// and unexpect reports true, once, for the caller to end it.
func (e *entry) unexpect() (answered bool) {
	n := int64(e.cfg.Responses)
	for n > 0 {
		v := e.pending.Load()
		if v <= 0 {
			return false
		}
		left := max(v-n, 0)
		if left == 0 && e.ss.DatagramsReceived() > 0 {
			left = -1
		}
		if e.pending.CompareAndSwap(v, left) {
			return left < 0
		}
	}
	return false
}

// answered counts n replies from the upstream. It reports true, once, when
// they were the last ones expected: the caller then ends the entry.
// Replies that nothing asked for are relayed and not counted.
func (e *entry) answered(n int) bool {
	if e.cfg.Responses == 0 {
		return false
	}
	for {
		v := e.pending.Load()
		if v <= 0 {
			return false
		}
		left := v - int64(n)
		if left <= 0 {
			if e.pending.CompareAndSwap(v, -1) {
				return true
			}
		} else if e.pending.CompareAndSwap(v, left) {
			return false
		}
	}
}

// discard closes an entry that lost the race to be stored, unlogged.
func (e *entry) discard() {
	e.dead.Store(true)
	e.ss.ReleaseSlot()
	e.ss.Discard()
	e.closeSock()
}

// end closes the entry for reason (the first reason wins): whatever waits
// for its replies (the relay's poller on Linux) then closes its socket,
// unregisters it and writes its log line.
func (e *entry) end(reason streamstate.Reason) {
	if e.kill(reason) {
		e.wake()
	}
}

// finish closes the entry's socket (on Linux, which takes it out of the
// poller's epoll instance), and ends its session with reason unless one
// was recorded; once per entry, after it was started.
func (e *entry) finish(reason streamstate.Reason) {
	e.kill(reason)
	e.closeSock()
	e.cfg.Policy.End(e.ss, reason)
	e.r.state.ConnDone()
	e.r.wg.Done()
}

// kill records reason (the first one wins) and marks the entry ended, out
// of the NAT table; it reports whether this call ended it.
func (e *entry) kill(reason streamstate.Reason) bool {
	// ReasonNone: the session's Close, which recorded its reason, and may
	// come while open is still setting e.ss.
	if reason != streamstate.ReasonNone && e.ss != nil {
		e.ss.SetReason(reason)
	}
	if !e.dead.CompareAndSwap(false, true) {
		return false
	}
	e.r.entries.CompareAndDelete(e.key, e)
	return true
}

// Close ends the entry; the session calls it when an admin or a shutdown
// closes the session (which records the reason first).
func (e *entry) Close() error {
	e.end(streamstate.ReasonNone)
	return nil
}

// upstream is the entry's upstream address, host:port.
func (e *entry) upstream() string { return e.cfg.picker.Peer(e.peer).Addr }

// refused marks the entry's upstream failed after an ICMP unreachable,
// so new entries, the client's next datagram's among them, go to another
// one while there is one.
func (e *entry) refused(err error) {
	e.cfg.picker.Failed(e.peer, err)
}
