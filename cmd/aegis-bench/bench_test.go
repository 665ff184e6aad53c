package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
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
	cfg, err := nginxConfig("/tmp/n", "/mod.so", testUp, testFront)
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
	metrics := []metric{{"up1", "upload", "%.0f"}, {"mem", "memory", "%.1f"}}
	out := table([]result{
		{name: "direct", values: map[string]float64{"up1": 2000}},
		{name: "aegis", skipped: "not built"},
		{name: "haproxy", values: map[string]float64{"up1": 1000, "mem": 2}},
		{name: "nginx", values: map[string]float64{"up1": 500, "mem": 3}},
	}, metrics)
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
