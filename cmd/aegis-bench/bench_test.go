package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	_ "github.com/caddyserver/caddy/v2/modules/logging"

	_ "github.com/aegis-proxy/caddy-aegis/admin"
	"github.com/aegis-proxy/caddy-aegis/certcheck"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	_ "github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i)*time.Microsecond)
	}
	cases := []struct {
		p    float64
		want time.Duration
	}{
		{50, 50 * time.Microsecond},
		{99, 99 * time.Microsecond},
		{100, 100 * time.Microsecond},
		{0.5, 1 * time.Microsecond},
	}
	for _, c := range cases {
		if got := percentile(s, c.p); got != c.want {
			t.Errorf("percentile(1..100us, %v) = %v, want %v", c.p, got, c.want)
		}
	}
	if got := percentile([]time.Duration{7}, 99); got != 7 {
		t.Errorf("one sample: got %v, want 7ns", got)
	}
	if got := percentile(nil, 50); got != 0 {
		t.Errorf("no samples: got %v, want 0", got)
	}
	// 3 samples: p50 is the 2nd, p99 the 3rd.
	three := []time.Duration{1, 2, 3}
	if percentile(three, 50) != 2 || percentile(three, 99) != 3 {
		t.Errorf("three samples: p50=%v p99=%v, want 2 and 3", percentile(three, 50), percentile(three, 99))
	}
}

var testUp, testFront = ports{Sink: 9001, Source: 9002, Echo: 9003}, ports{Sink: 7001, Source: 7002, Echo: 7003}

func TestAegisConfig(t *testing.T) {
	b, err := aegisConfig(2019, "/tmp/x/aegis.log", testUp, testFront)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Admin   struct{ Listen string }
		Logging struct {
			Logs map[string]struct {
				Level  string
				Writer struct{ Output, Filename string }
			}
		}
		Apps struct {
			Streams struct {
				Hosts []map[string]any
			}
		}
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, b)
	}
	if cfg.Admin.Listen != "127.0.0.1:2019" {
		t.Errorf("admin listen = %q", cfg.Admin.Listen)
	}
	log := cfg.Logging.Logs["default"]
	if log.Level != "INFO" || log.Writer.Output != "file" || log.Writer.Filename != "/tmp/x/aegis.log" {
		t.Errorf("log = %+v", log)
	}
	hosts := cfg.Apps.Streams.Hosts
	if len(hosts) != 3 {
		t.Fatalf("%d hosts, want 3", len(hosts))
	}
	for i, h := range hosts {
		if h["id"] != float64(i+1) || h["protocol"] != "tcp" || h["listen_address"] != "127.0.0.1" ||
			h["upstream_host"] != "127.0.0.1" || h["log_connections"] != true {
			t.Errorf("host %d = %v", i, h)
		}
		if h["listen_port"] != float64(testFront.list()[i]) || h["upstream_port"] != float64(testUp.list()[i]) {
			t.Errorf("host %d ports = %v -> %v", i, h["listen_port"], h["upstream_port"])
		}
		if w, _ := h["whitelist_cidrs"].([]any); len(w) != 1 || w[0] != "127.0.0.0/8" {
			t.Errorf("host %d whitelist = %v", i, h["whitelist_cidrs"])
		}
		// Room for -idle 9000, which HAProxy's maxconn allows; the
		// default would be a share of the open-file limit.
		if h["max_connections"] != float64(natHardCap) {
			t.Errorf("host %d max_connections = %v, want %d", i, h["max_connections"], natHardCap)
		}
	}
}

func TestHAProxyConfig(t *testing.T) {
	cfg, err := haproxyConfig(testUp, testFront)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"nbthread 1", "mode tcp", "option tcplog", "log stdout format raw local0",
		"timeout connect 10s", "timeout client 1h", "timeout server 1h",
		"frontend fe_sink\n    bind 127.0.0.1:7001\n",
		"backend be_source\n    server up 127.0.0.1:9002\n",
		"frontend fe_echo\n    bind 127.0.0.1:7003\n",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("haproxy config lacks %q:\n%s", want, cfg)
		}
	}
	if n := strings.Count(cfg, "tcp-request connection reject if !{ src 127.0.0.0/8 }"); n != 3 {
		t.Errorf("%d whitelist rules, want 3", n)
	}
}

func TestNginxConfig(t *testing.T) {
	cfg, err := nginxConfig("/tmp/n", "/mod.so", testUp, testFront, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"load_module /mod.so;", "worker_processes 1;", "daemon off;",
		"pid /tmp/n/nginx.pid;", "access_log /tmp/n/nginx-access.log bench;",
		"listen 127.0.0.1:7002;", "proxy_pass 127.0.0.1:9002;",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("nginx config lacks %q:\n%s", want, cfg)
		}
	}
	if n := strings.Count(cfg, "allow 127.0.0.0/8;\n        deny all;"); n != 3 {
		t.Errorf("%d allow/deny pairs, want 3", n)
	}
	if strings.Count(cfg, "{") != strings.Count(cfg, "}") {
		t.Errorf("unbalanced braces:\n%s", cfg)
	}
	// -idle 9000: two of worker_connections per connection.
	if cfg, _ := nginxConfig("/tmp/n", "/mod.so", testUp, testFront, 9000); !strings.Contains(cfg, "worker_connections 19000;") || !strings.Contains(cfg, "worker_rlimit_nofile 20000;") {
		t.Errorf("nginx config for 9000 idle connections:\n%s", cfg)
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tnginx\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\nRssAnon:\t 100 kB\n"
	if got, err := parseVmRSS(status); err != nil || got != 4321 {
		t.Errorf("parseVmRSS = %d, %v; want 4321", got, err)
	}
	if _, err := parseVmRSS("Name:\tx\n"); err == nil {
		t.Error("no VmRSS line: want an error")
	}
}

func TestParsePPID(t *testing.T) {
	got, err := parsePPID("4242 (nginx: worker (x) ) S 4200 4200 4200 0 -1")
	if err != nil || got != 4200 {
		t.Errorf("parsePPID = %d, %v; want 4200", got, err)
	}
	if _, err := parsePPID("garbage"); err == nil {
		t.Error("garbage: want an error")
	}
}

func TestTable(t *testing.T) {
	metrics := []metric{{key: "up1", label: "upload", format: "%.0f"}, {key: "mem", label: "memory", format: "%.1f"}}
	out := table([]result{
		{name: "direct", values: map[string]float64{"up1": 2000}},
		{name: "aegis", skipped: "not built"},
		{name: "haproxy", values: map[string]float64{"up1": 1000, "mem": 2}},
		{name: "nginx", values: map[string]float64{"up1": 500, "mem": 3}},
	}, metrics, "haproxy")
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3:\n%s", len(lines), out)
	}
	if strings.Contains(lines[0], "aegis") {
		t.Errorf("skipped proxy has a column:\n%s", out)
	}
	for _, want := range []string{"direct", "haproxy", "nginx"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("header lacks %s: %q", want, lines[0])
		}
	}
	for _, want := range []string{"2000 (1.00, 2.00)", "1000 (0.50, 1.00)", "500 (0.25, 0.50)"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("upload row lacks %q: %q", want, lines[1])
		}
	}
	// direct has no memory value: its cell is "-" and the ratio to it too.
	if !strings.Contains(lines[2], "3.0 (-, 1.50)") || !strings.Contains(lines[2], " - ") {
		t.Errorf("memory row: %q", lines[2])
	}
	if len(lines[1]) != len(lines[2]) {
		t.Errorf("rows not aligned:\n%s", out)
	}
}

func TestUDPStats(t *testing.T) {
	var s udpStats
	s.add(udpStats{sent: [numPhases]int64{10, 1000, 0}, echoed: [numPhases]int64{10, 998, 0}, rcvd: [numPhases]int64{8, 1000, 2}})
	s.add(udpStats{sent: [numPhases]int64{0, 1000, 0}, echoed: [numPhases]int64{0, 1000, 0}, rcvd: [numPhases]int64{0, 1000, 0}, resent: 3})
	if got := s.lossPercent(); got != 0.1 {
		t.Errorf("loss = %v%%, want 0.1%% (2 of 2000)", got)
	}
	if got := s.rate(window{dur: 2 * time.Second}); got != 1000 {
		t.Errorf("rate = %v/s, want 1000 (2000 echoes in 2 s)", got)
	}
	if s.resent != 3 {
		t.Errorf("resent = %d, want 3", s.resent)
	}
	// Late echoes of replaced datagrams can outnumber the sent ones: no
	// negative loss.
	if got := (udpStats{sent: [numPhases]int64{0, 5, 0}, echoed: [numPhases]int64{0, 6, 0}}).lossPercent(); got != 0 {
		t.Errorf("more echoes than sent: loss = %v, want 0", got)
	}
	if got := (udpStats{}).lossPercent(); got != 0 {
		t.Errorf("nothing sent: loss = %v, want 0", got)
	}
}

func TestDatagram(t *testing.T) {
	b := make([]byte, udpSize)
	putDatagram(b, 31, 7, phaseCount)
	slot, gen, phase, ok := parseDatagram(b)
	if !ok || slot != 31 || gen != 7 || phase != phaseCount {
		t.Errorf("parse = %d %d %d %v, want 31 7 %d true", slot, gen, phase, ok, phaseCount)
	}
	if _, _, _, ok := parseDatagram(b[:10]); ok {
		t.Error("short datagram parsed")
	}
	b[8] = numPhases
	if _, _, _, ok := parseDatagram(b); ok {
		t.Error("bad phase parsed")
	}
}

// TestUDPLoadEcho runs the generator against the in-process echo.
func TestUDPLoadEcho(t *testing.T) {
	e, err := startUDPEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	marks := 0
	w := window{warmup: 50 * time.Millisecond, dur: 200 * time.Millisecond}
	st, err := udpLoad(addr(e.port()), 3, 16, w, func() { marks++ })
	if err != nil {
		t.Fatal(err)
	}
	if marks != 2 {
		t.Errorf("mark called %d times, want 2", marks)
	}
	if st.rcvd[phaseCount] < 200 || st.sent[phaseCount] < 200 {
		t.Errorf("only %d sent and %d echoes in the counted part", st.sent[phaseCount], st.rcvd[phaseCount])
	}
	if st.sent[phaseDrain] != 0 {
		t.Errorf("%d sent during the drain", st.sent[phaseDrain])
	}
	// Every datagram comes back: nothing in flight after the drain.
	total := func(a [numPhases]int64) (n int64) {
		for _, v := range a {
			n += v
		}
		return n
	}
	if total(st.sent) != total(st.echoed) || total(st.echoed) != total(st.rcvd) || st.lossPercent() != 0 {
		t.Errorf("sent %v, echoed %v, received %v: want all back", st.sent, st.echoed, st.rcvd)
	}
	t.Logf("%.0f datagrams/s", st.rate(w))
}

// TestUDPLoadTopsUp: an upstream that drops the first datagrams of every
// slot must not stall the generator; the slots are filled again.
func TestUDPLoadTopsUp(t *testing.T) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const win = 4
	go func() {
		buf := make([]byte, 2048)
		for seen := 0; ; seen++ {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if seen >= win { // the whole first window is lost
				c.WriteToUDP(buf[:n], from)
			}
		}
	}()
	w := window{dur: 400 * time.Millisecond}
	st, err := udpLoad(c.LocalAddr().String(), 1, win, w, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.resent < win {
		t.Errorf("resent %d, want at least %d", st.resent, win)
	}
	if st.rcvd[phaseCount] < 100 {
		t.Errorf("%d echoes after the loss, want the window refilled", st.rcvd[phaseCount])
	}
	// The lost ones were sent in the counted part (no warm-up here).
	if lost := st.sent[phaseCount] - st.echoed[phaseCount]; lost != win {
		t.Errorf("%d lost, want %d", lost, win)
	}
}

func TestNATEntries(t *testing.T) {
	e, err := startUDPEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	defer func(q, s time.Duration) { natQuiet, natSettle = q, s }(natQuiet, natSettle)
	natQuiet, natSettle = 0, 0
	reads := 0
	rss := func() (int64, error) { reads++; return int64(1000 + (reads-1)*30*5), nil }
	fds := func() (int, error) { return openFDs(os.Getpid()) }
	r, err := natEntries(addr(e.port()), 30, natClientPorts(), rss, fds)
	if err != nil {
		t.Fatal(err)
	}
	if r.entries != 30 || r.kb != 5 {
		t.Errorf("entries %d, KB %v; want 30 and 5", r.entries, r.kb)
	}
	// Here the sockets are the bench's own: 30 of them.
	if r.fdsAdded != 30 {
		t.Errorf("fds added %d, want 30", r.fdsAdded)
	}
	// An upstream that answers only 10 sources: 10 entries, and why not 30.
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go func() {
		buf, seen := make([]byte, 2048), map[string]bool{}
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if len(seen) < 10 || seen[from.String()] {
				seen[from.String()] = true
				c.WriteToUDP(buf[:n], from)
			}
		}
	}()
	defer func(r time.Duration) { natRetry = r }(natRetry)
	natRetry = 10 * time.Millisecond
	r, err = natEntries(c.LocalAddr().String(), 30, natClientPorts(), rss, nil)
	if r.entries != 10 || err == nil || !strings.Contains(err.Error(), "held 10 of 30 entries: 20 sockets got no echo") {
		t.Errorf("10 answered: %+v, %v", r, err)
	}
	// Too few ports: it holds what it can and says why.
	r, err = natEntries(addr(e.port()), 30, natClientPorts()[:0], rss, nil)
	if err == nil || r.entries != 0 {
		t.Errorf("no ports: %+v, %v; want an error", r, err)
	}
}

func TestNATDefault(t *testing.T) {
	n, why := natDefault(20000, 23511, 32768, 60999)
	if n != 19000 || !strings.Contains(why, "open-file hard limit is 20000") {
		t.Errorf("fd limit 20000: %d, %q", n, why)
	}
	n, why = natDefault(1<<20, 23511, 32768, 60999)
	if n != 23511 || !strings.Contains(why, "client ports") {
		t.Errorf("ports: %d, %q", n, why)
	}
	n, why = natDefault(1<<20, 60000, 20000, 65535)
	if n != 44536 || !strings.Contains(why, "ephemeral range 20000-65535") {
		t.Errorf("ephemeral range: %d, %q", n, why)
	}
	n, why = natDefault(^uint64(0), 60000, 1024, 65535)
	if n != natTarget || why != "" {
		t.Errorf("no limit: %d, %q", n, why)
	}
}

func TestNATClientPorts(t *testing.T) {
	lo, hi := ephemeralRange()
	seen := map[int]bool{}
	for _, p := range natClientPorts() {
		if p < 1024 || p > 65535 || (p >= lo && p <= hi) || (p >= 20000 && p < 32768) || seen[p] {
			t.Fatalf("port %d", p)
		}
		seen[p] = true
	}
	if len(seen) == 0 {
		t.Error("no ports")
	}
}

func TestParseCPUTicks(t *testing.T) {
	stat := "4242 (nginx: worker (x) ) S 4200 4200 4200 0 -1 4194560 100 0 0 0 150 25 0 0 20 0 1 0"
	if got, err := parseCPUTicks(stat); err != nil || got != 175 {
		t.Errorf("parseCPUTicks = %d, %v; want 175", got, err)
	}
	if _, err := parseCPUTicks("1 (x) S 1 2"); err == nil {
		t.Error("short stat: want an error")
	}
	if _, err := cpuTicks("self"); err != nil {
		t.Error(err)
	}
}

var testUDP = struct{ up, front ports }{
	ports{Sink: 9001, Source: 9002, Echo: 9003, UDP: 9004},
	ports{Sink: 7001, Source: 7002, Echo: 7003, UDP: 7004},
}

func TestUDPConfigs(t *testing.T) {
	b, err := aegisConfig(2019, "/l", testUDP.up, testUDP.front)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			Streams struct{ Hosts []map[string]any }
		}
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	hosts := cfg.Apps.Streams.Hosts
	if len(hosts) != 4 {
		t.Fatalf("%d hosts, want 3 TCP and 1 UDP", len(hosts))
	}
	u := hosts[3]
	if u["id"] != 4.0 || u["protocol"] != "udp" || u["listen_address"] != "127.0.0.1" || u["listen_port"] != 7004.0 ||
		u["upstream_host"] != "127.0.0.1" || u["upstream_port"] != 9004.0 || u["enabled"] != true ||
		u["idle_timeout_seconds"] != float64(udpIdleTimeout) {
		t.Errorf("UDP host = %v", u)
	}
	if _, ok := hosts[0]["idle_timeout_seconds"]; ok || hosts[0]["protocol"] != "tcp" {
		t.Errorf("TCP host = %v", hosts[0])
	}
	// The UDP tests' config: the UDP stream alone.
	b, _ = aegisConfig(2019, "/l", ports{UDP: 9004}, ports{UDP: 7004})
	if err := json.Unmarshal(b, &cfg); err != nil || len(cfg.Apps.Streams.Hosts) != 1 {
		t.Errorf("UDP only: %v, %s", err, b)
	}

	// The new-flow test's: one reply ends a session.
	b, _ = aegisConfigOpts(2019, "/l", ports{UDP: 9004}, ports{UDP: 7004}, nil, udpEnding{responses: 1})
	if !strings.Contains(string(b), `"udp_responses": 1`) {
		t.Errorf("new flows: aegis config lacks udp_responses 1:\n%s", b)
	}
	if n, _ := nginxConfigWith("/tmp/n", "/mod.so", ports{UDP: 9004}, ports{UDP: 7004}, 0, udpEnding{responses: 1}); !strings.Contains(n, "proxy_timeout 120s;\n        proxy_responses 1;\n") {
		t.Errorf("new flows: nginx config lacks proxy_responses 1:\n%s", n)
	}
	// Its second part's: sessions live out an idle timeout of a second.
	b, _ = aegisConfigOpts(2019, "/l", ports{UDP: 9004}, ports{UDP: 7004}, nil, udpEnding{idle: 1})
	if err := json.Unmarshal(b, &cfg); err != nil || len(cfg.Apps.Streams.Hosts) != 1 {
		t.Fatalf("kept flows: %v, %s", err, b)
	}
	if h := cfg.Apps.Streams.Hosts[0]; h["idle_timeout_seconds"] != 1.0 || h["udp_responses"] != nil {
		t.Errorf("kept flows: aegis UDP host = %v", h)
	}
	if n, _ := nginxConfigWith("/tmp/n", "/mod.so", ports{UDP: 9004}, ports{UDP: 7004}, 19000, udpEnding{idle: 1}); !strings.Contains(n, "proxy_timeout 1s;\n        proxy_pass") || !strings.Contains(n, "worker_connections 39000;") {
		t.Errorf("kept flows: nginx config:\n%s", n)
	}

	n, err := nginxConfig("/tmp/n", "/mod.so", ports{UDP: 9004}, ports{UDP: 7004}, 19000)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"listen 127.0.0.1:7004 udp;\n        allow 127.0.0.0/8;\n        deny all;\n        proxy_timeout 120s;\n        proxy_pass 127.0.0.1:9004;\n",
		"worker_connections 39000;", "worker_rlimit_nofile 20000;",
	} {
		if !strings.Contains(n, want) {
			t.Errorf("nginx UDP config lacks %q:\n%s", want, n)
		}
	}
	if strings.Contains(n, "proxy_responses") || strings.Contains(n, "proxy_connect_timeout") || strings.Count(n, "server {") != 1 {
		t.Errorf("nginx UDP config:\n%s", n)
	}
	if n, _ := nginxConfig("/tmp/n", "/mod.so", testUp, testFront, 0); !strings.Contains(n, "worker_connections 10000;") {
		t.Errorf("TCP config changed:\n%s", n)
	}

	h, err := haproxyConfig(testUDP.up, testUDP.front)
	if err != nil || strings.Contains(h, "7004") || strings.Count(h, "frontend") != 3 {
		t.Errorf("haproxy config has the UDP route: %v\n%s", err, h)
	}
}

func TestUDPTable(t *testing.T) {
	out := table([]result{
		{name: "direct", values: map[string]float64{"dps": 400, "loss": 0}},
		{name: "aegis", values: map[string]float64{"dps": 300, "loss": 0.05, "natmem": 2}},
		{name: "haproxy", na: "no UDP"},
		{name: "nginx", values: map[string]float64{"dps": 200, "loss": 0.01, "natmem": 4}},
	}, udpMetrics(4, 32, 100, false), "nginx")
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if !strings.Contains(lines[0], "haproxy") {
		t.Errorf("n/a proxy has no column:\n%s", out)
	}
	for _, want := range []string{"400 (1.00, 2.00)", "300 (0.75, 1.50)", "n/a", "200 (0.50, 1.00)"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("rate row lacks %q: %q", want, lines[1])
		}
	}
	if cells := lines[2][strings.Index(lines[2], ")")+1:]; !strings.Contains(cells, " 0.050 ") || strings.Contains(cells, "(") {
		t.Errorf("loss row: %q", lines[2])
	}
	if last := lines[len(lines)-1]; !strings.Contains(last, "2.00 (-, 0.50)") || !strings.Contains(last, "4.00 (-, 1.00)") {
		t.Errorf("NAT memory row: %q", last)
	}
}

func TestParseCPUBusy(t *testing.T) {
	stat := "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 1 2 3 100 7 4 5 6 0 0\ncpu1 10 0 0 50 0 0 0 0 0 0\nintr 1 2\n"
	got, err := parseCPUBusy(stat)
	if err != nil || len(got) != 2 || got[0] != 21 || got[1] != 10 {
		t.Errorf("parseCPUBusy = %v, %v; want cpu0 21 (all but idle and iowait), cpu1 10", got, err)
	}
	if _, err := parseCPUBusy("intr 1\n"); err == nil {
		t.Error("no cpu lines: want an error")
	}
}

func TestCPUMeter(t *testing.T) {
	m := newCPUMeter("self", "0") // no process 0: its share cannot be read
	for range 2 {
		m.mark()
		time.Sleep(10 * time.Millisecond)
		m.mark()
	}
	if m.open || m.secs < 0.02 {
		t.Errorf("open %v, %v s; want closed, >= 0.02 s", m.open, m.secs)
	}
	if v, ok := m.percent(0); !ok || v < 0 {
		t.Errorf("self: %v, %v", v, ok)
	}
	if _, ok := m.percent(1); ok {
		t.Error("unreadable process has a share")
	}
	if _, ok := m.cpuPercent(0); !ok {
		t.Error("no share for CPU 0")
	}

	// 1 s in which CPU 0 was 95% busy and CPU 1 60%.
	m = &cpuMeter{secs: 1, sumBusy: map[int]int64{0: 95, 1: 60}}
	notes := otherLoad(m, map[string]float64{"cpubench": 50, "cpuproxy": 55})
	if len(notes) != 1 || !strings.Contains(notes[0], "about 45% of CPU 0") {
		t.Errorf("notes %q, want other work on CPU 0 only", notes)
	}
	notes = otherLoad(m, map[string]float64{"cpubench": 90, "cpuproxy": 55})
	if len(notes) != 0 {
		t.Errorf("notes %q, want none: the bench was busy", notes)
	}
	m.sumBusy = map[int]int64{0: 60, 1: 60}
	notes = otherLoad(m, map[string]float64{"cpubench": 55, "cpuproxy": 55})
	if len(notes) != 1 || !strings.Contains(notes[0], "neither the proxy (55% CPU) nor the bench (55%)") {
		t.Errorf("notes %q, want one for both idle", notes)
	}
	// direct: nothing of ours on CPU 1, whatever runs there.
	if notes = otherLoad(m, map[string]float64{"cpubench": 100}); len(notes) != 0 {
		t.Errorf("direct: notes %q", notes)
	}
}

func TestBenchCert(t *testing.T) {
	bc, err := newBenchCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// HAProxy's file: the chain, leaf first, then the key.
	var types []string
	rest := []byte(bc.combinedPEM())
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		types = append(types, b.Type)
	}
	if strings.Join(types, ",") != "CERTIFICATE,CERTIFICATE,PRIVATE KEY" || len(bytes.TrimSpace(rest)) != 0 {
		t.Fatalf("PEM blocks %v, rest %q", types, rest)
	}
	pair, err := tls.X509KeyPair([]byte(bc.combinedPEM()), []byte(bc.combinedPEM()))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pair.Certificate[0], bc.leafDER) || len(pair.Certificate) != 2 {
		t.Error("the file's first certificate is not the leaf, or the chain is not leaf and CA")
	}
	leaf := pair.Leaf
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("leaf key %T, want ECDSA P-256", leaf.PublicKey)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: tlsName, Roots: bc.roots}); err != nil {
		t.Errorf("the leaf does not verify for %s: %v", tlsName, err)
	}
	// Aegis takes it as an upload without a warning.
	if _, warnings, err := certcheck.ParseCustom(bc.chainPEM, bc.keyPEM, time.Now()); err != nil || len(warnings) > 0 {
		t.Errorf("ParseCustom: %v %v", warnings, err)
	}
}

// TestAegisTLSThroughAPI runs the TLS start of aegis against an aegis in
// this process: the certificate goes in through the API, the config that
// uses it is loaded through Caddy's admin API, and clients that verify the
// chain get through every TLS stream.
func TestAegisTLSThroughAPI(t *testing.T) {
	bc, err := newBenchCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	up, err := startUpstreams()
	if err != nil {
		t.Fatal(err)
	}
	defer up.close()
	// The config loaded through the admin API is autosaved, and Caddy
	// keeps data: both in the test's directory.
	home := t.TempDir()
	for _, v := range []string{"HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"} {
		t.Setenv(v, home)
	}
	c := testenv.New(t)
	if err := c.Load(map[string]any{"streams": map[string]any{}}); err != nil {
		t.Fatal(err)
	}
	api := newAegisAPI(c.AdminPort)
	id, err := uploadAegisCert(api, bc)
	if err != nil {
		t.Fatal(err)
	}
	var cs spec.CertStatus
	if err := api.call("GET", "/api/v1/certificates/"+strconv.FormatInt(id, 10), nil, http.StatusOK, &cs); err != nil {
		t.Fatal(err)
	}
	if cs.Source != spec.SourceCustom || len(cs.Domains) != 1 || cs.Domains[0] != tlsName {
		t.Errorf("stored %+v", cs)
	}
	front := ports{Sink: testenv.FreePort(t), Source: testenv.FreePort(t), Echo: testenv.FreePort(t)}
	cfg, err := aegisConfigWith(c.AdminPort, c.LogFile, ports{Sink: up.sink.port(), Source: up.source.port(), Echo: up.echo.port()},
		front, &aegisTLS{dbPath: c.DBFile, certID: id})
	if err != nil {
		t.Fatal(err)
	}
	if err := api.load(cfg); err != nil {
		t.Fatal(err)
	}
	if err := probeTLS(front, up, bc); err != nil {
		t.Fatalf("through the TLS streams: %v", err)
	}
}

func TestTLSConfigs(t *testing.T) {
	h, err := haproxyTLSConfig("/t/bench.pem", testUDP.up, testUDP.front)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"nbthread 1", "mode tcp", "option tcplog",
		"ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256\n", "ssl-default-bind-ciphers ECDHE-ECDSA-AES128-GCM-SHA256\n",
		"ssl-default-bind-curves X25519\n", "ssl-default-bind-options ssl-min-ver TLSv1.2\n",
		"frontend fe_sink\n    bind 127.0.0.1:7001 ssl crt /t/bench.pem\n    tcp-request connection reject if !{ src 127.0.0.0/8 }\n",
		"backend be_echo\n    server up 127.0.0.1:9003\n",
	} {
		if !strings.Contains(h, want) {
			t.Errorf("haproxy TLS config lacks %q:\n%s", want, h)
		}
	}
	if strings.Count(h, "ssl crt") != 3 || strings.Contains(h, "7004") {
		t.Errorf("haproxy TLS config: want 3 TLS frontends and no UDP:\n%s", h)
	}

	n, err := nginxTLSConfig("/t", "/mod.so", "/t/bench.pem", testUDP.up, testUDP.front)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"load_module /mod.so;", "worker_processes 1;", "daemon off;",
		"ssl_certificate /t/bench.pem;", "ssl_certificate_key /t/bench.pem;", "ssl_protocols TLSv1.2 TLSv1.3;",
		"ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;", "ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256;", "ssl_ecdh_curve X25519;",
		"listen 127.0.0.1:7002 ssl;\n        allow 127.0.0.0/8;\n        deny all;\n", "proxy_pass 127.0.0.1:9002;",
	} {
		if !strings.Contains(n, want) {
			t.Errorf("nginx TLS config lacks %q:\n%s", want, n)
		}
	}
	if strings.Count(n, "{") != strings.Count(n, "}") || strings.Count(n, "server {") != 3 || strings.Contains(n, "udp") {
		t.Errorf("nginx TLS config:\n%s", n)
	}

	b, err := aegisConfigWith(2019, "/l", testUDP.up, testUDP.front, &aegisTLS{dbPath: "/t/streams.db", certID: 5})
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			Streams struct {
				Hosts   []map[string]any
				Storage map[string]any
			}
		}
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	if p := cfg.Apps.Streams.Storage["path"]; p != "/t/streams.db" || len(cfg.Apps.Streams.Storage) != 1 {
		t.Errorf("storage = %v", cfg.Apps.Streams.Storage)
	}
	for i, h := range cfg.Apps.Streams.Hosts {
		tcp := h["protocol"] == "tcp"
		if tcp && (h["ssl_enabled"] != true || h["ssl_cert_id"] != 5.0) || !tcp && h["ssl_enabled"] != nil {
			t.Errorf("host %d = %v", i, h)
		}
	}
	// Without TLS the config is what it was.
	b, _ = aegisConfig(2019, "/l", testUp, testFront)
	if strings.Contains(string(b), "ssl_") || strings.Contains(string(b), "storage") {
		t.Errorf("plain config has TLS settings:\n%s", b)
	}
}

// tlsServer serves TLS on 127.0.0.1 with pair, handling each connection
// with handle.
func tlsServer(t *testing.T, pair tls.Certificate, handle func(net.Conn)) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestHandshakes(t *testing.T) {
	bc, err := newBenchCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair([]byte(bc.combinedPEM()), []byte(bc.combinedPEM()))
	if err != nil {
		t.Fatal(err)
	}
	// A Go server issues session tickets; the clients keep none.
	echoAddr := tlsServer(t, pair, serveEcho)
	w := window{warmup: 20 * time.Millisecond, dur: 200 * time.Millisecond}
	marks := 0
	for v, want := range map[uint16]string{
		tls.VersionTLS13: "TLS 1.3 ", tls.VersionTLS12: "TLS 1.2 TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 X25519",
	} {
		st := handshakes(echoAddr, bc.clientConfig(v), 2, w, func() { marks++ })
		if st.ok.n == 0 || st.failed != 0 || st.resumed != 0 {
			t.Errorf("%s: %d ok, %d failed (%v), %d resumed", want, st.ok.n, st.failed, st.lastErr, st.resumed)
		}
		if !strings.HasPrefix(st.state, want) || !strings.HasSuffix(st.state, " X25519") {
			t.Errorf("negotiated %q, want %q... X25519", st.state, want)
		}
	}
	if marks != 4 {
		t.Errorf("mark called %d times, want 4", marks)
	}

	// Another certificate for the same name: refused, and counted.
	other, err := newBenchCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	otherPair, _ := tls.X509KeyPair([]byte(other.combinedPEM()), []byte(other.combinedPEM()))
	st := handshakes(tlsServer(t, otherPair, serveEcho), bc.clientConfig(tls.VersionTLS13), 1, window{dur: 50 * time.Millisecond}, nil)
	if st.ok.n != 0 || st.failed == 0 || st.lastErr == nil || !strings.Contains(st.lastErr.Error(), "bench certificate") {
		t.Errorf("wrong certificate: %d ok, %d failed, %v", st.ok.n, st.failed, st.lastErr)
	}
	// The probe verifies the chain against the bench's CA: another CA's
	// leaf for the same name does not pass.
	if _, err := dialTLS(echoAddr, other.verifyingConfig(), time.Time{}); err == nil {
		t.Error("the probe accepted a chain from another CA")
	}
	c, err := dialTLS(echoAddr, bc.verifyingConfig(), time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// Bulk over TLS: the source's bytes come through.
	srcAddr := tlsServer(t, pair, serveSource)
	got, err := downloadWith(tlsDialer(srcAddr, bc.clientConfig(tls.VersionTLS13)), 2, window{dur: 100 * time.Millisecond}, nil)
	if err != nil || got.n == 0 {
		t.Errorf("download over TLS: %+v, %v", got, err)
	}
}

func TestTLSReport(t *testing.T) {
	res := []result{
		{name: "aegis", values: map[string]float64{"hs13": 900, "cpubench_hs13": 99, "cpu_hs13": 110}},
		{name: "haproxy", values: map[string]float64{"hs13": 1000, "cpubench_hs13": 98, "cpu_hs13": 100}, notes: []string{"a note"}},
		{name: "nginx", skipped: "nginx not found"},
	}
	out := tlsReport(res, []string{"negotiated by all: x"}, config{workers: 8})
	lines := strings.Split(out, "\n")
	if !strings.Contains(lines[1], "aegis") || !strings.Contains(lines[1], "haproxy") || strings.Contains(lines[1], "nginx") {
		t.Errorf("header: %q", lines[1])
	}
	for _, want := range []string{
		"900 (0.90)", "1000 (1.00)", "110 (1.10)", "haproxy: a note\n", "nginx: tls skipped (nginx not found)\n", "negotiated by all: x\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if bench := lines[slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "bench CPU %, TLS 1.3") })]; strings.Contains(bench, "(") {
		t.Errorf("CPU row has ratios: %q", bench)
	}
}

func TestNegotiated(t *testing.T) {
	mk := func(name string, s13, s12 string) *tlsRun {
		return &tlsRun{p: proxy{name: name}, states: map[uint16]string{tls.VersionTLS13: s13, tls.VersionTLS12: s12}}
	}
	got := negotiated([]*tlsRun{mk("aegis", "A", "B"), mk("haproxy", "A", "B")})
	if len(got) != 1 || got[0] != "negotiated by all: A; B" {
		t.Errorf("same: %q", got)
	}
	got = negotiated([]*tlsRun{mk("aegis", "A", "B"), mk("haproxy", "A", "")})
	if len(got) != 2 || got[1] != "haproxy: negotiated A" {
		t.Errorf("different: %q", got)
	}
}

func TestTroubleEntry(t *testing.T) {
	for line, want := range map[string]string{
		`{"level":"info","msg":"serving"}`:                                    "",
		`{"level":"error","logger":"streams","msg":"storage","error":"boom"}`: "error streams: storage: boom",
		`{"level":"warn","logger":"tls","msg":"odd"}`:                         "warn tls: odd",
		`not json`: "",
	} {
		if got := troubleEntry([]byte(line)); got != want {
			t.Errorf("%s: %q, want %q", line, got, want)
		}
	}
}

func TestParseCPUSoftirq(t *testing.T) {
	stat := "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 1 2 3 100 7 4 5 6 0 0\ncpu1 10 0 0 50 0 0 9 0 0 0\n"
	got, err := parseCPUSoftirq(stat)
	if err != nil || len(got) != 2 || got[0] != 5 || got[1] != 9 {
		t.Errorf("parseCPUSoftirq = %v, %v; want cpu0 5, cpu1 9", got, err)
	}
}

// flowEcho is a UDP echo for flowLoad's tests: its address, and a count of
// the queries it answered by source address, which reset empties.
func flowEcho(t *testing.T) (addr string, seen func() map[string]int, reset func()) {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	var mu sync.Mutex
	from := map[string]int{}
	go func() {
		buf := make([]byte, 64)
		for {
			n, a, err := pc.ReadFromUDP(buf)
			if err != nil {
				return
			}
			mu.Lock()
			from[a.IP.String()]++
			mu.Unlock()
			pc.WriteToUDP(buf[:n], a)
		}
	}()
	seen = func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		return maps.Clone(from)
	}
	reset = func() {
		mu.Lock()
		defer mu.Unlock()
		clear(from)
	}
	return pc.LocalAddr().String(), seen, reset
}

// TestFlowLoadSpreadsSources: with spread, the new-flow clients' queries
// come from that many source addresses in turn, and each is answered;
// without it, from the kernel's choice (127.0.0.1 here).
func TestFlowLoadSpreadsSources(t *testing.T) {
	echo, seen, clearSeen := flowEcho(t)
	w := window{warmup: 20 * time.Millisecond, dur: 100 * time.Millisecond}
	for _, c := range []struct {
		spread int
		want   []string
	}{
		{3, []string{"127.0.1.0", "127.0.1.1", "127.0.1.2"}},
		{0, []string{"127.0.0.1"}},
	} {
		clearSeen()
		res, err := flowLoad(echo, 2, c.spread, w, 0)
		n := res.n
		if err != nil || n < 10 {
			t.Fatalf("spread %d: %d flows, %v", c.spread, n, err)
		}
		got := seen()
		if len(got) != len(c.want) {
			t.Errorf("spread %d: sources %v, want %v", c.spread, got, c.want)
		}
		for _, a := range c.want {
			if got[a] < int(n)/len(c.want)/2 {
				t.Errorf("spread %d: %d queries from %s of %d in all: %v", c.spread, got[a], a, n, got)
			}
		}
	}
}

// A bounded round (the kept-session test with 8 clients) stops at its cap
// of flows, warm-up included, and counts only what came after the
// warm-up; a cap reached within the warm-up is an error, not a rate.
func TestFlowLoadStopsAtItsCap(t *testing.T) {
	echo, seen, clearSeen := flowEcho(t)
	const limit, clients = 20000, 4
	w := window{warmup: 10 * time.Millisecond, dur: time.Minute}
	res, err := flowLoad(echo, clients, 0, w, limit)
	if err != nil {
		t.Fatal(err)
	}
	queries := seen()["127.0.0.1"]
	// Each client finishes the flow it has begun when another reaches the cap.
	if queries < limit || queries > limit+clients-1 {
		t.Errorf("the echo answered %d queries, want %d to %d", queries, limit, limit+clients-1)
	}
	if res.n <= 0 || res.n > int64(queries) || res.secs <= 0 || res.secs >= w.dur.Seconds() {
		t.Errorf("counted %d flows in %.3fs of %d queries; want some, and a counted part that the cap ended before the %v window", res.n, res.secs, queries, w.dur)
	}

	clearSeen()
	_, err = flowLoad(echo, clients, 0, window{warmup: time.Minute, dur: time.Minute}, 20)
	if err == nil || !strings.Contains(err.Error(), "within the warm-up") {
		t.Errorf("cap of 20 in a minute's warm-up: err %v, want one that says the cap came within the warm-up", err)
	}
	if q := seen()["127.0.0.1"]; q > 20+clients-1 {
		t.Errorf("the echo answered %d queries after a cap of 20", q)
	}
}
