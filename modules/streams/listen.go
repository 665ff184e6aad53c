package streams

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/modules/udpnat"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// bound counts the stream addresses that this process's stream listeners
// hold, across config loads: a reload binds the same address again with
// SO_REUSEPORT while the old listener still runs, and that must not be
// mistaken for a port taken by somebody else.
var bound = struct {
	sync.Mutex
	m map[string]int
	// ports are the keys of m by network/port, so that heldLocked looks
	// only at the listeners of one port (a port range binds thousands).
	ports map[string]map[string]bool
}{m: map[string]int{}, ports: map[string]map[string]bool{}}

func portKey(network string, port int) string { return network + "/" + strconv.Itoa(port) }

func boundKey(network string, s *spec.Stream) string { return network + "/" + s.ListenHostPort() }

// listen binds the stream's TCP listener. A port that something else holds
// (another program, or Caddy's own admin endpoint or HTTP servers, which
// also use SO_REUSEPORT and would otherwise silently share it) is refused
// with an error that names the stream, the port and the fix.
func listen(ctx caddy.Context, s *spec.Stream) (net.Listener, error) {
	// Accepted sockets inherit SO_KEEPALIVE from the listener, which spares
	// Go's four setsockopt calls on each of them.
	ln, err := bind(ctx, s, "tcp", net.ListenConfig{KeepAlive: -1, Control: l4aegisproxy.KeepAliveControl})
	if err != nil {
		return nil, err
	}
	return ln.(net.Listener), nil
}

// tcpListener is the *net.TCPListener under ln, Caddy's wrapper of it
// (which counts the listener's users), for the event loop's accept4 on its
// socket; nil if there is none.
func tcpListener(ln net.Listener) *net.TCPListener {
	for range 4 {
		switch l := ln.(type) {
		case *net.TCPListener:
			return l
		case interface{ Unwrap() net.Listener }:
			ln = l.Unwrap()
			continue
		}
		// Caddy's wrapper embeds the listener and has no Unwrap.
		v := reflect.ValueOf(ln)
		if v.Kind() != reflect.Struct {
			return nil
		}
		f := v.FieldByName("Listener")
		if !f.IsValid() || !f.CanInterface() {
			return nil
		}
		inner, ok := f.Interface().(net.Listener)
		if !ok || inner == nil {
			return nil
		}
		ln = inner
	}
	return nil
}

// listenUDP binds the stream's UDP socket, checked like listen. It returns
// the socket to read and write, and Caddy's wrapper of it, to close.
func listenUDP(ctx caddy.Context, s *spec.Stream) (*net.UDPConn, net.PacketConn, error) {
	v, err := bind(ctx, s, "udp", net.ListenConfig{Control: udpnat.ListenControl})
	if err != nil {
		return nil, nil, err
	}
	pc := v.(net.PacketConn)
	inner := pc
	if u, ok := pc.(interface{ Unwrap() net.PacketConn }); ok {
		inner = u.Unwrap()
	}
	uc, ok := inner.(*net.UDPConn)
	if !ok {
		pc.Close()
		unbind(s, "udp")
		return nil, nil, fmt.Errorf("stream %d (%q): udp listener is a %T, not a UDP socket", s.ID, s.DisplayName(), inner)
	}
	return uc, pc, nil
}

func bind(ctx caddy.Context, s *spec.Stream, network string, lc net.ListenConfig) (any, error) {
	key := boundKey(network, s)
	bound.Lock()
	defer bound.Unlock()
	if !heldLocked(s, network) {
		if err := probeLocked(s, network); err != nil {
			return nil, err
		}
	}
	na := caddy.NetworkAddress{Network: socketNetwork(network, s), Host: s.ListenAddress, StartPort: uint(s.ListenPort), EndPort: uint(s.ListenPort)}
	ln, err := na.Listen(ctx, 0, lc)
	if err != nil {
		return nil, bindError(s, network, err)
	}
	bound.m[key]++
	pk := portKey(network, s.ListenPort)
	if bound.ports[pk] == nil {
		bound.ports[pk] = map[string]bool{}
	}
	bound.ports[pk][key] = true
	publishListenersLocked()
	return ln, nil
}

// publishListenersLocked hands the addresses in bound to the upstream-loop
// check of the TCP dial and the UDP relay (streamstate.IsOwnListener).
// The caller holds bound.
func publishListenersLocked() {
	ls := make([]streamstate.Listener, 0, len(bound.m))
	for key := range bound.m {
		network, hp, _ := strings.Cut(key, "/")
		host, port, err := net.SplitHostPort(hp)
		pn, perr := strconv.ParseUint(port, 10, 16)
		if err != nil || perr != nil {
			continue
		}
		l := streamstate.Listener{UDP: network == "udp", Port: uint16(pn)}
		if host != "" {
			if l.Addr, err = netip.ParseAddr(host); err != nil {
				continue
			}
		}
		ls = append(ls, l)
	}
	streamstate.SetListeners(ls)
}

// socketNetwork is the network ("tcp" or "udp") to bind s's address with.
// An IPv4 address, 0.0.0.0 included, gets an IPv4 socket ("tcp4"): Go
// binds 0.0.0.0 on "tcp" as a dual-stack [::] socket, which would answer
// IPv6 clients too. "::" and no address keep both families.
func socketNetwork(network string, s *spec.Stream) string {
	if ip, err := netip.ParseAddr(s.ListenAddress); err == nil && ip.Unmap().Is4() {
		return network + "4"
	}
	return network
}

// probeBind checks that s's address can be bound for network now, unless a
// stream listener of this process holds it.
func probeBind(s *spec.Stream, network string) error {
	bound.Lock()
	defer bound.Unlock()
	if heldLocked(s, network) {
		return nil
	}
	return probeLocked(s, network)
}

// heldLocked reports whether a stream listener of this process holds s's
// port on an address that overlaps s's, as when a stream moves from
// 127.0.0.1 to 0.0.0.0 on the same port: the probe would fail on our own
// socket, and the listeners may overlap (they use SO_REUSEPORT) while the
// old one closes. Conflicts between streams are validation's job. The
// caller holds bound.
func heldLocked(s *spec.Stream, network string) bool {
	want, ok := listenAddr(s)
	if !ok {
		return false
	}
	for key := range bound.ports[portKey(network, s.ListenPort)] {
		n := bound.m[key]
		rest, found := strings.CutPrefix(key, network+"/")
		if !found || n <= 0 {
			continue
		}
		host, port, err := net.SplitHostPort(rest)
		if err != nil || port != strconv.Itoa(s.ListenPort) {
			continue
		}
		held, ok := listenAddr(&spec.Stream{ListenAddress: host, ListenPort: s.ListenPort})
		if ok && addrsOverlap(want, held) {
			return true
		}
	}
	return false
}

// probeLocked binds s's address without SO_REUSEPORT and lets it go: it
// fails if anyone holds the port. The caller holds bound.
func probeLocked(s *spec.Stream, network string) error {
	var probe io.Closer
	var err error
	if network == "udp" {
		probe, err = net.ListenPacket(socketNetwork(network, s), s.ListenHostPort())
	} else {
		probe, err = net.Listen(socketNetwork(network, s), s.ListenHostPort())
	}
	if err != nil {
		return bindError(s, network, err)
	}
	return probe.Close()
}

// unbind forgets one listener of the stream's address.
func unbind(s *spec.Stream, network string) {
	key := boundKey(network, s)
	bound.Lock()
	defer bound.Unlock()
	if bound.m[key]--; bound.m[key] <= 0 {
		delete(bound.m, key)
		pk := portKey(network, s.ListenPort)
		if delete(bound.ports[pk], key); len(bound.ports[pk]) == 0 {
			delete(bound.ports, pk)
		}
		publishListenersLocked()
	}
}

func bindError(s *spec.Stream, network string, err error) error {
	what := "cannot listen"
	hint := "check listen_address and listen_port"
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		what = "already in use (by another program, or by Caddy's admin endpoint or an HTTP server)"
		hint = "choose a free port"
	case errors.Is(err, syscall.EACCES):
		what = "permission denied"
		hint = "use a port above 1023 or give the binary CAP_NET_BIND_SERVICE"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		what = "address not available on this machine"
		hint = "use an address of one of this machine's interfaces, or 0.0.0.0"
	}
	where := "every address"
	if s.ListenAddress != "" {
		where = strconv.Quote(s.ListenAddress)
	}
	return &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_port", Value: s.ListenPort,
		Reason: fmt.Sprintf("(%s) on %s: %s: %v; %s", network, where, what, err, hint), Inline: true}
}
