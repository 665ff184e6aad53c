package streams

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// host returns a valid enabled stream with the given id, name, protocol and
// listen address and port.
func host(id int64, name, protocol, addr string, port int) *spec.Stream {
	return &spec.Stream{
		ID: id, Name: name, Protocol: protocol, ListenAddress: addr, ListenPort: port,
		UpstreamHost: "upstream.internal", UpstreamPort: 9000, Enabled: true,
	}
}

func TestListenOverlap(t *testing.T) {
	for _, tc := range []struct {
		name       string
		a, b       *spec.Stream
		wantShared string // "" for no conflict
	}{
		{"same port, both every address", host(1, "a", "", "", 53), host(2, "b", "", "", 53), "tcp"},
		{"different ports", host(1, "a", "", "", 53), host(2, "b", "", "", 54), ""},
		{"tcp and udp", host(1, "a", "tcp", "", 53), host(2, "b", "udp", "", 53), ""},
		{"udp and udp", host(1, "a", "udp", "0.0.0.0", 53), host(2, "b", "udp", "0.0.0.0", 53), "udp"},
		{"tcp+udp and udp", host(1, "a", "tcp+udp", "", 53), host(2, "b", "udp", "10.0.0.1", 53), "udp"},
		{"tcp+udp and tcp", host(1, "a", "tcp", "127.0.0.1", 53), host(2, "b", "tcp+udp", "127.0.0.1", 53), "tcp"},
		{"tcp+udp twice", host(1, "a", "tcp+udp", "", 53), host(2, "b", "tcp+udp", "", 53), "tcp+udp"},
		{"empty and ipv4", host(1, "a", "", "", 80), host(2, "b", "", "192.0.2.1", 80), "tcp"},
		{"empty and ipv6", host(1, "a", "", "2001:db8::1", 80), host(2, "b", "", "", 80), "tcp"},
		{"ipv6 any and ipv4", host(1, "a", "", "::", 80), host(2, "b", "", "127.0.0.1", 80), "tcp"},
		{"ipv6 any and ipv4 any", host(1, "a", "", "0.0.0.0", 80), host(2, "b", "", "::", 80), "tcp"},
		{"ipv4 any and ipv4", host(1, "a", "", "0.0.0.0", 80), host(2, "b", "", "10.1.2.3", 80), "tcp"},
		{"ipv4 any and ipv4-mapped", host(1, "a", "", "0.0.0.0", 80), host(2, "b", "", "::ffff:10.1.2.3", 80), "tcp"},
		{"ipv4 and the same ipv4-mapped", host(1, "a", "", "10.1.2.3", 80), host(2, "b", "", "::ffff:10.1.2.3", 80), "tcp"},
		{"ipv4 any and ipv6", host(1, "a", "", "0.0.0.0", 80), host(2, "b", "", "::1", 80), ""},
		{"two ipv4", host(1, "a", "", "127.0.0.1", 80), host(2, "b", "", "127.0.0.2", 80), ""},
		{"same ipv4", host(1, "a", "", "127.0.0.1", 80), host(2, "b", "", "127.0.0.1", 80), "tcp"},
		{"two ipv6", host(1, "a", "", "::1", 80), host(2, "b", "", "2001:db8::1", 80), ""},
		{"same ipv6, two spellings", host(1, "a", "", "2001:db8::1", 80), host(2, "b", "", "2001:0db8:0::1", 80), "tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			app := &App{Hosts: []*spec.Stream{tc.a, tc.b}}
			err := app.Validate()
			if tc.wantShared == "" {
				if err != nil {
					t.Errorf("Validate() = %v, want nil", err)
				}
				return
			}
			want := []string{
				`stream 2 ("b"): listen_port ` + strconv.Itoa(tc.b.ListenPort) + "/" + tc.wantShared,
				`overlaps stream 1 ("a") on ` + tc.a.ListenWhere(),
				"use another port or address, or disable one of them",
			}
			if err == nil || !testenv.OneErrorContains(err, want) {
				t.Errorf("Validate() = %v\nwant an error containing %q", err, want)
			}
		})
	}
}

func TestAppValidate(t *testing.T) {
	reserved := []reservedPort{{80, "Caddy's HTTP port"}, {443, "Caddy's HTTPS port"}, {2019, "Caddy's admin endpoint"}}
	for _, tc := range []struct {
		name  string
		hosts []*spec.Stream
		grace int64
		want  [][]string // each: substrings of one error; nil = valid
	}{
		{"empty", nil, 0, nil},
		{"distinct hosts", []*spec.Stream{host(1, "a", "", "", 5432), host(2, "b", "udp", "", 5432), host(3, "c", "", "::1", 6379)}, 0, nil},
		{"disabled hosts may overlap", []*spec.Stream{host(1, "a", "", "", 5432), func() *spec.Stream { s := host(2, "b", "", "", 5432); s.Enabled = false; return s }()}, 0, nil},
		{"disabled host on a reserved port", []*spec.Stream{func() *spec.Stream { s := host(1, "a", "", "", 443); s.Enabled = false; return s }()}, 0, nil},
		{"null host", []*spec.Stream{host(1, "a", "", "", 5432), nil}, 0, [][]string{{"hosts[1]: null: must be a stream object"}}},
		{"duplicate id", []*spec.Stream{host(1, "a", "", "", 5432), host(1, "b", "", "", 5433)}, 0,
			[][]string{{`stream 1 ("b"): id 1: already used by stream 1 ("a")`}}},
		{"overlap, example from the docs", []*spec.Stream{host(2, "dns-old", "udp", "0.0.0.0", 53), host(4, "dns", "udp", "0.0.0.0", 53)}, 0,
			[][]string{{`stream 4 ("dns"): listen_port 53/udp overlaps stream 2 ("dns-old") on 0.0.0.0:53; use another port or address, or disable one of them`}}},
		{"overlap with ipv6 address", []*spec.Stream{host(1, "a", "", "::1", 5432), host(2, "b", "", "", 5432)}, 0,
			[][]string{{`stream 2 ("b"): listen_port 5432/tcp overlaps stream 1 ("a") on [::1]:5432`}}},
		{"three on one port", []*spec.Stream{host(1, "a", "", "", 5432), host(2, "b", "", "", 5432), host(3, "c", "", "", 5432)}, 0,
			[][]string{{`stream 2 ("b")`, `overlaps stream 1 ("a")`}, {`stream 3 ("c")`, `overlaps stream 1 ("a")`}, {`stream 3 ("c")`, `overlaps stream 2 ("b")`}}},
		{"https port", []*spec.Stream{host(1, "a", "", "", 443)}, 0,
			[][]string{{`stream 1 ("a"): listen_port 443: port 443 is Caddy's HTTPS port; use another port`}}},
		{"http port on udp", []*spec.Stream{host(1, "a", "udp", "127.0.0.1", 80)}, 0, [][]string{{"listen_port 80: port 80 is Caddy's HTTP port"}}},
		{"admin port", []*spec.Stream{host(1, "a", "", "", 2019)}, 0, [][]string{{"listen_port 2019: port 2019 is Caddy's admin endpoint"}}},
		{"negative grace period", nil, -1e9, [][]string{{"grace_period -1s: must be >= 0"}}},
		{"invalid host and an overlap", []*spec.Stream{host(1, "a", "", "", 5432), func() *spec.Stream { s := host(2, "b", "", "", 5432); s.UpstreamPort = 0; return s }()}, 0,
			[][]string{{`stream 2 ("b"): upstream_port: required`}, {`stream 2 ("b"): listen_port 5432/tcp overlaps`}}},
		{"invalid listen address is not checked for overlap", []*spec.Stream{host(1, "a", "", "", 5432), host(2, "b", "", "localhost", 5432)}, 0,
			[][]string{{`stream 2 ("b"): listen_address "localhost"`}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			app := &App{Hosts: tc.hosts, reserved: reserved}
			app.GracePeriod = caddy.Duration(tc.grace)
			err := app.Validate()
			if tc.want == nil {
				if err != nil {
					t.Errorf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %d errors", len(tc.want))
			}
			errs := err.(interface{ Unwrap() []error }).Unwrap()
			if len(errs) != len(tc.want) {
				t.Errorf("got %d errors, want %d:\n%v", len(errs), len(tc.want), err)
			}
			for _, w := range tc.want {
				if !testenv.OneErrorContains(err, w) {
					t.Errorf("no error contains all of %q in:\n%v", w, err)
				}
			}
		})
	}
}

func TestValidateListen(t *testing.T) {
	app := &App{
		streams:  []*instance{{cfg: host(1, "a", "tcp", "", 5432)}, {cfg: host(2, "b", "udp", "", 53)}},
		reserved: []reservedPort{{443, "Caddy's HTTPS port"}},
	}
	for _, tc := range []struct {
		name string
		s    *spec.Stream
		want string // "" for nil
	}{
		{"free port", host(9, "new", "", "", 6379), ""},
		{"taken port", host(9, "new", "", "127.0.0.1", 5432), `stream 9 ("new"): listen_port 5432/tcp overlaps stream 1 ("a") on port 5432 of every address`},
		{"same port, other protocol", host(9, "new", "udp", "", 5432), ""},
		{"editing itself", host(1, "a", "", "", 5432), ""},
		{"reserved", host(9, "new", "", "", 443), "port 443 is Caddy's HTTPS port"},
		{"disabled", func() *spec.Stream { s := host(9, "new", "", "", 443); s.Enabled = false; return s }(), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := app.validateListen(tc.s)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("validateListen() = %v, want nil", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("validateListen() = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestValidateTLSCertificateChoice(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(s *spec.Stream)
		want string // "" for valid
	}{
		{"stored id", func(s *spec.Stream) { s.SSLCertID = 3 }, ""},
		{"tag", func(s *spec.Stream) { s.SSLCertTag = "db" }, ""},
		{"domain", func(s *spec.Stream) { s.SSLDomain = "db.example.com" }, ""},
		{"none", func(s *spec.Stream) {}, "ssl_cert_id 0: must be > 0"},
		{"two", func(s *spec.Stream) { s.SSLCertID, s.SSLDomain = 3, "db.example.com" }, "give one of ssl_cert_id, ssl_cert_tag and ssl_domain"},
		{"bad domain", func(s *spec.Stream) { s.SSLDomain = "https://db" }, `ssl_domain "https://db"`},
	} {
		s := host(1, "db", "tcp", "", 5432)
		s.SSLEnabled = true
		tc.set(s)
		err := s.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

// A stream without sni that reads PROXY headers cannot share its port with
// streams told apart by server name: the port's socket reads the
// ClientHello from the first bytes, where the header is.
func TestSNIPortRefusesAProxyReader(t *testing.T) {
	named := host(1, "named", "tcp", "127.0.0.1", 8443)
	named.SNI = []string{"a.test"}
	def := host(2, "default", "tcp", "127.0.0.1", 8443)
	def.AcceptProxyProtocol, def.TrustedProxyCIDRs = spec.ProxyAcceptOptional, []string{"127.0.0.1/32"}
	want := []string{`stream 2 ("default"): accept_proxy_protocol "optional"`, `not on a port shared by server name with stream 1 ("named")`, "use off, or another port"}
	for _, order := range [][]*spec.Stream{{named, def}, {def, named}} {
		err := (&App{Hosts: order}).Validate()
		if err == nil || !testenv.OneErrorContains(err, want) {
			t.Errorf("stream %d first: Validate() = %v\nwant an error containing %q", order[0].ID, err, want)
		}
	}
	// Stored so before the rule: they load (and log nothing new here).
	app := &App{}
	if errs := app.validateList([]*spec.Stream{def, named}, false); len(errs) != 0 {
		t.Errorf("stored streams: %v, want no error", errs)
	}
}

// The admin port a stream may not take is the config's admin endpoint:
// 2019 only when admin is left at its default, none when admin is off.
func TestReservedAdminPortIsTheConfigs(t *testing.T) {
	for _, tc := range []struct {
		admin string // the config's "admin" object
		port  int
		want  string // "": valid
	}{
		{`{"listen": "127.0.0.1:2999"}`, 2999, "listen_port 2999: port 2999 is Caddy's admin endpoint"},
		{`{"listen": "127.0.0.1:2999"}`, 2019, ""},
		{`{}`, 2019, "listen_port 2019: port 2019 is Caddy's admin endpoint"},
		{`{"disabled": true}`, 2019, ""},
		{`{"listen": "admin.internal:2999"}`, 2999, "listen_port 2999: port 2999 is Caddy's admin endpoint"},
	} {
		cfgJSON := fmt.Sprintf(`{"admin": %s, "apps": {"streams": {"storage": {"disabled": true},
			"hosts": [{"id": 1, "listen_address": "127.0.0.1", "listen_port": %d, "upstream_host": "10.0.0.1", "upstream_port": 1}]}}}`,
			tc.admin, tc.port)
		var cfg caddy.Config
		if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
			t.Fatal(err)
		}
		err := caddy.Validate(&cfg)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("admin %s, stream on %d: Validate() = %v, want %q", tc.admin, tc.port, err, tc.want)
		}
	}
}

// Two streams with sni on one address written two ways ("" and "::",
// "::1" and "0::1") share a socket but not the registry of the port shared
// by server name: the error says to write the address alike.
func TestSNIOnOneAddressWrittenTwoWays(t *testing.T) {
	// A range never shares a port by server name: the usual overlap.
	r := host(1, "range", "tcp", "", 8443)
	r.ListenPortEnd = 8450
	n := host(2, "named", "tcp", "::", 8443)
	n.SNI = []string{"a.test"}
	if err := (&App{Hosts: []*spec.Stream{r, n}}).Validate(); err == nil || strings.Contains(err.Error(), "written another way") {
		t.Errorf("a range beside an sni stream on \"::\": Validate() = %v, want the overlap, not \"written another way\"", err)
	}
	for _, pair := range [][2]string{{"", "::"}, {"::1", "0::1"}} {
		a := host(1, "a", "tcp", pair[0], 8443)
		a.SNI = []string{"a.test"}
		b := host(2, "b", "tcp", pair[1], 8443)
		b.SNI = []string{"b.test"}
		err := (&App{Hosts: []*spec.Stream{a, b}}).Validate()
		want := []string{`stream 2 ("b"): listen_address`, fmt.Sprintf(`is the address of stream 1 ("a") (%q) written another way; to share port 8443 by server name, write it as %q`, pair[0], pair[0])}
		if err == nil || !testenv.OneErrorContains(err, want) {
			t.Errorf("%q and %q: Validate() = %v\nwant an error containing %q", pair[0], pair[1], err, want)
		}
	}
}
