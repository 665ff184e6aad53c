package spec

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// validStream returns a stream that passes Validate; tests change one thing.
func validStream() *Stream {
	return &Stream{
		ID:           3,
		Name:         "postgres",
		ListenPort:   15432,
		UpstreamHost: "db.internal",
		UpstreamPort: 5432,
		Enabled:      true,
	}
}

func TestStreamValidateOK(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
	}{
		{"minimal", func(s *Stream) {}},
		{"no name", func(s *Stream) { s.Name = "" }},
		{"tcp", func(s *Stream) { s.Protocol = "tcp" }},
		{"udp", func(s *Stream) { s.Protocol = "udp" }},
		{"tcp+udp with proxy v2", func(s *Stream) { s.Protocol = "tcp+udp"; s.ProxyProtocolVersion = 2 }},
		{"tcp with proxy v1", func(s *Stream) { s.ProxyProtocolVersion = 1 }},
		{"ipv4 listen", func(s *Stream) { s.ListenAddress = "127.0.0.1" }},
		{"ipv4 any", func(s *Stream) { s.ListenAddress = "0.0.0.0" }},
		{"ipv6 listen", func(s *Stream) { s.ListenAddress = "::1" }},
		{"ipv6 any", func(s *Stream) { s.ListenAddress = "::" }},
		{"ipv4-mapped listen", func(s *Stream) { s.ListenAddress = "::ffff:127.0.0.1" }},
		{"ports at the limits", func(s *Stream) { s.ListenPort = 1; s.UpstreamPort = 65535 }},
		{"upstream ipv4", func(s *Stream) { s.UpstreamHost = "10.0.0.5" }},
		{"upstream ipv6", func(s *Stream) { s.UpstreamHost = "2001:db8::5" }},
		{"upstream ipv6 link-local with zone", func(s *Stream) { s.UpstreamHost = "fe80::1%eth0" }},
		{"upstream zone: interface index", func(s *Stream) { s.UpstreamHost = "fe80::1%2" }},
		{"upstream zone: vlan interface", func(s *Stream) { s.UpstreamHost = "fe80::1%eth0.100" }},
		{"id at 2^53-1", func(s *Stream) { s.ID = 1<<53 - 1 }},
		{"name with accents, CJK and emoji", func(s *Stream) { s.Name = "Bücher 本 🚀 - db" }},
		{"upstream single label", func(s *Stream) { s.UpstreamHost = "localhost" }},
		{"upstream with underscore", func(s *Stream) { s.UpstreamHost = "my_db.svc" }},
		{"upstream fqdn", func(s *Stream) { s.UpstreamHost = "db.example.com." }},
		{"upstream punycode", func(s *Stream) { s.UpstreamHost = "xn--bcher-kva.example" }},
		{"upstream digits then name", func(s *Stream) { s.UpstreamHost = "1e100.net" }},
		{"limits", func(s *Stream) {
			s.MaxConnections = 100
			s.ConnectionTimeoutSeconds = 5
			s.IdleTimeoutSeconds = MaxSeconds
			s.UploadRateBytes = 1 << 20
			s.DownloadRateBytes = 1 << 30
			s.HealthCheckEnabled = true
			s.HealthCheckIntervalSeconds = 10
		}},
		{"cidrs", func(s *Stream) {
			s.WhitelistCIDRs = []string{"10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1", "::ffff:10.0.0.0/104", " 172.16.0.0/12 "}
			s.BlacklistCIDRs = []string{"10.6.6.6/32", "2001:db8:bad::/48"}
		}},
		{"udp responses", func(s *Stream) { s.Protocol = "udp"; s.UDPResponses = MaxUDPResponses }},
		{"tls on tcp", func(s *Stream) { s.SSLEnabled = true; s.SSLCertID = 1 }},
		{"tls on tcp+udp", func(s *Stream) { s.Protocol = "tcp+udp"; s.SSLEnabled = true; s.SSLCertID = 1 }},
		{"cert id without tls", func(s *Stream) { s.SSLCertID = 9 }},
		{"disabled", func(s *Stream) { s.Enabled = false }},
		{"proxy protocol from trusted proxies", func(s *Stream) {
			s.AcceptProxyProtocol = ProxyAcceptRequired
			s.TrustedProxyCIDRs = []string{"10.0.0.0/8", "192.0.2.7"}
			s.ProxyHeaderTimeoutSeconds = MaxProxyHeaderTimeoutSeconds
		}},
		{"proxy protocol optional on udp", func(s *Stream) {
			s.Protocol = "udp"
			s.AcceptProxyProtocol = ProxyAcceptOptional
			s.TrustedProxyCIDRs = []string{"::1"}
		}},
		{"proxy protocol off", func(s *Stream) { s.AcceptProxyProtocol = ProxyAcceptOff }},
		{"upstream tls", func(s *Stream) {
			s.UpstreamTLS = true
			s.UpstreamTLSServerName = "db.example.com"
			s.UpstreamTLSCA = testCAPEM
			s.UpstreamTLSClientCertID = 4
		}},
		{"upstream tls server name ip", func(s *Stream) { s.UpstreamTLS = true; s.UpstreamTLSServerName = "10.0.0.5" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validStream()
			tc.change(s)
			if err := s.Validate(); err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
		})
	}
}

func TestStreamValidateErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
		// want are substrings of one error: field and value, then what is allowed.
		want []string
	}{
		{"id zero", func(s *Stream) { s.ID = 0 }, []string{"stream 0 (\"postgres\"): id 0: must be > 0"}},
		{"id negative", func(s *Stream) { s.ID = -4 }, []string{"id -4: must be > 0"}},
		{"protocol unknown", func(s *Stream) { s.Protocol = "sctp" }, []string{`protocol "sctp": must be tcp, udp or tcp+udp`}},
		{"protocol upper case", func(s *Stream) { s.Protocol = "TCP" }, []string{`protocol "TCP"`}},
		{"listen hostname", func(s *Stream) { s.ListenAddress = "localhost" }, []string{`listen_address "localhost"`, "must be an IP address", "hostnames are not allowed"}},
		{"listen with port", func(s *Stream) { s.ListenAddress = "127.0.0.1:5432" }, []string{`listen_address "127.0.0.1:5432"`, "put the port in listen_port"}},
		{"listen ipv6 brackets", func(s *Stream) { s.ListenAddress = "[::1]" }, []string{`listen_address "[::1]"`, "without brackets"}},
		{"listen ipv6 brackets and port", func(s *Stream) { s.ListenAddress = "[::1]:5432" }, []string{`listen_address "[::1]:5432"`, "put the port in listen_port"}},
		{"listen zone", func(s *Stream) { s.ListenAddress = "fe80::1%eth0" }, []string{`listen_address "fe80::1%eth0"`, "zone is not allowed"}},
		{"listen bad ipv4", func(s *Stream) { s.ListenAddress = "10.0.0.300" }, []string{`listen_address "10.0.0.300"`}},
		{"listen port zero", func(s *Stream) { s.ListenPort = 0 }, []string{`stream 3 ("postgres"): listen_port: required; must be 1-65535`}},
		{"listen port too big", func(s *Stream) { s.ListenPort = 70000 }, []string{`stream 3 ("postgres"): listen_port 70000: must be 1-65535`}},
		{"listen port negative", func(s *Stream) { s.ListenPort = -1 }, []string{"listen_port -1: must be 1-65535"}},
		{"upstream empty", func(s *Stream) { s.UpstreamHost = "" }, []string{`stream 3 ("postgres"): upstream_host: required; must be a hostname`}},
		{"upstream space", func(s *Stream) { s.UpstreamHost = "db internal" }, []string{`upstream_host "db internal"`, "spaces"}},
		{"upstream newline", func(s *Stream) { s.UpstreamHost = "db\n" }, []string{`upstream_host "db\n"`, "control characters"}},
		{"upstream with port", func(s *Stream) { s.UpstreamHost = "db.internal:5432" }, []string{`upstream_host "db.internal:5432"`, "put the port in upstream_port"}},
		{"upstream ipv6 brackets", func(s *Stream) { s.UpstreamHost = "[2001:db8::5]" }, []string{`upstream_host "[2001:db8::5]"`, "without brackets"}},
		{"upstream bad ipv4", func(s *Stream) { s.UpstreamHost = "10.0.0.300" }, []string{`upstream_host "10.0.0.300"`, "not a valid IP address"}},
		{"upstream bad chars", func(s *Stream) { s.UpstreamHost = "db/internal" }, []string{`upstream_host "db/internal"`, "only letters, digits"}},
		{"upstream empty label", func(s *Stream) { s.UpstreamHost = "db..internal" }, []string{`upstream_host "db..internal"`, "1-63 characters"}},
		{"upstream leading hyphen", func(s *Stream) { s.UpstreamHost = "-db.internal" }, []string{`upstream_host "-db.internal"`, "'-'"}},
		{"upstream too long", func(s *Stream) { s.UpstreamHost = strings.Repeat("a.", 127) + "com" }, []string{"upstream_host", "at most 253 characters"}},
		{"upstream unicode", func(s *Stream) { s.UpstreamHost = "bücher.example" }, []string{`upstream_host "bücher.example"`, "xn--"}},
		{"upstream placeholder", func(s *Stream) { s.UpstreamHost = "{env.DB}" }, []string{`upstream_host "{env.DB}"`}},
		{"upstream port zero", func(s *Stream) { s.UpstreamPort = 0 }, []string{"upstream_port: required; must be 1-65535"}},
		{"upstream port too big", func(s *Stream) { s.UpstreamPort = 65536 }, []string{"upstream_port 65536: must be 1-65535"}},
		{"max connections", func(s *Stream) { s.MaxConnections = -1 }, []string{"max_connections -1: must be >= 0"}},
		{"max per ip negative", func(s *Stream) { s.MaxConnectionsPerIP = -1 }, []string{"max_connections_per_ip -1: must be 0-1000000 (0 = unlimited)"}},
		{"max per ip too big", func(s *Stream) { s.MaxConnectionsPerIP = 1 << 40 }, []string{"max_connections_per_ip 1099511627776: must be 0-1000000"}},
		{"rate per ip negative", func(s *Stream) { s.ConnectionRatePerIP = -3 }, []string{"connection_rate_per_ip -3: must be 0-1000000 (0 = unlimited)"}},
		{"rate window negative", func(s *Stream) { s.ConnectionRatePerIP = 5; s.ConnectionRateWindowSeconds = -1 }, []string{"connection_rate_window_seconds -1: must be 0-31536000", "0 = 60s"}},
		{"connection timeout", func(s *Stream) { s.ConnectionTimeoutSeconds = -5 }, []string{"connection_timeout_seconds -5: must be 0-31536000"}},
		{"idle timeout negative", func(s *Stream) { s.IdleTimeoutSeconds = -1 }, []string{"idle_timeout_seconds -1: must be 0-31536000", "(0 = TCP never, UDP 60s)"}},
		{"idle timeout overflow", func(s *Stream) { s.IdleTimeoutSeconds = 1 << 40 }, []string{"idle_timeout_seconds 1099511627776: must be 0-31536000"}},
		{"health interval", func(s *Stream) { s.HealthCheckIntervalSeconds = -30 }, []string{"health_check_interval_seconds -30: must be 0-31536000"}},
		{"udp responses negative", func(s *Stream) { s.Protocol = "udp"; s.UDPResponses = -1 }, []string{"udp_responses -1: must be 0-1000"}},
		{"udp responses too many", func(s *Stream) { s.Protocol = "udp"; s.UDPResponses = 1001 }, []string{"udp_responses 1001: must be 0-1000"}},
		{"upload rate", func(s *Stream) { s.UploadRateBytes = -1 }, []string{"upload_rate_bytes -1: must be >= 0"}},
		{"download rate", func(s *Stream) { s.DownloadRateBytes = -1 }, []string{"download_rate_bytes -1: must be >= 0"}},
		{"ssl cert id negative", func(s *Stream) { s.SSLCertID = -1 }, []string{"ssl_cert_id -1: must be >= 0"}},
		{"proxy version 3", func(s *Stream) { s.ProxyProtocolVersion = 3 }, []string{"proxy_protocol_version 3: must be 0 (off), 1 or 2"}},
		{"proxy version negative", func(s *Stream) { s.ProxyProtocolVersion = -1 }, []string{"proxy_protocol_version -1"}},
		{"proxy v1 on udp", func(s *Stream) { s.Protocol = "udp"; s.ProxyProtocolVersion = 1 }, []string{"proxy_protocol_version 1: version 1 cannot describe udp", "udp stream"}},
		{"proxy v1 on tcp+udp", func(s *Stream) { s.Protocol = "tcp+udp"; s.ProxyProtocolVersion = 1 }, []string{"proxy_protocol_version 1", "tcp+udp stream"}},
		{"whitelist bad cidr", func(s *Stream) { s.WhitelistCIDRs = []string{"10.0.0.0/8", "10.0.0.300/8"} }, []string{`stream 3 ("postgres"): whitelist_cidrs "10.0.0.300/8": not a CIDR (want e.g. 10.0.0.0/8 or 2001:db8::/32)`}},
		{"whitelist bad ipv6 prefix", func(s *Stream) { s.WhitelistCIDRs = []string{"2001:db8::/129"} }, []string{`whitelist_cidrs "2001:db8::/129": not a CIDR`}},
		{"whitelist hostname", func(s *Stream) { s.WhitelistCIDRs = []string{"example.com"} }, []string{`whitelist_cidrs "example.com": not an IP address or CIDR`}},
		{"whitelist empty entry", func(s *Stream) { s.WhitelistCIDRs = []string{""} }, []string{`whitelist_cidrs "": empty entry`}},
		{"blacklist zone", func(s *Stream) { s.BlacklistCIDRs = []string{"fe80::1%eth0"} }, []string{`blacklist_cidrs "fe80::1%eth0": an IP zone is not allowed`}},
		{"blacklist bad", func(s *Stream) { s.BlacklistCIDRs = []string{"1.2.3.4/33"} }, []string{`blacklist_cidrs "1.2.3.4/33": not a CIDR`}},
		{"tls on udp", func(s *Stream) { s.Protocol = "udp"; s.SSLEnabled = true; s.SSLCertID = 1 }, []string{"ssl_enabled true: tls needs a tcp listener"}},
		{"tls without cert", func(s *Stream) { s.SSLEnabled = true }, []string{"ssl_cert_id 0: must be > 0", "when ssl_enabled is true"}},
		{"accept proxy unknown", func(s *Stream) { s.AcceptProxyProtocol = "yes" }, []string{`accept_proxy_protocol "yes": must be off, optional or required`}},
		{"accept proxy without trusted", func(s *Stream) { s.AcceptProxyProtocol = "required" }, []string{`stream 3 ("postgres"): trusted_proxy_cidrs: required; list the front proxies' addresses`, "when accept_proxy_protocol is required"}},
		{"trusted proxy bad", func(s *Stream) { s.AcceptProxyProtocol = "optional"; s.TrustedProxyCIDRs = []string{"lb.internal"} }, []string{`trusted_proxy_cidrs "lb.internal": not an IP address or CIDR`}},
		{"proxy header timeout", func(s *Stream) { s.ProxyHeaderTimeoutSeconds = 301 }, []string{"proxy_header_timeout_seconds 301: must be 0-300 (0 = 5s)"}},
		{"upstream tls on udp", func(s *Stream) { s.Protocol = "udp"; s.UpstreamTLS = true }, []string{"upstream_tls true: tls to the upstream needs a tcp listener"}},
		{"upstream tls name with port", func(s *Stream) { s.UpstreamTLS = true; s.UpstreamTLSServerName = "db.internal:5432" }, []string{`upstream_tls_server_name "db.internal:5432"`, "a server name has no port"}},
		{"upstream tls ca not pem", func(s *Stream) { s.UpstreamTLSCA = "hello" }, []string{`stream 3 ("postgres"): upstream_tls_ca: no PEM certificate found`}},
		{"upstream tls ca with a key", func(s *Stream) {
			s.UpstreamTLSCA = testCAPEM + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
		}, []string{"upstream_tls_ca: block 2 is a private key"}},
		{"upstream tls ca broken", func(s *Stream) {
			s.UpstreamTLSCA = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
		}, []string{"upstream_tls_ca: certificate 1: x509:"}},
		{"upstream tls client cert negative", func(s *Stream) { s.UpstreamTLSClientCertID = -2 }, []string{"upstream_tls_client_cert_id -2: must be >= 0"}},
		{"no name", func(s *Stream) { s.Name = ""; s.ListenPort = 0 }, []string{"stream 3: listen_port: required"}},
		{"name too long", func(s *Stream) { s.Name = strings.Repeat("ü", 201) }, []string{`stream 3 ("` + strings.Repeat("ü", 60) + `…"): name: 201 characters, more than the limit of 200; shorten it`}},
		{"name right-to-left override", func(s *Stream) { s.Name = "evil\u202egnp.exe" }, []string{`name: has U+202E at character 5, a control or format character`}},
		{"name line separator", func(s *Stream) { s.Name = "a\u2028b" }, []string{`name: has U+2028 at character 2`}},
		{"name paragraph separator", func(s *Stream) { s.Name = "\u2029" }, []string{`name: has U+2029 at character 1`}},
		{"name newline", func(s *Stream) { s.Name = "db\nfake log line" }, []string{`name: has U+000A at character 3`}},
		{"name zero width joiner", func(s *Stream) { s.Name = "a\u200db" }, []string{`name: has U+200D`}},
		{"name byte order mark", func(s *Stream) { s.Name = "\ufeffdb" }, []string{`name: has U+FEFF`}},
		{"name C1 control", func(s *Stream) { s.Name = "db\u0085" }, []string{`name: has U+0085`}},
		{"name invalid utf-8", func(s *Stream) { s.Name = "db\xff" }, []string{`name: has U+FFFD`}},
		{"upstream zone path", func(s *Stream) { s.UpstreamHost = "fe80::1%../../x" }, []string{`upstream_host "fe80::1%../../x": the IPv6 zone "../../x" is not an interface name`}},
		{"upstream zone too long", func(s *Stream) { s.UpstreamHost = "fe80::1%" + strings.Repeat("e", 16) }, []string{`is not an interface name`}},
		{"upstream zone dots", func(s *Stream) { s.UpstreamHost = "fe80::1%.." }, []string{`is not an interface name`}},
		{"id over 2^53-1", func(s *Stream) { s.ID = 1 << 53 }, []string{"id 9007199254740992: must be at most 9007199254740991"}},
		{"id max int64", func(s *Stream) { s.ID = 1<<63 - 1 }, []string{"id 9223372036854775807: must be at most 9007199254740991"}},
		{"ssl cert id over 2^53-1", func(s *Stream) { s.SSLCertID = 1 << 53 }, []string{"ssl_cert_id 9007199254740992: must be at most 9007199254740991"}},
		{"notes too long", func(s *Stream) { s.Notes = strings.Repeat("é", 10001) }, []string{`stream 3 ("postgres"): notes: 10001 characters, more than the limit of 10000; shorten it`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validStream()
			tc.change(s)
			err := s.Validate()
			if err == nil {
				t.Fatalf("Validate() = nil, want an error containing %q", tc.want)
			}
			if !testenv.OneErrorContains(err, tc.want) {
				t.Errorf("Validate() = %q\nwant one error containing all of %q", err, tc.want)
			}
			var fe *FieldError
			if !errors.As(err, &fe) || fe.ID != s.ID || fe.Name != s.Name {
				t.Errorf("Validate() = %#v, want *FieldError for stream %d", err, s.ID)
			}
			if msg := err.Error(); msg != strings.TrimSpace(msg) || strings.HasSuffix(msg, ".") {
				t.Errorf("message %q has surrounding space or a trailing period", msg)
			}
		})
	}
}

func TestStreamValidateCollectsAll(t *testing.T) {
	s := &Stream{
		ID:                   7,
		Name:                 "broken",
		Protocol:             "udp",
		ListenAddress:        "localhost",
		ListenPort:           70000,
		UpstreamPort:         0,
		ProxyProtocolVersion: 1,
		WhitelistCIDRs:       []string{"nope"},
		SSLEnabled:           true,
	}
	err := s.Validate()
	if err == nil {
		t.Fatal("Validate() = nil")
	}
	for _, field := range []string{
		"listen_address", "listen_port", "upstream_host", "upstream_port",
		"proxy_protocol_version", "whitelist_cidrs", "ssl_enabled", "ssl_cert_id",
	} {
		// "field value: reason", or "field: required; ..." for a setting
		// left out.
		if !testenv.OneErrorContains(err, []string{`stream 7 ("broken"): ` + field + " "}) && !testenv.OneErrorContains(err, []string{`stream 7 ("broken"): ` + field + ": required; "}) {
			t.Errorf("no %s error in:\n%v", field, err)
		}
	}
	if n := len(err.(interface{ Unwrap() []error }).Unwrap()); n != 8 {
		t.Errorf("got %d errors, want 8:\n%v", n, err)
	}
}

func TestStreamWarnings(t *testing.T) {
	for _, tc := range []struct {
		port int
		want []string
	}{
		{22, []string{"listen_port 22: a privileged port", "listen_port 22: the well-known port of SSH"}},
		{1000, []string{"listen_port 1000: a privileged port"}},
		{5432, []string{"listen_port 5432: the well-known port of PostgreSQL"}},
		{15432, nil},
		{0, nil},
		{70000, nil},
	} {
		s := validStream()
		s.ListenPort = tc.port
		got := s.Warnings()
		if len(got) != len(tc.want) {
			t.Errorf("port %d: Warnings() = %q, want %d warnings", tc.port, got, len(tc.want))
			continue
		}
		for i, w := range tc.want {
			if !strings.HasPrefix(got[i], w) {
				t.Errorf("port %d: warning %q, want prefix %q", tc.port, got[i], w)
			}
		}
	}

	// Settings that do nothing on a UDP-only stream.
	s := validStream()
	s.ListenPort, s.HalfClose = 15432, true
	if got := s.Warnings(); len(got) != 0 {
		t.Errorf("tcp stream with half_close: Warnings() = %q, want none", got)
	}
	s.Protocol = ProtocolUDP
	if got := s.Warnings(); len(got) != 1 || !strings.HasPrefix(got[0], "half_close: applies to TCP connections only") {
		t.Errorf("udp stream with half_close: Warnings() = %q, want one about half_close", got)
	}
	// And udp_responses on a TCP-only stream.
	s = validStream()
	s.ListenPort, s.UDPResponses = 15432, 1
	if got := s.Warnings(); len(got) != 1 || !strings.HasPrefix(got[0], "udp_responses: applies to UDP") {
		t.Errorf("tcp stream with udp_responses: Warnings() = %q, want one about udp_responses", got)
	}
	s.Protocol = ProtocolTCPUDP
	if got := s.Warnings(); len(got) != 0 {
		t.Errorf("tcp+udp stream with udp_responses: Warnings() = %q, want none", got)
	}
	// A CIDR with host bits means its whole network: said, not refused.
	s = validStream()
	s.ListenPort, s.WhitelistCIDRs, s.BlacklistCIDRs = 15432, []string{"10.0.0.5/8", "192.0.2.0/24", "10.1.2.3"}, []string{"2001:db8::1/32"}
	want := []string{
		`whitelist_cidrs "10.0.0.5/8": has bits set past /8, so it means all of 10.0.0.0/8; write 10.0.0.0/8, or 10.0.0.5/32 for the one address`,
		`blacklist_cidrs "2001:db8::1/32": has bits set past /32, so it means all of 2001:db8::/32; write 2001:db8::/32, or 2001:db8::1/128 for the one address`,
	}
	if got := s.Warnings(); !slices.Equal(got, want) {
		t.Errorf("CIDRs with host bits: Warnings() = %q\nwant %q", got, want)
	}
	// Per-source settings that can never apply.
	s = validStream()
	s.ListenPort, s.ConnectionRateWindowSeconds = 15432, 10
	if got := s.Warnings(); len(got) != 1 || !strings.HasPrefix(got[0], "connection_rate_window_seconds: does nothing without connection_rate_per_ip") {
		t.Errorf("a rate window without a rate: Warnings() = %q", got)
	}
	s.ConnectionRatePerIP, s.MaxConnections, s.MaxConnectionsPerIP = 10, 5, 6
	if got := s.Warnings(); len(got) != 1 || !strings.HasPrefix(got[0], "max_connections_per_ip 6: above max_connections 5") {
		t.Errorf("max_connections_per_ip above max_connections: Warnings() = %q", got)
	}
}

// testCAPEM is a CA certificate for upstream_tls_ca (made with openssl
// req -x509; its dates do not matter here).
var testCAPEM = func() string {
	b, err := os.ReadFile("testdata/upstream-ca.pem")
	if err != nil {
		panic(err)
	}
	return string(b)
}()

// TestStreamWarningsProxyAndUpstreamTLS: settings that do nothing, and
// upstream_tls_insecure_skip_verify, are warned about.
func TestStreamWarningsProxyAndUpstreamTLS(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
		want   []string // prefixes, in order
	}{
		{"trusted without accept", func(s *Stream) { s.TrustedProxyCIDRs = []string{"10.0.0.1"} }, []string{"trusted_proxy_cidrs: does nothing while accept_proxy_protocol is off"}},
		{"insecure", func(s *Stream) { s.UpstreamTLS, s.UpstreamTLSInsecureSkipVerify = true, true }, []string{"upstream_tls_insecure_skip_verify: the upstream's certificate is not checked"}},
		{"tls on tcp+udp", func(s *Stream) { s.Protocol, s.UpstreamTLS = ProtocolTCPUDP, true }, []string{"upstream_tls: applies to TCP connections only"}},
		{"tls settings without tls", func(s *Stream) {
			s.UpstreamTLSServerName, s.UpstreamTLSClientCertID, s.UpstreamTLSInsecureSkipVerify = "x", 2, true
		}, []string{"upstream_tls_server_name: does nothing while upstream_tls is off", "upstream_tls_client_cert_id: does nothing", "upstream_tls_insecure_skip_verify: does nothing"}},
		{"tls verified", func(s *Stream) { s.UpstreamTLS = true }, nil},
	} {
		s := validStream()
		tc.change(s)
		got := s.Warnings()
		if len(got) != len(tc.want) {
			t.Errorf("%s: Warnings() = %q, want %d", tc.name, got, len(tc.want))
			continue
		}
		for i, w := range tc.want {
			if !strings.HasPrefix(got[i], w) {
				t.Errorf("%s: warning %q, want prefix %q", tc.name, got[i], w)
			}
		}
	}
}

// TestFieldErrorValue: each error carries the bad value as the API returns
// it (a number, a string, a boolean; nil for a missing setting), and its
// message shows it as the user wrote it.
func TestFieldErrorValue(t *testing.T) {
	s := &Stream{ID: 4, ListenPort: 70000, UpstreamHost: "db.internal", SSLEnabled: true}
	s.Protocol = ProtocolUDP
	s.ListenAddress = "localhost"
	got := map[string]*FieldError{}
	for _, e := range s.Validate().(interface{ Unwrap() []error }).Unwrap() {
		var fe *FieldError
		if !errors.As(e, &fe) {
			t.Fatalf("%v is not a *FieldError", e)
		}
		got[fe.Field] = fe
	}
	for _, tc := range []struct {
		field string
		value any
		msg   string
	}{
		{"listen_port", int64(70000), `stream 4: listen_port 70000: must be 1-65535`},
		{"listen_address", "localhost", `stream 4: listen_address "localhost": must be an IP address`},
		{"upstream_port", nil, `stream 4: upstream_port: required; must be 1-65535`},
		{"ssl_enabled", true, `stream 4: ssl_enabled true: tls needs a tcp listener`},
	} {
		fe := got[tc.field]
		if fe == nil {
			t.Errorf("no error on %s in %v", tc.field, s.Validate())
			continue
		}
		if fe.Value != tc.value {
			t.Errorf("%s: Value = %#v, want %#v", tc.field, fe.Value, tc.value)
		}
		if !strings.HasPrefix(fe.Error(), tc.msg) {
			t.Errorf("%s: message %q, want it to start with %q", tc.field, fe.Error(), tc.msg)
		}
	}

	// An overlap's value is written into the sentence; a stream being
	// created is "the new stream".
	fe := &FieldError{ID: 9, Name: "b", Field: "listen_port", Value: "5432/tcp", Reason: "overlaps stream 1", Inline: true}
	MarkNew(fmt.Errorf("wrapped: %w", errors.Join(fe)))
	if want := `the new stream ("b"): listen_port 5432/tcp overlaps stream 1`; fe.Error() != want {
		t.Errorf("got %q, want %q", fe.Error(), want)
	}
}
