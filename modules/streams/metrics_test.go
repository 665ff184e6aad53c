package streams_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// scraped is one scrape of the admin endpoint's /metrics, parsed.
type scraped struct {
	t    *testing.T
	fams map[string]*dto.MetricFamily
	text string
}

// scrape GETs /metrics from Caddy's admin endpoint, as Prometheus would.
func (inst *testCaddy) scrape() scraped {
	inst.t.Helper()
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + inst.admin + "/metrics")
	if err != nil {
		inst.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		inst.t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		inst.t.Fatalf("GET /metrics: %s: %s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		inst.t.Fatalf("parsing /metrics: %v", err)
	}
	return scraped{t: inst.t, fams: fams, text: string(body)}
}

// series returns the series of metric name whose labels include the given
// name/value pairs.
func (s scraped) series(name string, kv ...string) []*dto.Metric {
	var out []*dto.Metric
	f := s.fams[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(kv); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == kv[i] && l.GetValue() == kv[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		out = append(out, m)
	}
	return out
}

// one returns the one series of name with the given labels; it fails the
// test if there is none or more than one.
func (s scraped) one(name string, kv ...string) *dto.Metric {
	s.t.Helper()
	ms := s.series(name, kv...)
	if len(ms) != 1 {
		s.t.Fatalf("%s%v: %d series, want 1; aegis metrics:\n%s", name, kv, len(ms), s.aegis())
	}
	return ms[0]
}

// value is the counter or gauge value of the one series of name with the
// given labels.
func (s scraped) value(name string, kv ...string) float64 {
	s.t.Helper()
	m := s.one(name, kv...)
	if c := m.GetCounter(); c != nil {
		return c.GetValue()
	}
	return m.GetGauge().GetValue()
}

// count is the number of observations of the one histogram series.
func (s scraped) count(name string, kv ...string) uint64 {
	s.t.Helper()
	return s.one(name, kv...).GetHistogram().GetSampleCount()
}

// aegis returns the aegis_ lines of the scrape, for failure messages.
func (s scraped) aegis() string {
	var out []string
	for _, l := range strings.Split(s.text, "\n") {
		if strings.HasPrefix(l, "aegis_") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// ofStream returns the names of the metric families that have a series of
// stream id.
func (s scraped) ofStream(id int64) []string {
	var out []string
	for name := range s.fams {
		if strings.HasPrefix(name, "aegis_") && len(s.series(name, "id", strconv.FormatInt(id, 10))) > 0 {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// waitScrape scrapes until cond holds, for at most 10 seconds.
func (inst *testCaddy) waitScrape(what string, cond func(s scraped) bool) scraped {
	inst.t.Helper()
	var s scraped
	if !testenv.Within(10*time.Second, func() bool { s = inst.scrape(); return cond(s) }) {
		inst.t.Fatalf("waited 10s for %s; aegis metrics:\n%s", what, s.aegis())
	}
	return s
}

// checkLabels fails the test if a series of the aegis metrics has a label
// outside the fixed set or a value with a loopback address in it: no
// client's address. An upstream's series name it (upstream), from the
// stream's settings.
func (s scraped) checkLabels() {
	s.t.Helper()
	allowed := map[string]bool{"stream": true, "id": true, "protocol": true, "reason": true,
		"direction": true, "transport": true, "outcome": true, "upstream": true, "listen": true}
	for name, f := range s.fams {
		if !strings.HasPrefix(name, "aegis_") {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if !allowed[l.GetName()] {
					s.t.Errorf("%s: label %q is not one of the fixed set", name, l.GetName())
				}
				if v := l.GetValue(); l.GetName() != "upstream" && l.GetName() != "listen" && strings.Contains(v, "127.0.0.1") || strings.Contains(v, "::1") {
					s.t.Errorf("%s: label %s=%q carries an address", name, l.GetName(), v)
				}
			}
		}
	}
}

// closedPort returns a loopback port that refuses connections.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

// TestMetricsTCP moves every TCP metric by a known amount, on the
// registry that Caddy's admin endpoint serves at /metrics.
func TestMetricsTCP(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	health := newUpstream(t, echo)
	p1, p2, p3, p4, p5 := freePort(t), freePort(t), freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		host(1, p1, up.Port, nil),
		host(2, p2, up.Port, map[string]any{"whitelist_cidrs": []string{"10.0.0.0/8"}}),
		host(3, p3, up.Port, map[string]any{"max_connections": 1}),
		host(4, p4, closedPort(t), nil),
		host(5, p5, health.Port, map[string]any{"health_check_enabled": true, "health_check_interval_seconds": 1}),
	))

	// Stream 1: three connections of one round trip each.
	for i := range 3 {
		c := dial(t, p1)
		msg := fmt.Sprintf("hello %d", i) // 7 bytes
		if got := roundTrip(t, c, msg); got != msg {
			t.Fatalf("round trip: %q", got)
		}
		c.Close()
	}
	// Stream 2: refused by the whitelist.
	expectClosed(t, dial(t, p2), 5*time.Second)
	// Stream 3: one open, the next beyond max_connections.
	held := dial(t, p3)
	roundTrip(t, held, "held")
	expectClosed(t, dial(t, p3), 5*time.Second)
	// Stream 4: the upstream refuses the dial.
	expectClosed(t, dial(t, p4), 5*time.Second)

	s := inst.waitScrape("the connections to end", func(s scraped) bool {
		return len(s.series("aegis_stream_connection_duration_seconds", "id", "1")) == 1 &&
			s.count("aegis_stream_connection_duration_seconds", "id", "1") == 3 &&
			s.count("aegis_stream_connection_duration_seconds", "id", "4") == 1 &&
			len(s.series("aegis_stream_healthy", "id", "5")) == 1
	})
	// Caddy's own metrics are in the same scrape: this is the config's
	// registry.
	if len(s.series("caddy_config_last_reload_successful")) != 1 {
		t.Fatal("caddy_config_last_reload_successful missing: /metrics is not the config's registry")
	}
	s.checkLabels()

	id1 := []string{"id", "1", "stream", "test-1", "protocol", "tcp"}
	for _, c := range []struct {
		name string
		kv   []string
		want float64
	}{
		{"aegis_stream_connections_total", id1, 3},
		{"aegis_stream_connections_blocked_total", append(id1, "reason", "acl_denied"), 0},
		{"aegis_stream_connections_blocked_total", append(id1, "reason", "max_connections"), 0},
		{"aegis_stream_active_connections", id1, 0},
		{"aegis_stream_bytes_total", append(id1, "direction", "client_to_upstream"), 21},
		{"aegis_stream_bytes_total", append(id1, "direction", "upstream_to_client"), 21},
		{"aegis_stream_dial_failures_total", id1, 0},
		{"aegis_stream_listening", id1, 1},
		{"aegis_stream_log_entries_dropped_total", id1, 0},

		{"aegis_stream_connections_total", []string{"id", "2"}, 1},
		{"aegis_stream_connections_blocked_total", []string{"id", "2", "reason", "acl_denied"}, 1},
		{"aegis_stream_connections_blocked_total", []string{"id", "2", "reason", "max_connections"}, 0},
		{"aegis_stream_active_connections", []string{"id", "2"}, 0},

		{"aegis_stream_connections_total", []string{"id", "3"}, 2},
		{"aegis_stream_connections_blocked_total", []string{"id", "3", "reason", "max_connections"}, 1},
		{"aegis_stream_connections_blocked_total", []string{"id", "3", "reason", "acl_denied"}, 0},
		{"aegis_stream_active_connections", []string{"id", "3"}, 1},

		{"aegis_stream_connections_total", []string{"id", "4"}, 1},
		{"aegis_stream_dial_failures_total", []string{"id", "4"}, 1},
		{"aegis_stream_active_connections", []string{"id", "4"}, 0},

		{"aegis_stream_healthy", []string{"id", "5"}, 1},
	} {
		if got := s.value(c.name, c.kv...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.kv, got, c.want)
		}
	}
	for _, c := range []struct {
		name string
		kv   []string
		want uint64
	}{
		{"aegis_stream_connection_duration_seconds", append(id1, "transport", "tcp"), 3},
		{"aegis_stream_dial_duration_seconds", id1, 3},
		{"aegis_stream_connection_duration_seconds", []string{"id", "2"}, 0},
		{"aegis_stream_dial_duration_seconds", []string{"id", "2"}, 0},
		{"aegis_stream_dial_duration_seconds", []string{"id", "3"}, 1},
		{"aegis_stream_dial_duration_seconds", []string{"id", "4"}, 0},
	} {
		if got := s.count(c.name, c.kv...); got != c.want {
			t.Errorf("%s%v: %d observations, want %d", c.name, c.kv, got, c.want)
		}
	}
	h := s.one("aegis_stream_dial_duration_seconds", "id", "1").GetHistogram()
	if h.GetSampleSum() <= 0 || h.GetSampleSum() > 3 {
		t.Errorf("dial durations of stream 1 sum to %vs, want a little over 0", h.GetSampleSum())
	}
	// Without health checks, no health series; a TCP stream has no UDP
	// series.
	if n := len(s.series("aegis_stream_healthy", "id", "1")); n != 0 {
		t.Errorf("stream 1 has no health checks, but %d aegis_stream_healthy series", n)
	}
	for _, name := range []string{"aegis_stream_udp_nat_entries", "aegis_stream_udp_datagrams_dropped_total", "aegis_stream_tls_handshakes_total"} {
		if n := len(s.series(name, "id", "1")); n != 0 {
			t.Errorf("TCP stream 1 without TLS has %d %s series", n, name)
		}
	}

	// The health gauge follows the upstream.
	health.Close(5 * time.Second)
	inst.waitScrape("stream 5 unhealthy", func(s scraped) bool {
		return s.value("aegis_stream_healthy", "id", "5") == 0
	})
	held.Close()
	inst.waitScrape("stream 3's connection to end", func(s scraped) bool {
		return s.value("aegis_stream_active_connections", "id", "3") == 0
	})
}

// TestMetricsUDP counts NAT entries, a client refused at max_connections
// and a datagram dropped over the upload rate.
func TestMetricsUDP(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	p1, p2 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		udpHost(1, p1, up.Port, map[string]any{"max_connections": 1, "idle_timeout_seconds": 2}),
		// The bucket holds one second's worth (1000 B) and starts full: of
		// two 60000-byte datagrams back to back, the first passes and the
		// second is over it.
		udpHost(2, p2, up.Port, map[string]any{"upload_rate_bytes": 1000}),
	))

	a := udpDial(t, "127.0.0.1:0", "127.0.0.1", p1)
	for _, msg := range []string{"one", "two"} {
		if got := udpRoundTrip(t, a, msg, 5*time.Second); got != msg {
			t.Fatalf("UDP round trip: %q", got)
		}
	}
	s := inst.scrape()
	if got := s.value("aegis_stream_udp_nat_entries", "id", "1"); got != 1 {
		t.Fatalf("NAT entries of stream 1 = %v, want 1", got)
	}
	// Fresh activity, so the entry is well inside its idle timeout when
	// the second client comes.
	if got := udpRoundTrip(t, a, "three", 5*time.Second); got != "three" {
		t.Fatalf("UDP round trip: %q", got)
	}
	b := udpDial(t, "127.0.0.1:0", "127.0.0.1", p1)
	if _, err := b.Write([]byte("refused")); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 60000)
	c := udpDial(t, "127.0.0.1:0", "127.0.0.1", p2)
	for range 2 {
		if _, err := c.Write(big); err != nil {
			t.Fatal(err)
		}
	}

	s = inst.waitScrape("the refused client and the dropped datagram", func(s scraped) bool {
		return len(s.series("aegis_stream_connections_blocked_total", "id", "1", "reason", "max_connections")) == 1 &&
			s.value("aegis_stream_connections_blocked_total", "id", "1", "reason", "max_connections") == 1 &&
			s.value("aegis_stream_udp_datagrams_dropped_total", "id", "2", "reason", "rate_limit") == 1 &&
			s.value("aegis_stream_bytes_total", "id", "2", "direction", "upstream_to_client") == 60000
	})
	s.checkLabels()
	id1 := []string{"id", "1", "stream", "test-1", "protocol", "udp"}
	for _, c := range []struct {
		name string
		kv   []string
		want float64
	}{
		{"aegis_stream_udp_nat_entries", id1, 1},
		{"aegis_stream_active_connections", id1, 1},
		{"aegis_stream_connections_total", id1, 1},
		{"aegis_stream_bytes_total", append(id1, "direction", "client_to_upstream"), 11},
		{"aegis_stream_bytes_total", append(id1, "direction", "upstream_to_client"), 11},
		{"aegis_stream_connections_blocked_total", append(id1, "reason", "nat_table_full"), 0},
		{"aegis_stream_udp_datagrams_dropped_total", append(id1, "reason", "rate_limit"), 0},

		{"aegis_stream_udp_nat_entries", []string{"id", "2"}, 1},
		{"aegis_stream_bytes_total", []string{"id", "2", "direction", "client_to_upstream"}, 60000},
		{"aegis_stream_udp_datagrams_dropped_total", []string{"id", "2", "reason", "buffer_full"}, 0},
		{"aegis_stream_udp_datagrams_dropped_total", []string{"id", "2", "reason", "upstream_refused"}, 0},
	} {
		if got := s.value(c.name, c.kv...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.kv, got, c.want)
		}
	}
	if n := len(s.series("aegis_stream_udp_datagrams_dropped_total", "id", "2")); n != 7 {
		t.Errorf("stream 2 has %d dropped-datagram series, want one per reason (7)", n)
	}
	// TCP-only series are absent on a UDP stream.
	for _, name := range []string{"aegis_stream_dial_failures_total", "aegis_stream_dial_duration_seconds", "aegis_stream_healthy"} {
		if n := len(s.series(name, "id", "1")); n != 0 {
			t.Errorf("UDP stream 1 has %d %s series", n, name)
		}
	}

	// The entry ends after its idle timeout: its duration is observed.
	s = inst.waitScrape("stream 1's entry to end", func(s scraped) bool {
		return s.value("aegis_stream_udp_nat_entries", "id", "1") == 0 &&
			s.count("aegis_stream_connection_duration_seconds", "id", "1", "transport", "udp") == 1
	})
	if sum := s.one("aegis_stream_connection_duration_seconds", "id", "1").GetHistogram().GetSampleSum(); sum < 2 || sum > 8 {
		t.Errorf("the entry lasted %vs by the histogram, want its idle timeout (2s) and a little", sum)
	}
}

// TestMetricsTLSAndLiveStreams counts handshakes by outcome on a stream
// created through the API, whose series go when it is deleted.
func TestMetricsTLSAndLiveStreams(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	ctx := context.Background()
	ca := newTestCA(t)
	chain, key := ca.leaf(t, "db.test", 100)
	cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "db", Certificate: chain, PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	s := apiStream(7, port, up.Port)
	s.SSLEnabled, s.SSLCertID = true, cert.ID
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}

	c, _ := tlsDial(t, ca, port, "db.test")
	if got := roundTrip(t, c, "inside"); got != "inside" {
		t.Fatalf("through TLS: %q", got)
	}
	c.Close()
	plain := dial(t, port)
	if _, err := plain.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, plain, 5*time.Second)

	m := inst.waitScrape("both handshakes", func(s scraped) bool {
		return len(s.series("aegis_stream_tls_handshakes_total", "id", "7", "outcome", "failed")) == 1 &&
			s.value("aegis_stream_tls_handshakes_total", "id", "7", "outcome", "failed") == 1 &&
			s.value("aegis_stream_tls_handshakes_total", "id", "7", "outcome", "ok") == 1
	})
	m.checkLabels()
	id7 := []string{"id", "7", "stream", "api-7", "protocol", "tcp"}
	for outcome, want := range map[string]float64{"ok": 1, "failed": 1, "timeout": 0, "max_handshakes": 0} {
		if got := m.value("aegis_stream_tls_handshakes_total", append(id7, "outcome", outcome)...); got != want {
			t.Errorf("handshakes %s = %v, want %v", outcome, got, want)
		}
	}
	if got := m.value("aegis_stream_connections_total", id7...); got != 2 {
		t.Errorf("connections of stream 7 = %v, want 2", got)
	}
	if n := len(m.series("aegis_stream_tls_handshakes_total", "id", "1")); n != 0 {
		t.Errorf("stream 1 has no TLS, but %d handshake series", n)
	}

	// An update in place keeps the series and their values, under the new
	// name.
	s.Name = "renamed"
	if _, err := streams.UpdateHost(ctx, 7, s); err != nil {
		t.Fatal(err)
	}
	m = inst.scrape()
	if got := m.value("aegis_stream_tls_handshakes_total", "id", "7", "stream", "renamed", "outcome", "ok"); got != 1 {
		t.Errorf("after the rename: handshakes ok = %v, want 1", got)
	}
	if n := len(m.series("aegis_stream_connections_total", "stream", "api-7")); n != 0 {
		t.Errorf("after the rename: %d series still carry the old name", n)
	}

	if err := streams.DeleteHost(ctx, 7); err != nil {
		t.Fatal(err)
	}
	m = inst.scrape()
	if names := m.ofStream(7); len(names) != 0 {
		t.Fatalf("deleted stream 7 still has series of %v", names)
	}
	if len(m.ofStream(1)) == 0 {
		t.Fatal("stream 1 lost its series when stream 7 was deleted")
	}
}

// TestMetricsAcrossReloads: a reload keeps one series per stream whose
// counters go on from where they were (the API's since-reload totals
// start again); a stream the reload removes loses its series; a config
// that fails to load leaves the metrics of the running one.
func TestMetricsAcrossReloads(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	p1, p2 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, p1, up.Port, nil)))

	open := dial(t, p1)
	roundTrip(t, open, "12345")
	c := dial(t, p1)
	roundTrip(t, c, "12345")
	c.Close()
	inst.waitScrape("2 connections", func(s scraped) bool {
		return s.count("aegis_stream_connection_duration_seconds", "id", "1") == 1
	})

	if err := inst.load(hosts(host(1, p1, up.Port, nil), host(2, p2, up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	if st := inst.stats()[1]; st.TotalConnections != 0 {
		t.Fatalf("the API's total_connections after a reload = %d, want 0 (since the reload)", st.TotalConnections)
	}
	s := inst.scrape()
	s.checkLabels()
	for _, c := range []struct {
		name string
		kv   []string
		want float64
	}{
		{"aegis_stream_connections_total", []string{"id", "1"}, 2},
		{"aegis_stream_active_connections", []string{"id", "1"}, 1},
		{"aegis_stream_bytes_total", []string{"id", "1", "direction", "client_to_upstream"}, 10},
		{"aegis_stream_connections_total", []string{"id", "2"}, 0},
		{"aegis_stream_listening", []string{"id", "2"}, 1},
	} {
		if got := s.value(c.name, c.kv...); got != c.want {
			t.Errorf("after the reload: %s%v = %v, want %v", c.name, c.kv, got, c.want)
		}
	}
	if got := s.count("aegis_stream_dial_duration_seconds", "id", "1"); got != 2 {
		t.Errorf("after the reload: dial durations of stream 1: %d observations, want 2", got)
	}

	roundTrip(t, open, "678")
	c = dial(t, p1)
	roundTrip(t, c, "x")
	c.Close()
	s = inst.waitScrape("the third connection", func(s scraped) bool {
		return s.count("aegis_stream_connection_duration_seconds", "id", "1") == 2
	})
	if got := s.value("aegis_stream_connections_total", "id", "1"); got != 3 {
		t.Errorf("connections after the reload = %v, want 3", got)
	}
	if got := s.value("aegis_stream_bytes_total", "id", "1", "direction", "client_to_upstream"); got != 14 {
		t.Errorf("bytes after the reload = %v, want 14", got)
	}

	// A config that fails (a bad CIDR in Provision, a port in use at
	// Start) leaves Caddy's /metrics with the failed config's registry:
	// the running streams still show.
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	for name, bad := range map[string]map[string]any{
		"bad CIDR":    hosts(host(1, p1, up.Port, map[string]any{"whitelist_cidrs": []string{"10.0.0.300/8"}})),
		"port in use": hosts(host(1, p1, up.Port, nil), host(3, held.Addr().(*net.TCPAddr).Port, up.Port, nil)),
	} {
		if err := inst.load(bad); err == nil {
			t.Fatalf("%s: the config loaded", name)
		}
		s = inst.scrape()
		if got := s.value("aegis_stream_connections_total", "id", "1"); got != 3 {
			t.Errorf("%s: connections of the running stream 1 = %v, want 3", name, got)
		}
		if len(s.ofStream(2)) == 0 || len(s.ofStream(3)) != 0 {
			t.Errorf("%s: want the running streams 1 and 2 only; aegis metrics:\n%s", name, s.aegis())
		}
	}

	// A reload that removes stream 2 removes its series.
	if err := inst.load(hosts(host(1, p1, up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	s = inst.scrape()
	if names := s.ofStream(2); len(names) != 0 {
		t.Fatalf("removed stream 2 still has series of %v", names)
	}
	if got := s.value("aegis_stream_connections_total", "id", "1"); got != 3 {
		t.Errorf("after the second reload: connections of stream 1 = %v, want 3", got)
	}
	open.Close()
}
