package spec

import (
	"encoding/json"
	"errors"
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
)

// accept_proxy_protocol values.
const (
	ProxyAcceptOff      = "off"
	ProxyAcceptOptional = "optional"
	ProxyAcceptRequired = "required"
)

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

	// UpstreamHost is the upstream's hostname or IP address. Required.
	UpstreamHost string `json:"upstream_host"`

	// UpstreamPort is the upstream's port, 1–65535. Required.
	UpstreamPort int `json:"upstream_port"`

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
	return nil
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
