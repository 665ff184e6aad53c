package spec

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

func TestUpstreamsValidate(t *testing.T) {
	three := func(s *Stream) {
		s.UpstreamHost, s.UpstreamPort = "", 0
		s.Upstreams = []Upstream{{Host: "10.0.0.1", Port: 5432}, {Host: "10.0.0.2", Port: 5432, Weight: 3}, {Host: "db3", Port: 5432, Backup: true}}
	}
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
		want   []string // nil: valid
	}{
		{"three", three, nil},
		{"first repeated in upstream_host", func(s *Stream) { three(s); s.UpstreamHost, s.UpstreamPort = "10.0.0.1", 5432 }, nil},
		{"every method", func(s *Stream) { three(s); s.LoadBalancing = BalanceSourceHash; s.FailTimeoutSeconds = 30 }, nil},
		{"upstream_host differs", func(s *Stream) { three(s); s.UpstreamHost, s.UpstreamPort = "10.0.0.2", 5432 },
			[]string{`upstream_host "10.0.0.2:5432": upstream_host and upstream_port differ from the first of upstreams (10.0.0.1:5432)`}},
		{"upstream_port differs", func(s *Stream) { three(s); s.UpstreamPort = 6000 }, []string{"upstream_host and upstream_port differ"}},
		{"bad method", func(s *Stream) { s.LoadBalancing = "roundrobin" }, []string{`load_balancing "roundrobin": must be round_robin, least_connections, source_hash, random or first`}},
		{"fail timeout", func(s *Stream) { s.FailTimeoutSeconds = -1 }, []string{"fail_timeout_seconds -1: must be 0-31536000"}},
		{"host missing", func(s *Stream) { three(s); s.Upstreams[1].Host = "" }, []string{`upstreams ":5432": upstreams[1].host: required`}},
		{"host bad", func(s *Stream) { three(s); s.Upstreams[2].Host = "db 3" }, []string{`upstreams "db 3:5432": upstreams[2].host: `, "spaces"}},
		{"port bad", func(s *Stream) { three(s); s.Upstreams[0].Port = 0 }, []string{`upstreams "10.0.0.1:0": upstreams[0].port: 0: must be 1-65535`}},
		{"weight", func(s *Stream) { three(s); s.Upstreams[1].Weight = 101 }, []string{"upstreams[1].weight: 101: must be 1-100"}},
		{"twice", func(s *Stream) { three(s); s.Upstreams[2] = s.Upstreams[0] }, []string{`upstreams "10.0.0.1:5432": upstreams[2]: listed twice (also upstreams[0])`}},
		{"twice, spelled otherwise", func(s *Stream) {
			three(s)
			s.Upstreams[1].Host, s.Upstreams[2] = "db.internal", Upstream{Host: "DB.internal.", Port: s.Upstreams[1].Port}
		}, []string{`upstreams "DB.internal.:5432": upstreams[2]: listed twice (also upstreams[1])`}},
		{"twice, mapped", func(s *Stream) { three(s); s.Upstreams[2] = Upstream{Host: "::ffff:10.0.0.1", Port: 5432} },
			[]string{`upstreams "[::ffff:10.0.0.1]:5432": upstreams[2]: listed twice (also upstreams[0])`}},
		{"only backups", func(s *Stream) {
			three(s)
			for i := range s.Upstreams {
				s.Upstreams[i].Backup = true
			}
		}, []string{"every upstream is a backup"}},
		{"too many", func(s *Stream) {
			three(s)
			s.Upstreams = make([]Upstream, MaxUpstreams+1)
		}, []string{"upstreams 65: too many; at most 64"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validStream()
			tc.change(s)
			err := s.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if !testenv.OneErrorContains(err, tc.want) {
				t.Errorf("Validate() = %v\nwant one error containing all of %q", err, tc.want)
			}
		})
	}
}

func TestUpstreamsJSON(t *testing.T) {
	var s Stream
	err := json.Unmarshal([]byte(`{"id":1,"listen_port":5000,"upstreams":[{"host":"a","port":1},{"host":"b","port":2,"weight":2,"backup":true}],"load_balancing":"first"}`), &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.UpstreamHost != "a" || s.UpstreamPort != 1 {
		t.Errorf("upstream_host, upstream_port = %q, %d, want the first upstream a, 1", s.UpstreamHost, s.UpstreamPort)
	}
	if err := s.Validate(); err != nil {
		t.Errorf("Validate() = %v", err)
	}
	if got := s.UpstreamList(); len(got) != 2 || got[1] != (Upstream{Host: "b", Port: 2, Weight: 2, Backup: true}) {
		t.Errorf("UpstreamList() = %+v", got)
	}
	err = json.Unmarshal([]byte(`{"id":1,"upstreams":[{"host":"a","port":1,"wieght":2}]}`), &s)
	if err == nil || !strings.Contains(err.Error(), `unknown field "wieght"`) {
		t.Errorf("a misspelt key: %v, want an unknown field error", err)
	}
	one := Stream{UpstreamHost: "x", UpstreamPort: 9}
	if got := one.UpstreamList(); len(got) != 1 || got[0].HostPort() != "x:9" || got[0].EffectiveWeight() != 1 {
		t.Errorf("UpstreamList() of a single upstream = %+v", got)
	}
}

func TestPortRangeValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
		want   []string // nil: valid
	}{
		{"100 ports", func(s *Stream) { s.ListenPort, s.ListenPortEnd = 30000, 30099 }, nil},
		{"10000 ports", func(s *Stream) { s.ListenPort, s.ListenPortEnd, s.UpstreamPort = 20000, 29999, 20000 }, nil},
		{"end equals start", func(s *Stream) { s.ListenPortEnd = s.ListenPort }, nil},
		{"fixed", func(s *Stream) {
			s.ListenPort, s.ListenPortEnd, s.UpstreamPort, s.UpstreamPortFixed = 30000, 39999, 65535, true
		}, nil},
		{"10001 ports", func(s *Stream) { s.ListenPort, s.ListenPortEnd = 20000, 30000 }, []string{"listen_port_end 30000: 10001 ports from listen_port 20000; at most 10000"}},
		{"end below start", func(s *Stream) { s.ListenPort, s.ListenPortEnd = 30000, 29999 }, []string{"listen_port_end 29999: must be at least listen_port (30000)"}},
		{"end too big", func(s *Stream) { s.ListenPortEnd = 70000 }, []string{"listen_port_end 70000: must be 1-65535"}},
		{"upstream past 65535", func(s *Stream) { s.ListenPort, s.ListenPortEnd, s.UpstreamPort = 30000, 30099, 65500 },
			[]string{"upstream_port 65500: with 100 listen ports it would go up to 65599, past 65535"}},
		{"an upstream past 65535", func(s *Stream) {
			s.ListenPort, s.ListenPortEnd = 30000, 30099
			s.Upstreams = []Upstream{{Host: s.UpstreamHost, Port: s.UpstreamPort}, {Host: "b", Port: 65450}}
		}, []string{`upstreams "b:65450": upstreams[1].port: with 100 listen ports`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validStream()
			tc.change(s)
			err := s.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if !testenv.OneErrorContains(err, tc.want) {
				t.Errorf("Validate() = %v\nwant one error containing all of %q", err, tc.want)
			}
		})
	}
	s := validStream()
	s.UpstreamPortFixed = true
	if w := s.Warnings(); len(w) != 1 || !strings.Contains(w[0], "upstream_port_fixed") {
		t.Errorf("Warnings() = %q, want one on upstream_port_fixed without a range", w)
	}
}

func TestSNIValidateAndMatch(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(s *Stream)
		want   []string
	}{
		{"exact and wildcard", func(s *Stream) { s.SNI = []string{"db.example.com", "*.example.org"} }, nil},
		{"udp", func(s *Stream) { s.Protocol = "udp"; s.SNI = []string{"a.test"} }, []string{`sni "a.test": server names route TLS over TCP`}},
		{"tcp+udp", func(s *Stream) { s.Protocol = "tcp+udp"; s.SNI = []string{"a.test"} }, []string{"not tcp+udp"}},
		{"range", func(s *Stream) { s.ListenPortEnd = s.ListenPort + 3; s.SNI = []string{"a.test"} }, []string{"not with a port range"}},
		{"bad name", func(s *Stream) { s.SNI = []string{"db example"} }, []string{`sni "db example"`}},
		{"deep wildcard", func(s *Stream) { s.SNI = []string{"a.*.example.com"} }, []string{`sni "a.*.example.com": a wildcard must be the whole first label`}},
		{"ip", func(s *Stream) { s.SNI = []string{"10.0.0.1"} }, []string{"an IP address is not a server name"}},
		{"twice", func(s *Stream) { s.SNI = []string{"a.test", "A.test"} }, []string{`sni "A.test": given twice`}},
		{"behind a PROXY reader", func(s *Stream) {
			s.SNI, s.AcceptProxyProtocol, s.TrustedProxyCIDRs = []string{"a.test"}, ProxyAcceptRequired, []string{"127.0.0.1/32"}
		}, []string{`accept_proxy_protocol "required": not with sni`, "use off, or leave sni empty"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validStream()
			tc.change(s)
			err := s.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate() = %v", err)
				}
				return
			}
			if !testenv.OneErrorContains(err, tc.want) {
				t.Errorf("Validate() = %v\nwant one error containing all of %q", err, tc.want)
			}
		})
	}
	// Stored before the check of two spellings: it still loads.
	twice := validStream()
	twice.Upstreams = []Upstream{{Host: "db.internal", Port: 5432}, {Host: "DB.internal", Port: 5432}}
	twice.UpstreamHost, twice.UpstreamPort = "db.internal", 5432
	if err := twice.ValidateStored(); err != nil {
		t.Errorf("ValidateStored() of one upstream in two spellings = %v, want nil", err)
	}
	// Stored before that rule: it still loads.
	stored := validStream()
	stored.SNI, stored.AcceptProxyProtocol, stored.TrustedProxyCIDRs = []string{"a.test"}, ProxyAcceptRequired, []string{"127.0.0.1/32"}
	if err := stored.ValidateStored(); err != nil {
		t.Errorf("ValidateStored() of sni with accept_proxy_protocol = %v, want nil", err)
	}
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"db.example.com", "db.example.com", true},
		{"db.example.com", "DB.example.com", true},
		{"*.example.com", "db.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", "a.b.example.com", false},
		{"*.example.com", ".example.com", false},
		{"db.example.com", "db.example.org", false},
	} {
		if got := SNIMatches(tc.pattern, tc.name); got != tc.want {
			t.Errorf("SNIMatches(%q, %q) = %v", tc.pattern, tc.name, got)
		}
	}
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"*.example.com", "db.example.com", true},
		{"db.example.com", "*.example.com", true},
		{"*.example.com", "*.example.com", true},
		{"*.example.com", "*.b.example.com", false},
		{"*.example.com", "a.b.example.com", false},
		{"a.test", "b.test", false},
	} {
		if got := SNIOverlap(tc.a, tc.b); got != tc.want {
			t.Errorf("SNIOverlap(%q, %q) = %v", tc.a, tc.b, got)
		}
	}
}
