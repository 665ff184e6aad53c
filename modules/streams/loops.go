package streams

import (
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// A stream whose upstream is a stream's own listener (its own, or
// another's that may relay back) opens connections to itself until the
// process has no file descriptor left; one whose upstream is Caddy's admin
// endpoint gives whoever reaches the stream the unauthenticated admin API.
// Validation refuses both where it can see them: an upstream_host that is
// an IP address or localhost. A host name that resolves to a local address
// later is caught at run time (streamstate.IsOwnListener). Relaying to
// Caddy's HTTP sites stays allowed.

// adminEndpoint is where Caddy's admin endpoint listens.
type adminEndpoint struct {
	where string       // as configured, for messages
	addrs []netip.Addr // the zero Addr: every address
	port  int
}

// adminListenAddress is the admin endpoint's network address in the config
// being loaded (see adminEndpointOf); ok is false when it is off, or not
// a TCP port (a unix socket).
func adminListenAddress(ctx caddy.Context) (caddy.NetworkAddress, bool) {
	listen := caddy.DefaultAdminListen
	if cfg := reflect.ValueOf(ctx).FieldByName("cfg"); cfg.IsValid() && cfg.Kind() == reflect.Pointer && !cfg.IsNil() {
		if adm := cfg.Elem().FieldByName("Admin"); adm.IsValid() && adm.Kind() == reflect.Pointer && !adm.IsNil() {
			if d := adm.Elem().FieldByName("Disabled"); d.IsValid() && d.Kind() == reflect.Bool && d.Bool() {
				return caddy.NetworkAddress{}, false
			}
			if l := adm.Elem().FieldByName("Listen"); l.IsValid() && l.Kind() == reflect.String && l.String() != "" {
				listen = l.String()
			}
		}
	}
	na, err := caddy.ParseNetworkAddress(listen)
	if err != nil || na.IsUnixNetwork() || na.IsFdNetwork() || na.StartPort == 0 {
		return caddy.NetworkAddress{}, false
	}
	return na, true
}

// adminEndpointOf finds the admin endpoint of the config being loaded.
// Caddy keeps the config's admin settings out of the modules' reach, so
// they are read from the context by reflection; a Caddy whose context is
// laid out otherwise gives the default (caddy.DefaultAdminListen), and
// TestUpstreamLoopRefused (package admin) fails. ok is false when the endpoint is off or
// on a unix socket.
func adminEndpointOf(ctx caddy.Context) (adminEndpoint, bool) {
	na, ok := adminListenAddress(ctx)
	if !ok {
		return adminEndpoint{}, false
	}
	ae := adminEndpoint{where: net.JoinHostPort(na.Host, strconv.Itoa(int(na.StartPort))), port: int(na.StartPort)}
	switch host := strings.TrimSuffix(strings.ToLower(na.Host), "."); {
	case host == "":
		ae.addrs = []netip.Addr{{}}
	case isLocalhostName(host):
		ae.addrs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	default:
		ip, err := netip.ParseAddr(host)
		if err != nil {
			return adminEndpoint{}, false // a name: cannot tell
		}
		ip = ip.Unmap().WithZone("")
		if ip == netip.IPv6Unspecified() {
			ip = netip.Addr{}
		}
		ae.addrs = []netip.Addr{ip}
	}
	return ae, true
}

// isLocalhostName reports whether a host name always means this machine
// (RFC 6761: localhost and every name under it).
func isLocalhostName(h string) bool {
	h = strings.TrimSuffix(strings.ToLower(h), ".")
	return h == "localhost" || strings.HasSuffix(h, ".localhost")
}

// upstreamAddrs are the addresses s's upstream_host stands for, as far as
// validation can tell without resolving names: an IP address, or the
// loopback addresses for localhost. nil for other names.
func upstreamAddrs(s *spec.Stream) []netip.Addr {
	if isLocalhostName(s.UpstreamHost) {
		return []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	}
	ip, err := netip.ParseAddr(s.UpstreamHost)
	if err != nil {
		return nil
	}
	return []netip.Addr{ip.Unmap().WithZone("")}
}

// localAddrs tells whether an address is this machine's: a loopback
// address or one of its interfaces' (read once, when first needed).
type localAddrs struct {
	read bool
	m    map[netip.Addr]bool
}

func (l *localAddrs) has(ip netip.Addr) bool {
	if ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	if !l.read {
		l.read = true
		l.m = map[netip.Addr]bool{}
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, ia := range addrs {
				if n, ok := ia.(*net.IPNet); ok {
					if a, ok := netip.AddrFromSlice(n.IP); ok {
						l.m[a.Unmap()] = true
					}
				}
			}
		}
	}
	return l.m[ip]
}

// reaches reports whether a connection to target reaches a listener on
// addr (from listenAddr: the zero Addr is every address, 0.0.0.0 every
// IPv4 address) on the same port.
func reaches(target, addr netip.Addr, local *localAddrs) bool {
	switch {
	case target.IsUnspecified(): // connecting to 0.0.0.0 or :: reaches this machine
		return true
	case !addr.IsValid():
		return local.has(target)
	case addr == netip.IPv4Unspecified():
		return target.Is4() && local.has(target)
	}
	return target == addr
}

// relaysInto returns the transports ("tcp", "udp" or "tcp+udp") on which
// from's upstream is to's listener, or "".
func relaysInto(from, to *spec.Stream, local *localAddrs) string {
	if from.UpstreamPort != to.ListenPort {
		return ""
	}
	addr, ok := listenAddr(to)
	if !ok {
		return ""
	}
	hit := false
	for _, t := range upstreamAddrs(from) {
		if reaches(t, addr, local) {
			hit = true
			break
		}
	}
	if !hit {
		return ""
	}
	switch tcp, udp := from.HasTCP() && to.HasTCP(), from.HasUDP() && to.HasUDP(); {
	case tcp && udp:
		return spec.ProtocolTCPUDP
	case tcp:
		return spec.ProtocolTCP
	case udp:
		return spec.ProtocolUDP
	}
	return ""
}

// loopFix ends every message about a loop.
const loopFix = "point upstream_host and upstream_port at the real server"

// upstreamLoops returns an error for each of listeners (enabled streams,
// s among them if s itself is to be checked) whose listener s's upstream
// is, and one if it is Caddy's admin endpoint.
func (a *App) upstreamLoops(s *spec.Stream, listeners []*spec.Stream, local *localAddrs) []error {
	if !spec.ValidPort(s.UpstreamPort) {
		return nil
	}
	var errs []error
	for _, o := range listeners {
		shared := relaysInto(s, o, local)
		if shared == "" {
			continue
		}
		var reason string
		if o == s || o.ID == s.ID {
			reason = fmt.Sprintf("with upstream_port %d this is the stream's own listener (%s/%s): it would relay every connection to itself, again and again, until the process has no file descriptor left; %s",
				s.UpstreamPort, o.ListenWhere(), shared, loopFix)
		} else {
			reason = fmt.Sprintf("with upstream_port %d this is the listener of %s (%s/%s): a stream may not relay into another stream of this process, which loops as soon as one relays back; %s",
				s.UpstreamPort, spec.StreamLabel(o.ID, o.Name), o.ListenWhere(), shared, loopFix)
		}
		errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "upstream_host", Value: s.UpstreamHost, Reason: reason})
	}
	if ae := a.admin; a.hasAdmin && s.UpstreamPort == ae.port && s.HasTCP() {
		for _, t := range upstreamAddrs(s) {
			if slices.ContainsFunc(ae.addrs, func(addr netip.Addr) bool { return reaches(t, addr, local) }) {
				errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "upstream_host", Value: s.UpstreamHost,
					Reason: fmt.Sprintf("with upstream_port %d this is Caddy's admin endpoint (%s): whoever reaches this stream would control Caddy without a password; %s",
						s.UpstreamPort, ae.where, loopFix)})
				break
			}
		}
	}
	return errs
}

// relayedInto returns an error for each of others whose upstream is s's
// listener: s would take a port that a stream relays to.
func relayedInto(s *spec.Stream, others []*spec.Stream, local *localAddrs) []error {
	var errs []error
	for _, o := range others {
		if o.ID == s.ID {
			continue
		}
		shared := relaysInto(o, s, local)
		if shared == "" {
			continue
		}
		errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_port", Value: s.ListenPort, Inline: true,
			Reason: fmt.Sprintf("(%s) is where %s relays to (upstream %s): a stream may not relay into another stream of this process, which loops as soon as one relays back; use another port, or change that stream's upstream",
				shared, spec.StreamLabel(o.ID, o.Name), o.UpstreamHostPort())})
	}
	return errs
}
