package streamstate

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
)

// A stream whose upstream is one of this process's own stream listeners
// relays every connection to itself, which opens another, until the
// process has no file descriptor left. Validation refuses the loops it can
// see (modules/streams/validate.go); this is the run-time check for the
// others: a host name that resolves to a local address, a loop through a
// plain layer4 route. The TCP dial (aegis_proxy) and the UDP relay check
// the resolved upstream address before the socket connects, so a loop
// never makes the connection that would be the next turn of it.

// ErrUpstreamLoop is the dial error of an upstream address that is one of
// this process's own stream listeners.
var ErrUpstreamLoop = errors.New("the upstream address is one of this process's own stream listeners (upstream_loop); point the stream's upstream at the real server")

// Listener is one socket a stream listens on.
type Listener struct {
	UDP bool
	// Addr is the address; the zero Addr is every address of both
	// families, 0.0.0.0 every IPv4 address.
	Addr netip.Addr
	Port uint16
}

// listenerSet is an immutable set of Listeners, for lookups without a lock.
type listenerSet struct {
	exact map[netip.AddrPort]uint8 // transport bits
	wild  map[uint16]uint8         // every address of both families
	wild4 map[uint16]uint8         // every IPv4 address
	ports map[uint16]uint8         // every port listened on, any address
	local map[netip.Addr]bool      // this machine's interface addresses
}

const (
	bitTCP uint8 = 1 << iota
	bitUDP
)

func transportBit(udp bool) uint8 {
	if udp {
		return bitUDP
	}
	return bitTCP
}

var listeners atomic.Pointer[listenerSet]

// SetListeners replaces the set of this process's stream listeners. The
// streams app calls it when it binds or closes one; it also reads this
// machine's interface addresses, which a wildcard listener answers on.
func SetListeners(ls []Listener) {
	set := &listenerSet{exact: map[netip.AddrPort]uint8{}, wild: map[uint16]uint8{}, wild4: map[uint16]uint8{},
		ports: map[uint16]uint8{}, local: map[netip.Addr]bool{}}
	for _, l := range ls {
		bit := transportBit(l.UDP)
		set.ports[l.Port] |= bit
		a := l.Addr.Unmap().WithZone("")
		switch {
		case !a.IsValid() || a == netip.IPv6Unspecified():
			set.wild[l.Port] |= bit
		case a == netip.IPv4Unspecified():
			set.wild4[l.Port] |= bit
		default:
			set.exact[netip.AddrPortFrom(a, l.Port)] |= bit
		}
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, ia := range addrs {
			if n, ok := ia.(*net.IPNet); ok {
				if a, ok := netip.AddrFromSlice(n.IP); ok {
					set.local[a.Unmap()] = true
				}
			}
		}
	}
	listeners.Store(set)
}

// IsOwnListener reports whether a connection to ap (udp: a datagram) would
// reach one of this process's stream listeners. It takes no lock and
// allocates nothing.
func IsOwnListener(udp bool, ap netip.AddrPort) bool {
	set := listeners.Load()
	if set == nil {
		return false
	}
	bit := transportBit(udp)
	port := ap.Port()
	if set.ports[port]&bit == 0 {
		return false
	}
	a := ap.Addr().Unmap().WithZone("")
	if a.IsUnspecified() {
		return true // connecting to 0.0.0.0 or :: reaches this machine
	}
	if set.exact[netip.AddrPortFrom(a, port)]&bit != 0 {
		return true
	}
	w := set.wild[port]
	if a.Is4() {
		w |= set.wild4[port]
	}
	return w&bit != 0 && (a.IsLoopback() || set.local[a])
}

// CheckUpstream returns ErrUpstreamLoop if address ("ip:port", as a
// net.Dialer's Control function gets it) is one of this process's stream
// listeners.
func CheckUpstream(udp bool, address string) error {
	ap, err := netip.ParseAddrPort(address)
	if err == nil && IsOwnListener(udp, ap) {
		return ErrUpstreamLoop
	}
	return nil
}
