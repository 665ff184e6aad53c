package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// TestFeatureConfigs checks that each case's settings reach the aegis and
// HAProxy configs.
func TestFeatureConfigs(t *testing.T) {
	up, err := startUpstreams()
	if err != nil {
		t.Fatal(err)
	}
	defer up.close()
	fu, err := startFeatUps(up)
	if err != nil {
		t.Fatal(err)
	}
	defer fu.close()
	var routes []*featRoute
	for i := range featCases {
		for k, sink := range []bool{false, true} {
			routes = append(routes, &featRoute{c: &featCases[i], sink: sink, port: 20000 + 2*i + k})
		}
	}
	b, err := aegisFeatures(2019, "/l", fu, routes)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct{ Streams struct{ Hosts []spec.Stream } }
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	byName := map[string]spec.Stream{}
	for _, h := range cfg.Apps.Streams.Hosts {
		byName[h.Name] = h
		if h.Protocol != spec.ProtocolTCP || !h.LogConnections || len(h.WhitelistCIDRs) == 0 ||
			h.WhitelistCIDRs[len(h.WhitelistCIDRs)-1] != "127.0.0.0/8" {
			t.Errorf("%s: %+v", h.Name, h)
		}
	}
	if len(byName) != 2*len(featCases)+2 { // the SNI ports have two streams each
		t.Errorf("%d streams", len(byName))
	}
	if h := byName["bench-rr_echo-0"]; len(h.Upstreams) != 3 || h.LoadBalancing != "round_robin" || h.Upstreams[0].Port != h.UpstreamPort {
		t.Errorf("rr: %+v", h)
	}
	a, b2 := byName["bench-sni_echo-0"], byName["bench-sni_echo-1"]
	if a.ListenPort != b2.ListenPort || strings.Join(a.SNI, ",") != featNameA || strings.Join(b2.SNI, ",") != featNameB ||
		a.UpstreamPort != fu.tlsEchoA.port() || b2.UpstreamPort != fu.tlsEchoB.port() || a.SSLEnabled {
		t.Errorf("sni: %+v\n%+v", a, b2)
	}
	if h := byName["bench-perip_echo-0"]; h.MaxConnectionsPerIP != perIPCap {
		t.Errorf("perip: %+v", h)
	}
	if h := byName["bench-pp_sink-0"]; h.AcceptProxyProtocol != "required" || len(h.TrustedProxyCIDRs) != 1 {
		t.Errorf("pp: %+v", h)
	}
	if h := byName["bench-uptls_echo-0"]; !h.UpstreamTLS || h.UpstreamTLSServerName != featNameA || h.UpstreamTLSCA != fu.certA.caPEM {
		t.Errorf("uptls: %+v", h)
	}
	if n := len(byName["bench-acl100k_echo-0"].WhitelistCIDRs); n != 100_000 {
		t.Errorf("acl100k: %d entries", n)
	}
	if n := len(byName["bench-acl10_echo-0"].WhitelistCIDRs); n != 10 {
		t.Errorf("acl10: %d entries", n)
	}
	for _, w := range byName["bench-acl100k_echo-0"].WhitelistCIDRs {
		if _, err := spec.ParseCIDR(w); err != nil {
			t.Fatal(err)
		}
	}

	h, files := haproxyFeatures("/d", fu, routes)
	for _, want := range []string{
		"frontend fe_rr_echo\n", "    balance roundrobin\n",
		"    tcp-request inspect-delay 5s\n", "use_backend be_sni_echo_1 if { req.ssl_sni -i " + featNameB + " }\n",
		"    tcp-request connection track-sc0 src\n", "reject if { sc0_conn_cur gt 1000 }",
		" accept-proxy\n", " ssl verify required ca-file /d/ca-a.bench.test.pem sni str(a.bench.test) verifyhost a.bench.test\n",
		"reject if !{ src -f /d/whitelist-acl100k.txt }",
	} {
		if !strings.Contains(h, want) {
			t.Errorf("haproxy config lacks %q", want)
		}
	}
	if n := len(strings.Split(strings.TrimSpace(files["/d/whitelist-acl100k.txt"]), "\n")); n != 100_000 {
		t.Errorf("haproxy whitelist: %d lines", n)
	}
	if files["/d/ca-a.bench.test.pem"] != fu.certA.caPEM {
		t.Error("haproxy CA file")
	}
	f := haproxyFront(routes[8:10])
	if !strings.Contains(f, "server s0 127.0.0.1:20008 send-proxy-v2\n") || !strings.Contains(f, "server s0 127.0.0.1:20009 send-proxy-v2\n") {
		t.Errorf("front config:\n%s", f)
	}
}

// TestFeatures runs the features test, one round of 150 ms per row and
// proxy, against bin/aegis ($AEGIS_BIN) and HAProxy, those of them that
// are there: every row gets a value and every check passes.
func TestFeatures(t *testing.T) {
	bin := os.Getenv("AEGIS_BIN")
	if bin == "" {
		bin, _ = filepath.Abs("../../bin/aegis")
	}
	cfg := config{aegis: bin, w: window{warmup: 50 * time.Millisecond, dur: 100 * time.Millisecond}, workers: 2,
		startTimeout: 30 * time.Second}
	var ps []proxy
	for _, p := range proxies {
		if featStarters[p.name] != nil {
			if _, err := lookBinary(p.binary(&cfg)); err != nil {
				t.Logf("%s: %v", p.name, err)
				continue
			}
			ps = append(ps, p)
		}
	}
	if len(ps) == 0 {
		t.Skip("neither bin/aegis nor haproxy is there")
	}
	up, err := startUpstreams()
	if err != nil {
		t.Fatal(err)
	}
	defer up.close()
	results, notes := runFeatures(ps, cfg, up, t.TempDir())
	if len(notes) > 0 {
		t.Errorf("notes: %q", notes)
	}
	if len(results) != len(ps) {
		t.Fatalf("%d results for %d proxies", len(results), len(ps))
	}
	for _, r := range results {
		if r.skipped != "" {
			t.Errorf("%s skipped: %s", r.name, r.skipped)
			continue
		}
		for _, m := range featMetrics(cfg.workers) {
			// The CPU time comes in ticks of 10 ms: a short run may
			// see none.
			if v, ok := r.values[m.key]; !ok || v <= 0 && !strings.HasPrefix(m.key, "cpu_") {
				t.Errorf("%s: no %s", r.name, m.label)
			}
		}
		all := strings.Join(r.notes, "\n")
		for _, n := range r.notes {
			if !strings.HasPrefix(n, "check: ") {
				t.Errorf("%s: %s", r.name, n)
			}
		}
		want := []string{"check: round robin: ", "check: TLS to the upstream, verified: ", "check: SNI-shared port"}
		if r.name == "aegis" {
			want = append(want, "check: max_connections_per_ip: ")
		}
		for _, w := range want {
			if !strings.Contains(all, w) {
				t.Errorf("%s: no note %q in\n%s", r.name, w, all)
			}
		}
	}
	out := featReport(results, notes, cfg)
	if !strings.Contains(out, "plain stream: short conns/s, 2 workers") || strings.Count(out, "(1.00, ") < len(ps) {
		t.Errorf("report:\n%s", out)
	}
	t.Log("\n" + out)
}
