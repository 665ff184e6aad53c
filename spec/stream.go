package spec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Protocols a stream can carry.
const (
	ProtocolTCP    = "tcp"
	ProtocolUDP    = "udp"
	ProtocolTCPUDP = "tcp+udp"
)

// Defaults applied when a setting is left at 0.
const (
	// DefaultConnectionTimeout bounds the dial to the upstream.
	DefaultConnectionTimeout = 10 * time.Second
	// DefaultHealthCheckInterval is the time between two health checks.
	DefaultHealthCheckInterval = 30 * time.Second
	// DefaultConnectionRateWindow is connection_rate_window_seconds'
	// default.
	DefaultConnectionRateWindow = 60 * time.Second
	// DefaultProxyHeaderTimeout bounds the wait for a front proxy's PROXY
	// header.
	DefaultProxyHeaderTimeout = 5 * time.Second
	// DefaultFailTimeout is how long an upstream whose dial failed is
	// skipped.
	DefaultFailTimeout = 10 * time.Second
)

// accept_proxy_protocol values.
const (
	ProxyAcceptOff      = "off"
	ProxyAcceptOptional = "optional"
	ProxyAcceptRequired = "required"
)

// Load balancing methods.
const (
	BalanceRoundRobin       = "round_robin"
	BalanceLeastConnections = "least_connections"
	BalanceSourceHash       = "source_hash"
	BalanceRandom           = "random"
	BalanceFirst            = "first"
)

// MaxPortRange is the most ports a stream's listen range may have.
const MaxPortRange = 10000

// Limits of the upstreams list.
const (
	MaxUpstreams = 64
	MaxWeight    = 100
)

// Upstream is one of a stream's upstreams.
type Upstream struct {
	// Host is a hostname or an IP address. Required.
	Host string `json:"host"`
	// Port is 1–65535. Required.
	Port int `json:"port"`
	// Weight is its share of the connections, 1–MaxWeight (100), for
	// round_robin, least_connections and random. Default: 0, meaning 1.
	Weight int `json:"weight,omitempty"`
	// Backup upstreams get connections only while no other one is up.
	// Default: false.
	Backup bool `json:"backup,omitempty"`
}

// UnmarshalJSON refuses keys that are not an upstream's fields: a
// misspelt weight would be silently 1.
func (u *Upstream) UnmarshalJSON(b []byte) error {
	type plain Upstream
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p plain
	if err := dec.Decode(&p); err != nil {
		return fmt.Errorf("upstream %s: %v (the fields are host, port, weight and backup)", b, err)
	}
	*u = Upstream(p)
	return nil
}

// ParseUpstreamOptions parses what follows <host:port> in the Caddyfile's
// `upstream <host:port> [weight <n>] [backup]`, for the streams app and
// the aegis_proxy handler alike; name is the upstream, for errors.
func ParseUpstreamOptions(name string, opts []string) (weight int, backup bool, err error) {
	seen := map[string]bool{}
	for i := 0; i < len(opts); i++ {
		a := opts[i]
		if seen[a] {
			return 0, false, fmt.Errorf("%s: %q given twice", name, a)
		}
		seen[a] = true
		switch a {
		case "backup":
			backup = true
		case "weight":
			if i+1 >= len(opts) {
				return 0, false, fmt.Errorf("%s: weight: want a number, e.g. weight 3", name)
			}
			i++
			n, err := strconv.Atoi(opts[i])
			if err != nil || n < 1 || n > MaxWeight {
				return 0, false, fmt.Errorf("%s: weight %q: want a whole number from 1 to %d", name, opts[i], MaxWeight)
			}
			weight = n
		default:
			return 0, false, fmt.Errorf("%s: unknown %q; want <host:port> [weight <n>] [backup]", name, a)
		}
	}
	return weight, backup, nil
}

// HostPort is the upstream's address, as host:port.
func (u Upstream) HostPort() string {
	return net.JoinHostPort(u.Host, strconv.Itoa(u.Port))
}

// EffectiveWeight is the weight with its default applied.
func (u Upstream) EffectiveWeight() int { return max(u.Weight, 1) }

// Stream is one stream host: a listen address and port relayed to an
// upstream. It is the one description of a stream used by the config, the
// API and storage. Field names and meanings are the spec's stream settings.
type Stream struct {
	// ID identifies the stream. Required, unique, > 0.
	ID int64 `json:"id"`

	// Name is a human-readable name, at most MaxNameLength (200)
	// characters. Default: "stream-<id>".
	Name string `json:"name,omitempty"`

	// Protocol is "tcp", "udp" or "tcp+udp" (one listener of each on the
	// same port). Default: "tcp".
	Protocol string `json:"protocol,omitempty"`

	// ListenAddress is the IP address to bind. "0.0.0.0" is every IPv4
	// address, "::" every address. Default: "" (every address, IPv4 and IPv6).
	ListenAddress string `json:"listen_address,omitempty"`

	// ListenPort is the port to listen on, 1–65535. Required.
	ListenPort int `json:"listen_port"`

	// ListenPortEnd, when set, makes the stream listen on every port from
	// listen_port to listen_port_end, inclusive, at most MaxPortRange
	// (10,000) ports. A connection (datagram) to port listen_port + k goes
	// to port upstream_port + k of the upstream (of each upstream), unless
	// upstream_port_fixed. Default: 0 (listen_port alone).
	ListenPortEnd int `json:"listen_port_end,omitempty"`

	// UpstreamPortFixed sends every port of a range to upstream_port (to
	// each upstream's own port) instead of upstream_port + k.
	// Default: false.
	UpstreamPortFixed bool `json:"upstream_port_fixed,omitempty"`

	// UpstreamHost is the upstream's hostname or IP address. Required.
	UpstreamHost string `json:"upstream_host"`

	// UpstreamPort is the upstream's port, 1–65535. Required.
	UpstreamPort int `json:"upstream_port"`

	// Upstreams are several upstreams to balance the connections over,
	// at most MaxUpstreams. When set, upstream_host and upstream_port may
	// be left out and then show the first one; given, they must be the
	// first one. Default: empty (the one upstream of upstream_host and
	// upstream_port).
	Upstreams []Upstream `json:"upstreams,omitempty"`

	// LoadBalancing picks the upstream of each new connection (a UDP
	// client's NAT entry): "round_robin" (weighted), "least_connections",
	// "source_hash" (a client IP keeps its upstream while it is up),
	// "random" or "first" (the first one up). Default: "round_robin".
	LoadBalancing string `json:"load_balancing,omitempty"`

	// FailTimeoutSeconds is how long new connections skip an upstream
	// whose dial failed (a UDP one that answered ICMP unreachable).
	// Default: 0, meaning 10 seconds.
	FailTimeoutSeconds int `json:"fail_timeout_seconds,omitempty"`

	// Enabled turns the stream on. A disabled stream does not listen.
	// Default: true.
	Enabled bool `json:"enabled"`

	// MaxConnections caps concurrent connections; a connection beyond it is
	// closed at once. On UDP it caps the live NAT entries (clients); a new
	// client beyond it is dropped, existing ones go on. On tcp+udp the cap
	// holds for both together. Default: 0 (unlimited; UDP still stops at
	// udpnat.HardCap, 100,000 entries per stream).
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxConnectionsPerIP caps the concurrent connections (UDP: NAT
	// entries; tcp+udp: both together) from one source IP, IPv6 sources
	// counted by /64; one beyond it is closed at once (a UDP datagram
	// dropped). Default: 0 (unlimited; a UDP source still holds at most an
	// eighth of the stream's default NAT cap).
	MaxConnectionsPerIP int `json:"max_connections_per_ip,omitempty"`

	// ConnectionRatePerIP caps the new connections (UDP: new NAT entries)
	// from one source IP (IPv6: one /64) per ConnectionRateWindowSeconds,
	// as a token bucket: a source may open that many at once, then one
	// more each window/rate. One beyond it is closed at once.
	// Default: 0 (unlimited).
	ConnectionRatePerIP int `json:"connection_rate_per_ip,omitempty"`

	// ConnectionRateWindowSeconds is the window of ConnectionRatePerIP.
	// Default: 0, meaning 60 seconds.
	ConnectionRateWindowSeconds int `json:"connection_rate_window_seconds,omitempty"`

	// ConnectionTimeoutSeconds bounds the dial to the upstream.
	// Default: 0, meaning 10 seconds.
	ConnectionTimeoutSeconds int `json:"connection_timeout_seconds,omitempty"`

	// IdleTimeoutSeconds closes a connection after no byte moved in either
	// direction for this long, and evicts a UDP NAT entry after no datagram
	// moved either way for this long. Default: 0 (TCP: never, keepalive
	// still detects dead peers; UDP: 60 seconds).
	IdleTimeoutSeconds int `json:"idle_timeout_seconds,omitempty"`

	// UDPResponses is how many datagrams the upstream sends back for each
	// datagram from a UDP client (1 for DNS). Once they have all arrived,
	// the client's NAT entry closes at once (disconnect_reason
	// responses_done) instead of waiting for the idle timeout; the
	// client's next datagram opens a new one. As nginx's proxy_responses.
	// Default: 0 (off: entries end on the idle timeout).
	UDPResponses int `json:"udp_responses,omitempty"`

	// HalfClose keeps a TCP connection open after one side has finished
	// sending (a FIN): the end is passed on and the other direction runs
	// until its own end. Needed by protocols whose client shuts its write
	// side and then waits for the reply (nc -N, rsh, some HTTP/1.0
	// clients). When false, either side's end closes both sides at once,
	// after the bytes already read are written out, and the connection's
	// max_connections slot is free before the client sees the end.
	// Default: false.
	HalfClose bool `json:"half_close,omitempty"`

	// ProxyProtocolVersion sends a PROXY protocol header to the upstream
	// before any client byte: 0 (off), 1 (text) or 2 (binary). On UDP only 2
	// is allowed, and the header goes in front of every datagram. Default: 0.
	ProxyProtocolVersion int `json:"proxy_protocol_version,omitempty"`

	// AcceptProxyProtocol reads the PROXY protocol header (v1 or v2) that
	// a front proxy (HAProxy, an AWS NLB, nginx, another Aegis) sends, and
	// takes the client address in it as the connection's everywhere: the
	// access lists, max_connections, the connection log, the live
	// connection list and the PROXY header sent upstream. "off", "optional"
	// (a connection from trusted_proxy_cidrs may start with a header; the
	// bytes of other sources go through as they are) or "required" (every
	// connection must come from trusted_proxy_cidrs and start with a
	// header). A UDP datagram from a trusted source may (must) start with a
	// v2 header, which is taken off before the datagram goes upstream.
	// Default: "off".
	AcceptProxyProtocol string `json:"accept_proxy_protocol,omitempty"`

	// TrustedProxyCIDRs are the front proxies that may send a PROXY header:
	// CIDRs or bare IPs. Required when accept_proxy_protocol is not off.
	// Default: empty.
	TrustedProxyCIDRs []string `json:"trusted_proxy_cidrs,omitempty"`

	// ProxyHeaderTimeoutSeconds is how long a TCP connection from a trusted
	// proxy has to send its whole PROXY header; it is closed after.
	// Default: 0, meaning 5 seconds.
	ProxyHeaderTimeoutSeconds int `json:"proxy_header_timeout_seconds,omitempty"`

	// WhitelistCIDRs, when not empty, allows only sources inside one of
	// these CIDRs. A bare IP means /32 (IPv4) or /128 (IPv6). Default: empty
	// (allow all).
	WhitelistCIDRs []string `json:"whitelist_cidrs,omitempty"`

	// BlacklistCIDRs rejects sources inside one of these CIDRs, checked
	// after the whitelist. Default: empty.
	BlacklistCIDRs []string `json:"blacklist_cidrs,omitempty"`

	// SNI are the TLS server names this stream takes on a listen address
	// and port that TCP streams share: exact (db.example.com) or
	// one-level wildcards (*.example.com). Each connection's ClientHello
	// picks the stream; at most one stream on the port leaves SNI empty
	// and takes the clients no name matches, and those without TLS.
	// Protocol tcp only, without a port range. Default: empty (the port
	// is the stream's own, or it is the shared port's default).
	SNI []string `json:"sni,omitempty"`

	// SSLEnabled terminates TLS on the listener. Default: false.
	SSLEnabled bool `json:"ssl_enabled,omitempty"`

	// SSLCertID is the certificate store ID used when SSLEnabled is set.
	// Default: 0 (none).
	SSLCertID int64 `json:"ssl_cert_id,omitempty"`

	// SSLCertTag (Caddy config only) serves, instead of a stored
	// certificate, one that Caddy's tls app loaded with this tag (e.g.
	// `tls { load_files cert.pem key.pem { tags db } }` in JSON terms).
	// Default: "".
	SSLCertTag string `json:"ssl_cert_tag,omitempty"`

	// SSLDomain (Caddy config only) serves, instead of a stored
	// certificate, the certificate that Caddy's tls app obtains and renews
	// for this name. Default: "".
	SSLDomain string `json:"ssl_domain,omitempty"`

	// UpstreamTLS opens TLS to the upstream, whether or not the stream
	// terminates TLS from the client. The upstream's certificate is
	// verified against the system's roots, or upstream_tls_ca, for the
	// name upstream_tls_server_name. TCP only. Default: false.
	UpstreamTLS bool `json:"upstream_tls,omitempty"`

	// UpstreamTLSServerName is the name sent (SNI) and verified in the
	// upstream's certificate. Default: upstream_host (an IP address is
	// verified against the certificate's IP addresses, and not sent).
	UpstreamTLSServerName string `json:"upstream_tls_server_name,omitempty"`

	// UpstreamTLSCA is the PEM text of one or more CA certificates that
	// the upstream's certificate must chain to, instead of the system's
	// roots. Default: "" (the system's roots).
	UpstreamTLSCA string `json:"upstream_tls_ca,omitempty"`

	// UpstreamTLSClientCertID is a stored certificate, with its key, that
	// Aegis presents to the upstream (mutual TLS). It cannot be deleted
	// while a stream uses it. Default: 0 (none).
	UpstreamTLSClientCertID int64 `json:"upstream_tls_client_cert_id,omitempty"`

	// UpstreamTLSInsecureSkipVerify accepts any certificate from the
	// upstream: the connection is encrypted but anyone on the path can
	// pose as the upstream. For tests only. Default: false.
	UpstreamTLSInsecureSkipVerify bool `json:"upstream_tls_insecure_skip_verify,omitempty"`

	// UploadRateBytes limits client→upstream bytes per second for each
	// connection. Default: 0 (unlimited).
	UploadRateBytes int64 `json:"upload_rate_bytes,omitempty"`

	// DownloadRateBytes limits upstream→client bytes per second for each
	// connection. Default: 0 (unlimited).
	DownloadRateBytes int64 `json:"download_rate_bytes,omitempty"`

	// HealthCheckEnabled runs a periodic TCP dial to the upstream. A UDP-only
	// stream is not checked (a TCP dial says nothing about a UDP service);
	// its health shows not_checked. Default: false.
	HealthCheckEnabled bool `json:"health_check_enabled,omitempty"`

	// HealthCheckIntervalSeconds is the time between two health checks.
	// Default: 0, meaning 30 seconds.
	HealthCheckIntervalSeconds int `json:"health_check_interval_seconds,omitempty"`

	// LogConnections writes one log entry per connection end, blocked
	// connections included. Default: false.
	LogConnections bool `json:"log_connections,omitempty"`

	// Notes is free-form text, at most MaxNotesLength (10,000)
	// characters. Default: "".
	Notes string `json:"notes,omitempty"`
}

// UnmarshalJSON decodes a stream, applying the defaults that the zero value
// cannot express (enabled is true unless set to false).
func (s *Stream) UnmarshalJSON(b []byte) error {
	type plain Stream
	p := plain{Enabled: true}
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	*s = Stream(p)
	s.fillUpstream()
	return nil
}

// fillUpstream sets upstream_host and upstream_port, when left out, to the
// first of upstreams.
func (s *Stream) fillUpstream() {
	if len(s.Upstreams) == 0 {
		return
	}
	if s.UpstreamHost == "" {
		s.UpstreamHost = s.Upstreams[0].Host
	}
	if s.UpstreamPort == 0 {
		s.UpstreamPort = s.Upstreams[0].Port
	}
}

// UpstreamList is the stream's upstreams: upstreams, or the one of
// upstream_host and upstream_port.
func (s *Stream) UpstreamList() []Upstream {
	if len(s.Upstreams) > 0 {
		return s.Upstreams
	}
	return []Upstream{{Host: s.UpstreamHost, Port: s.UpstreamPort}}
}

// EffectiveLoadBalancing is load_balancing with its default applied.
func (s *Stream) EffectiveLoadBalancing() string {
	if s.LoadBalancing == "" {
		return BalanceRoundRobin
	}
	return s.LoadBalancing
}

// FailTimeout is fail_timeout_seconds with its default applied.
func (s *Stream) FailTimeout() time.Duration {
	if s.FailTimeoutSeconds <= 0 {
		return DefaultFailTimeout
	}
	return time.Duration(s.FailTimeoutSeconds) * time.Second
}

// DisplayName is the stream's name, or "stream-<id>" when it has none.
func (s *Stream) DisplayName() string {
	if s.Name != "" {
		return s.Name
	}
	return "stream-" + strconv.FormatInt(s.ID, 10)
}

// EffectiveProtocol is the protocol with its default applied.
func (s *Stream) EffectiveProtocol() string {
	if s.Protocol == "" {
		return ProtocolTCP
	}
	return s.Protocol
}

// HasTCP reports whether the stream has a TCP listener.
func (s *Stream) HasTCP() bool {
	p := s.EffectiveProtocol()
	return p == ProtocolTCP || p == ProtocolTCPUDP
}

// HasUDP reports whether the stream has a UDP listener.
func (s *Stream) HasUDP() bool {
	p := s.EffectiveProtocol()
	return p == ProtocolUDP || p == ProtocolTCPUDP
}

// SNIMatch reports whether server name name (lowercase) is one of the
// stream's sni names: equal, or one label under a wildcard.
func (s *Stream) SNIMatch(name string) bool {
	for _, p := range s.SNI {
		if SNIMatches(p, name) {
			return true
		}
	}
	return false
}

// SNIMatches reports whether server name name matches pattern, an exact
// name or a one-level wildcard ("*.example.com" matches "db.example.com",
// not "example.com" or "a.b.example.com"), case-insensitively.
func SNIMatches(pattern, name string) bool {
	pattern, name = strings.ToLower(pattern), strings.ToLower(name)
	if rest, ok := strings.CutPrefix(pattern, "*."); ok {
		label, parent, found := strings.Cut(name, ".")
		return found && label != "" && parent == rest
	}
	return pattern == name
}

// SNIOverlap reports whether one server name can match both patterns.
func SNIOverlap(a, b string) bool {
	a, b = strings.ToLower(a), strings.ToLower(b)
	aw, bw := strings.HasPrefix(a, "*."), strings.HasPrefix(b, "*.")
	switch {
	case aw == bw:
		return a == b
	case aw:
		return SNIMatches(a, b)
	default:
		return SNIMatches(b, a)
	}
}

// LastPort is the last port the stream listens on: listen_port_end, or
// listen_port without a range.
func (s *Stream) LastPort() int {
	if s.ListenPortEnd > 0 {
		return s.ListenPortEnd
	}
	return s.ListenPort
}

// IsRange reports whether the stream listens on a range of ports.
func (s *Stream) IsRange() bool { return s.ListenPortEnd > 0 && s.ListenPortEnd != s.ListenPort }

// ListenHostPort is the address to bind, as host:port.
func (s *Stream) ListenHostPort() string {
	return net.JoinHostPort(s.ListenAddress, strconv.Itoa(s.ListenPort))
}

// UpstreamHostPort is the upstream's address, as host:port.
func (s *Stream) UpstreamHostPort() string {
	return net.JoinHostPort(s.UpstreamHost, strconv.Itoa(s.UpstreamPort))
}

// ConnectionTimeout is the dial timeout with its default applied.
func (s *Stream) ConnectionTimeout() time.Duration {
	if s.ConnectionTimeoutSeconds <= 0 {
		return DefaultConnectionTimeout
	}
	return time.Duration(s.ConnectionTimeoutSeconds) * time.Second
}

// ConnectionRateWindow is the window of connection_rate_per_ip with its
// default applied.
func (s *Stream) ConnectionRateWindow() time.Duration {
	if s.ConnectionRateWindowSeconds <= 0 {
		return DefaultConnectionRateWindow
	}
	return time.Duration(s.ConnectionRateWindowSeconds) * time.Second
}

// ProxyHeaderTimeout is proxy_header_timeout_seconds with its default
// applied.
func (s *Stream) ProxyHeaderTimeout() time.Duration {
	if s.ProxyHeaderTimeoutSeconds <= 0 {
		return DefaultProxyHeaderTimeout
	}
	return time.Duration(s.ProxyHeaderTimeoutSeconds) * time.Second
}

// UpstreamTLSName is the name verified in the upstream's certificate:
// upstream_tls_server_name, or upstream_host.
func (s *Stream) UpstreamTLSName() string {
	if s.UpstreamTLSServerName != "" {
		return s.UpstreamTLSServerName
	}
	return s.UpstreamHost
}

// HealthCheckInterval is the health check interval with its default applied.
func (s *Stream) HealthCheckInterval() time.Duration {
	if s.HealthCheckIntervalSeconds <= 0 {
		return DefaultHealthCheckInterval
	}
	return time.Duration(s.HealthCheckIntervalSeconds) * time.Second
}

// ParseCIDR's errors: values, so that a list of 200,000 bad entries costs
// no allocation per entry.
var (
	errEmptyEntry = errors.New("empty entry")
	errNotCIDR    = errors.New("not a CIDR (want e.g. 10.0.0.0/8 or 2001:db8::/32)")
	errNotAddr    = errors.New("not an IP address or CIDR (want e.g. 192.0.2.7 or 10.0.0.0/8)")
	errZone       = errors.New("an IP zone is not allowed here")
)

// ParseCIDR parses one whitelist/blacklist entry: a CIDR, or a bare IP that
// means a single address (/32 for IPv4, /128 for IPv6). IPv4-mapped IPv6
// addresses are folded to IPv4 so that both spellings match the same clients.
func ParseCIDR(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return netip.Prefix{}, errEmptyEntry
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, errNotCIDR
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, errNotAddr
	}
	if a.Zone() != "" {
		return netip.Prefix{}, errZone
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}
