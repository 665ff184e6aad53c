package streams_test

// Per-source limits (issue 17): max_connections_per_ip and
// connection_rate_per_ip, on TCP and UDP, with real sockets from several
// loopback source addresses.

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// blockedLines counts the connection log's blocked lines of stream id from
// src with reason.
func (inst *testCaddy) blockedLines(id int64, src, reason string) int {
	n := 0
	for _, e := range inst.connLogs() {
		if e.StreamID == id && e.Action == "blocked" && e.SourceIP == src && e.DisconnectReason == reason {
			n++
		}
	}
	return n
}

// 20 connections from one source against max_connections_per_ip 5: 5 in,
// 15 closed at once, counted and logged once; another source is counted
// apart, and a freed slot lets its source in again.
func TestMaxConnectionsPerIP(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"max_connections_per_ip": 5})))

	var in []net.Conn
	for i := range 5 {
		c := dialFrom(t, "127.0.0.2", port)
		if got := roundTrip(t, c, fmt.Sprint("in ", i)); got != fmt.Sprint("in ", i) {
			t.Fatalf("connection %d of 127.0.0.2: got %q", i, got)
		}
		in = append(in, c)
	}
	start := time.Now()
	for range 15 {
		expectClosed(t, dialFrom(t, "127.0.0.2", port), 5*time.Second)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("15 refused connections took %s to be closed, want at once", took)
	}
	// 127.0.0.3 has slots of its own.
	for i := range 5 {
		if got := roundTrip(t, dialFrom(t, "127.0.0.3", port), "other"); got != "other" {
			t.Fatalf("connection %d of 127.0.0.3 while 127.0.0.2 holds 5: got %q", i, got)
		}
	}
	inst.waitStats(1, "15 blocked", func(s spec.Status) bool { return s.BlockedConnections == 15 })
	inst.waitLog(1, "blocked max_connections_per_ip", func(e logEntry) bool {
		return e.Action == "blocked" && e.SourceIP == "127.0.0.2" && e.DisconnectReason == "max_connections_per_ip"
	})
	// A freed slot lets the source in again.
	in[0].Close()
	var got string
	if !testenv.Within(5*time.Second, func() bool {
		c := dialFrom(t, "127.0.0.2", port)
		got, _ = testenv.TryRoundTrip(c, "again")
		return got == "again"
	}) {
		t.Fatalf("after one of 127.0.0.2's connections ended: got %q", got)
	}
	for i, c := range in[1:] {
		if got := roundTrip(t, c, "still"); got != "still" {
			t.Fatalf("connection %d kept: got %q", i+1, got)
		}
	}
	if n := inst.blockedLines(1, "127.0.0.2", "max_connections_per_ip"); n != 1 {
		t.Errorf("%d blocked lines for 127.0.0.2's 15 refused connections, want 1 (one per source per minute)", n)
	}
	if n := inst.blockedLines(1, "127.0.0.3", "max_connections_per_ip"); n != 0 {
		t.Errorf("%d blocked lines for 127.0.0.3, want 0", n)
	}
}

// connection_rate_per_ip 10 in a 4 s window: the 11th connection of a
// source is refused (rate_limited) while another source goes on, and after
// the window the source gets its 10 again.
func TestConnectionRatePerIP(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	const window = 4 * time.Second
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{
		"connection_rate_per_ip": 10, "connection_rate_window_seconds": int(window / time.Second)})))

	burst := func(round string) time.Time {
		t.Helper()
		var first time.Time
		for i := range 10 {
			c := dialFrom(t, "127.0.0.4", port)
			if i == 0 {
				first = time.Now()
			}
			if got := roundTrip(t, c, "r"); got != "r" {
				t.Fatalf("%s: connection %d of 127.0.0.4: got %q", round, i+1, got)
			}
			c.Close()
		}
		// A token comes back every window/10: the 11th must come sooner.
		if took := time.Since(first); took > window/10 {
			t.Skipf("%s: 10 connections took %s, longer than a token's refill (%s): too slow a machine for this test", round, took, window/10)
		}
		expectClosed(t, dialFrom(t, "127.0.0.4", port), 5*time.Second)
		return first
	}
	first := burst("first window")
	if got := roundTrip(t, dialFrom(t, "127.0.0.5", port), "other"); got != "other" {
		t.Fatalf("127.0.0.5 while 127.0.0.4 is rate-limited: got %q", got)
	}
	inst.waitLog(1, "blocked rate_limited", func(e logEntry) bool {
		return e.Action == "blocked" && e.SourceIP == "127.0.0.4" && e.DisconnectReason == "rate_limited"
	})
	time.Sleep(time.Until(first.Add(window)))
	burst("after the window")
	inst.waitStats(1, "2 blocked", func(s spec.Status) bool { return s.BlockedConnections == 2 })
	if n := inst.blockedLines(1, "127.0.0.4", "rate_limited"); n != 1 {
		t.Errorf("%d blocked lines for 127.0.0.4, want 1 (one per source per minute)", n)
	}
}

// On UDP, max_connections_per_ip caps a source's NAT entries: a new client
// port of a source that holds its entries is dropped, another source's
// goes on.
func TestUDPMaxConnectionsPerIP(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"max_connections_per_ip": 3})))

	var held []*net.UDPConn
	for i := range 3 {
		c := udpDial(t, "127.0.0.6", "127.0.0.1", port)
		if got := udpRoundTrip(t, c, fmt.Sprint("entry ", i), 2*time.Second); got != fmt.Sprint("entry ", i) {
			t.Fatalf("client %d of 127.0.0.6: got %q", i, got)
		}
		held = append(held, c)
	}
	for i := range 2 {
		c := udpDial(t, "127.0.0.6", "127.0.0.1", port)
		if got := udpRoundTrip(t, c, "over", 300*time.Millisecond); got != "" {
			t.Fatalf("client %d over 127.0.0.6's 3 entries: got %q, want no answer", i+4, got)
		}
	}
	if got := udpRoundTrip(t, udpDial(t, "127.0.0.7", "127.0.0.1", port), "other", 2*time.Second); got != "other" {
		t.Fatalf("127.0.0.7 while 127.0.0.6 holds 3 entries: got %q", got)
	}
	// The entries held go on.
	for i, c := range held {
		if got := udpRoundTrip(t, c, "still", 2*time.Second); got != "still" {
			t.Fatalf("entry %d of 127.0.0.6 after the refusals: got %q", i, got)
		}
	}
	st := inst.waitStats(1, "2 blocked", func(s spec.Status) bool { return s.BlockedConnections == 2 })
	if st.ActiveConnections != 4 {
		t.Errorf("active entries %d, want 4 (3 of 127.0.0.6, 1 of 127.0.0.7)", st.ActiveConnections)
	}
	inst.waitLog(1, "blocked max_connections_per_ip", func(e logEntry) bool {
		return e.Action == "blocked" && e.SourceIP == "127.0.0.6" && e.DisconnectReason == "max_connections_per_ip"
	})
}
