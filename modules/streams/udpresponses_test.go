package streams_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// TestUDPResponsesClosesEntries: with udp_responses 1, 10,000 query-answer
// flows, each from a new client socket, leave no NAT entry and no upstream
// socket behind; each entry ends as soon as its answer is relayed.
func TestUDPResponsesClosesEntries(t *testing.T) {
	before := udpSockets(t)
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"udp_responses": 1, "log_connections": false})))
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	buf := make([]byte, 64)
	const flows = 10_000
	for i := range flows {
		c, err := net.DialUDP("udp", nil, to)
		if err != nil {
			t.Fatal(err)
		}
		msg := fmt.Sprint(i)
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		n, err := c.Read(buf)
		c.Close()
		if err != nil || string(buf[:n]) != msg {
			t.Fatalf("flow %d: got %q, %v", i, buf[:n], err)
		}
	}
	st := inst.waitStats(1, "no entry left", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	// A new socket may get the port of one just closed and reach the old
	// entry before it has closed: it then carries on with it.
	if st.TotalConnections < flows/2 || st.TotalConnections > flows {
		t.Errorf("total_connections %d, want about %d", st.TotalConnections, flows)
	}
	// The listener and the upstream server: no entry's socket is left.
	if n := udpSockets(t) - before; n != 2 {
		t.Errorf("%d UDP sockets open after %d closed flows, want 2 (the listener and the upstream)", n, flows)
	}
}

// TestUDPResponsesClientComesBack: the entry closes after its answer
// (responses_done in the log); the same client's next datagram opens a new
// entry and gets its answer. With udp_responses 2 the entry waits for two
// answers.
func TestUDPResponsesClientComesBack(t *testing.T) {
	checkNoLeaks(t)
	echo := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	twice := newUDPUpstream(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		_, _ = pc.WriteToUDPAddrPort(append([]byte("1:"), p...), from)
		_, _ = pc.WriteToUDPAddrPort(append([]byte("2:"), p...), from)
	})
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		udpHost(1, p1, echo.Port, map[string]any{"udp_responses": 1}),
		udpHost(2, p2, twice.Port, map[string]any{"udp_responses": 2}),
		udpHost(3, p3, echo.Port, map[string]any{"udp_responses": 2}),
	))

	c := udpDial(t, "", "127.0.0.1", p1)
	if got := udpRoundTrip(t, c, "first", 2*time.Second); got != "first" {
		t.Fatalf("first query: got %q", got)
	}
	inst.waitStats(1, "the entry closed", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	e := inst.waitLog(1, "responses_done", func(e logEntry) bool { return e.DisconnectReason == "responses_done" })
	if e.BytesSent != 5 || e.BytesReceived != 5 {
		t.Errorf("log entry: %+v", e)
	}
	if got := udpRoundTrip(t, c, "second", 2*time.Second); got != "second" {
		t.Fatalf("second query from the same client: got %q", got)
	}
	inst.waitStats(1, "two entries, both closed", func(s spec.Status) bool { return s.TotalConnections == 2 && s.ActiveConnections == 0 })

	// Two answers expected and sent: both arrive, then the entry closes.
	c2 := udpDial(t, "", "127.0.0.1", p2)
	if got := udpRoundTrip(t, c2, "q", 2*time.Second); got != "1:q" {
		t.Fatalf("first answer: got %q", got)
	}
	if got := udpRead(t, c2, 2*time.Second); got != "2:q" {
		t.Fatalf("second answer: got %q", got)
	}
	inst.waitStats(2, "the entry closed after two answers", func(s spec.Status) bool { return s.ActiveConnections == 0 && s.TotalConnections == 1 })

	// Two answers expected, one sent: the entry stays.
	c3 := udpDial(t, "", "127.0.0.1", p3)
	if got := udpRoundTrip(t, c3, "q", 2*time.Second); got != "q" {
		t.Fatalf("answer: got %q", got)
	}
	time.Sleep(200 * time.Millisecond)
	if st := inst.stats()[3]; st.ActiveConnections != 1 {
		t.Fatalf("one answer of two: %+v, want the entry open", st)
	}
}
