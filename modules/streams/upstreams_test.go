package streams_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// namedUpstream is a TCP server that sends its name to each client and
// then echoes.
func namedUpstream(t *testing.T, name string) *loopback.Server {
	return newUpstream(t, func(c net.Conn) {
		if _, err := c.Write([]byte(name)); err == nil {
			_, _ = io.Copy(c, c)
		}
	})
}

// whichUpstream connects through port from source (an IP, "" for any) and
// returns the name of the upstream that answered.
func whichUpstream(port int, source string) (string, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if source != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(source)}
	}
	c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return string(buf), nil
}

func upstreamList(servers ...map[string]any) []map[string]any { return servers }

func up(port int, extra ...any) map[string]any {
	u := map[string]any{"host": "127.0.0.1", "port": port}
	for i := 0; i+1 < len(extra); i += 2 {
		u[extra[i].(string)] = extra[i+1]
	}
	return u
}

// upstreamStatus returns the status of upstream port of stream id.
func upstreamStatus(t *testing.T, inst *testCaddy, id int64, port int) spec.UpstreamStatus {
	t.Helper()
	for _, u := range inst.stats()[id].Upstreams {
		if u.Port == port {
			return u
		}
	}
	t.Fatalf("stream %d: no status of upstream port %d: %+v", id, port, inst.stats()[id])
	return spec.UpstreamStatus{}
}

// TestUpstreamsRoundRobinWeights: three upstreams with weights 1, 2 and 3
// get, in every cycle of six connections, exactly their weight; the
// status counts each upstream's connections and bytes.
func TestUpstreamsRoundRobinWeights(t *testing.T) {
	checkNoLeaks(t)
	a, b, c := namedUpstream(t, "a"), namedUpstream(t, "b"), namedUpstream(t, "c")
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, 0, map[string]any{"upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(b.Port, "weight", 2), up(c.Port, "weight", 3))})))
	for cycle := range 5 {
		n := map[string]int{}
		for range 6 {
			name, err := whichUpstream(port, "")
			if err != nil {
				t.Fatal(err)
			}
			n[name]++
		}
		if n["a"] != 1 || n["b"] != 2 || n["c"] != 3 {
			t.Fatalf("cycle %d: connections per upstream %v, want a:1 b:2 c:3", cycle, n)
		}
	}
	st := inst.waitStats(1, "30 ended connections", func(s spec.Status) bool {
		return len(s.Upstreams) == 3 && s.Upstreams[2].TotalConnections == 15 && s.Upstreams[2].ActiveConnections == 0 && s.ActiveConnections == 0
	})
	for i, want := range []uint64{5, 10, 15} {
		u := st.Upstreams[i]
		if u.TotalConnections != want || !u.Healthy || u.BytesReceived != want || u.LastError != "" {
			t.Errorf("upstream %d: %+v, want %d connections and bytes received, healthy", i, u, want)
		}
	}
	// The metrics have a series per upstream.
	m := inst.scrape()
	for i, srv := range []*loopback.Server{a, b, c} {
		addr := fmt.Sprintf("127.0.0.1:%d", srv.Port)
		if v := m.value("aegis_stream_upstream_connections_total", "upstream", addr); v != float64(5*(i+1)) {
			t.Errorf("upstream %s: connections_total %v, want %d", addr, v, 5*(i+1))
		}
		if v := m.value("aegis_stream_upstream_up", "upstream", addr); v != 1 {
			t.Errorf("upstream %s: up %v, want 1", addr, v)
		}
		if v := m.value("aegis_stream_upstream_bytes_total", "upstream", addr, "direction", "upstream_to_client"); v != float64(5*(i+1)) {
			t.Errorf("upstream %s: bytes to clients %v, want %d", addr, v, 5*(i+1))
		}
	}
	m.checkLabels()
}

// TestUpstreamsFailover: an upstream killed while a client loop runs costs
// no client connection (the dial fails over to the next upstream), new
// connections skip it, the status shows it down with its error, and the
// connection log and the live list name each connection's upstream.
func TestUpstreamsFailover(t *testing.T) {
	checkNoLeaks(t)
	a, b, c := namedUpstream(t, "a"), namedUpstream(t, "b"), namedUpstream(t, "c")
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, 0, map[string]any{"upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(b.Port), up(c.Port)), "fail_timeout_seconds": 60})))

	var ok, failed atomic.Int64
	var afterKill sync.Map // names seen after b was killed
	var killed atomic.Bool
	stop := testenv.Repeat(2, func() {
		after := killed.Load() // b's own open connections end with it
		name, err := whichUpstream(port, "")
		if err != nil {
			if after {
				failed.Add(1)
			}
			return
		}
		ok.Add(1)
		if after {
			afterKill.Store(name, true)
		}
	})
	testenv.Eventually(t, "100 connections before the kill", func() bool { return ok.Load() >= 100 })
	if !b.Close(5 * time.Second) {
		t.Fatal("closing upstream b")
	}
	killed.Store(true)
	n := ok.Load()
	testenv.Eventually(t, "200 connections after the kill", func() bool { return ok.Load() >= n+200 })
	stop()
	if f := failed.Load(); f != 0 {
		t.Errorf("%d client connections started after the kill failed (of %d)", f, ok.Load()+f)
	}
	if _, ok := afterKill.Load("a"); !ok {
		t.Error("no connection went to a after b was killed")
	}
	us := upstreamStatus(t, inst, 1, b.Port)
	if us.Healthy || !strings.Contains(us.LastError, "dial tcp") || us.DialFailures == 0 {
		t.Errorf("b after its kill: %+v, want down with its failed dial", us)
	}
	// After its first failure, b is skipped: one failed dial (two at most:
	// the two client loops may both dial it before either marks it).
	if us.DialFailures > 2 {
		t.Errorf("b: %d dial failures, want at most 2 (skipped after the first)", us.DialFailures)
	}
	if st := inst.stats()[1]; st.Upstreams[0].Healthy != true || st.Upstreams[2].Healthy != true {
		t.Errorf("a and c: %+v, want healthy", st.Upstreams)
	}

	// The log and the live list name the upstream.
	entries := testenv.LogLines(t, inst.logFile, func(e struct {
		Msg      string `json:"msg"`
		Upstream string `json:"upstream"`
	}) bool {
		return e.Msg == "connection" && e.Upstream != ""
	})
	if len(entries) == 0 || !strings.HasPrefix(entries[0].Upstream, "127.0.0.1:") {
		t.Errorf("connection log entries with an upstream: %+v", entries)
	}
	held := dial(t, port)
	buf := make([]byte, 1)
	if _, err := io.ReadFull(held, buf); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("127.0.0.1:%d", map[string]int{"a": a.Port, "c": c.Port}[string(buf)])
	// The client loop's last connections may still be ending: the held
	// one is in the list, with its upstream, and every one names one.
	testenv.Eventually(t, "the held connection in the live list with its upstream", func() bool {
		conns, err := streams.Running().ActiveConnections(1)
		if err != nil {
			return false
		}
		found := false
		for _, c := range conns {
			if c.Upstream == "" {
				t.Errorf("live connection without an upstream: %+v", c)
				return true
			}
			found = found || c.Upstream == want && c.BytesReceived == 1 && c.Source == held.LocalAddr().String()
		}
		return found
	})
}

// TestUpstreamsBackup: a backup gets connections only while no other
// upstream is up.
func TestUpstreamsBackup(t *testing.T) {
	checkNoLeaks(t)
	a, b, bk := namedUpstream(t, "a"), namedUpstream(t, "b"), namedUpstream(t, "k")
	port := freePort(t)
	startCaddy(t, hosts(host(1, port, 0, map[string]any{"upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(bk.Port, "backup", true), up(b.Port))})))
	count := func(n int) map[string]int {
		t.Helper()
		got := map[string]int{}
		for range n {
			name, err := whichUpstream(port, "")
			if err != nil {
				t.Fatal(err)
			}
			got[name]++
		}
		return got
	}
	if got := count(20); got["k"] != 0 || got["a"] != 10 || got["b"] != 10 {
		t.Errorf("all up: %v, want a and b 10 each, no backup", got)
	}
	a.Close(5 * time.Second)
	if got := count(10); got["k"] != 0 || got["b"] != 10 {
		t.Errorf("a down: %v, want b only", got)
	}
	b.Close(5 * time.Second)
	if got := count(10); got["k"] != 10 {
		t.Errorf("a and b down: %v, want the backup only", got)
	}
}

// TestUpstreamsSourceHash: with source_hash a client IP keeps its upstream.
func TestUpstreamsSourceHash(t *testing.T) {
	checkNoLeaks(t)
	a, b, c := namedUpstream(t, "a"), namedUpstream(t, "b"), namedUpstream(t, "c")
	port := freePort(t)
	startCaddy(t, hosts(host(1, port, 0, map[string]any{"upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(b.Port), up(c.Port)), "load_balancing": "source_hash"})))
	for _, src := range []string{"127.0.0.2", "127.0.0.3"} {
		got := map[string]int{}
		for range 12 {
			name, err := whichUpstream(port, src)
			if err != nil {
				t.Fatal(err)
			}
			got[name]++
		}
		if len(got) != 1 {
			t.Errorf("client %s went to %v, want one upstream", src, got)
		}
	}
}

// TestUpstreamsUDPFailover: a UDP client whose upstream goes away (ICMP
// port unreachable) has its next datagram relayed to another upstream.
func TestUpstreamsUDPFailover(t *testing.T) {
	checkNoLeaks(t)
	named := func(name string) *loopback.UDPServer {
		return loopback.ServeUDP(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
			_, _ = pc.WriteToUDPAddrPort([]byte(name), from)
		})
	}
	a, b := named("a"), named("b")
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, 0, map[string]any{"protocol": "udp", "upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(b.Port)), "load_balancing": "first"})))
	c := udpDial(t, "", "127.0.0.1", port)
	if got := udpRoundTrip(t, c, "x", 2*time.Second); got != "a" {
		t.Fatalf("first reply %q, want a", got)
	}
	a.Close(5 * time.Second)
	// The next datagram goes to a's closed port: the ICMP unreachable ends
	// the entry and marks a failed, so the one after opens an entry on b.
	got := udpRoundTrip(t, c, "x", 500*time.Millisecond)
	if got == "" {
		got = udpRoundTrip(t, c, "x", 2*time.Second)
	}
	if got != "b" {
		t.Fatalf("after a went away: reply %q, want b", got)
	}
	if us := upstreamStatus(t, inst, 1, a.Port); us.Healthy || us.LastError == "" {
		t.Errorf("a: %+v, want down with an error", us)
	}
	if got := udpRoundTrip(t, udpDial(t, "", "127.0.0.1", port), "y", 2*time.Second); got != "b" {
		t.Errorf("a new client: reply %q, want b (a is skipped)", got)
	}
}

// TestUpstreamsHealthChecks: with health checks on, each upstream is
// checked and marked on its own, before any client dials it, and the
// stream is healthy while one of them is.
func TestUpstreamsHealthChecks(t *testing.T) {
	checkNoLeaks(t)
	a, b := namedUpstream(t, "a"), namedUpstream(t, "b")
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, 0, map[string]any{"upstream_host": nil, "upstream_port": nil,
		"upstreams": upstreamList(up(a.Port), up(b.Port)), "health_check_enabled": true, "health_check_interval_seconds": 1})))
	inst.waitStats(1, "a healthy check", func(s spec.Status) bool { return s.HealthStatus == "healthy" })
	b.Close(5 * time.Second)
	st := inst.waitStats(1, "b marked down by its check", func(s spec.Status) bool { return len(s.Upstreams) == 2 && !s.Upstreams[1].Healthy })
	if !st.Upstreams[0].Healthy || st.HealthStatus != "healthy" || !strings.Contains(st.LastHealthError, fmt.Sprint(b.Port)) {
		t.Errorf("status %+v, want a up, the stream healthy, b's error named", st)
	}
	if st.Upstreams[1].DialFailures != 0 {
		t.Errorf("b: %d dial failures; no client dialed it", st.Upstreams[1].DialFailures)
	}
	for range 6 {
		if name, err := whichUpstream(port, ""); err != nil || name != "a" {
			t.Fatalf("a connection went to %q, %v; want a", name, err)
		}
	}
}
