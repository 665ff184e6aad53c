//go:build linux

package streams_test

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// relayGoroutines counts this process's goroutines that run a relay.
func relayGoroutines() int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "l4aegisproxy.(*relay).") {
			n++
		}
	}
	return n
}

// parkingStream is a plain stream that stays on the chain's relay, and so
// parks its quiet connections: a two-port range (the event loop takes no
// range) to the upstream's one port. Clients dial the range's first port.
func parkingStream(t *testing.T, upstreamPort int, extra map[string]any) (port int, h map[string]any) {
	port = testenv.FreePortRange(t, 2)
	e := map[string]any{"listen_port_end": port + 1, "upstream_port_fixed": true}
	for k, v := range extra {
		e[k] = v
	}
	return port, host(1, port, upstreamPort, e)
}

// waitParked waits until no goroutine runs a relay: the stream's quiet
// connections are parked (about a second after their last byte).
func waitParked(t *testing.T, what string) {
	t.Helper()
	if !testenv.Within(5*time.Second, func() bool { return relayGoroutines() == 0 }) {
		t.Fatalf("%s, quiet for 5s: %d goroutines still run relays", what, relayGoroutines())
	}
}

// Quiet connections of a stream are parked: the process holds no relay
// goroutine for them. They are still listed as active, each resumes at
// its next byte and echoes byte-exact both ways, the counters are exact,
// the API closes one while parked (admin_closed), and removing the stream
// ends the rest (stream_removed) with no goroutine or descriptor left.
func TestParkedConnections(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const n = 100
	up := newUpstream(t, echo)
	port, h := parkingStream(t, up.Port, nil)
	inst := startCaddy(t, hosts(h))
	before := runtime.NumGoroutine()
	conns, want := openEchoed(t, port, n)
	if relayGoroutines() == 0 {
		t.Fatal("no relay goroutine right after the round trips: the connections are not on the chain's relay, which parks")
	}
	waitParked(t, fmt.Sprintf("%d connections", n))
	// The upstream's handlers (a goroutine per connection) are in this
	// process too; without parking the relays add two more per connection.
	if grew := runtime.NumGoroutine() - before; grew > n+n/10 {
		t.Fatalf("%d parked connections: %d more goroutines, want at most %d (the upstream's %d and a few)", n, grew, n+n/10, n)
	}
	if active, err := streams.Running().ActiveConnections(1); err != nil || len(active) != n {
		t.Fatalf("active connections while parked: %d, %v; want %d", len(active), err, n)
	}
	inst.waitStats(1, "the bytes counted while parked", func(s spec.Status) bool {
		return s.BytesSent == want && s.BytesReceived == want && s.ActiveConnections == n
	})

	// Each resumes at its next byte: a message of several steps each way.
	for i, c := range conns {
		msg := strings.Repeat(fmt.Sprintf("again %d;", i), 2000)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("connection %d after its park: %v, echoed bytes intact: %v", i, err, string(got) == msg)
		}
		want += uint64(len(msg))
	}
	waitParked(t, "the resumed connections")
	inst.waitStats(1, "the bytes counted after resuming", func(s spec.Status) bool {
		return s.BytesSent == want && s.BytesReceived == want && s.ActiveConnections == n && s.TotalConnections == n
	})

	// The API closes a parked connection at once.
	active, _ := streams.Running().ActiveConnections(1)
	if err := streams.Running().CloseConnection(1, active[0].ID); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, conns[0], time.Second)
	inst.waitLog(1, "admin_closed", func(e logEntry) bool { return e.DisconnectReason == "admin_closed" })
	inst.waitStats(1, "one connection fewer", func(s spec.Status) bool { return s.ActiveConnections == n-1 })

	// Removing the stream ends the parked ones after the grace period.
	if err := inst.load(hosts()); err != nil {
		t.Fatal(err)
	}
	for _, c := range conns[1:] {
		expectClosed(t, c, 3*time.Second)
	}
	inst.waitLog(1, "stream_removed", func(e logEntry) bool { return e.DisconnectReason == "stream_removed" })
}

// A parked connection's idle timeout ends it when it would have without
// the park, with reason idle_timeout in the log.
func TestParkedIdleTimeout(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up := newUpstream(t, echo)
	port, h := parkingStream(t, up.Port, map[string]any{"idle_timeout_seconds": 2})
	inst := startCaddy(t, hosts(h))
	c := dial(t, port)
	roundTrip(t, c, "x")
	last := time.Now()
	waitParked(t, "the connection")
	if parkedAt := time.Since(last); parkedAt > 1500*time.Millisecond || inst.stats()[1].ActiveConnections != 1 {
		t.Fatalf("the connection was not parked while open (%s after its last byte)", parkedAt)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("parked idle connection: read %d, %v; want EOF", n, err)
	}
	if took := time.Since(last); took < 1900*time.Millisecond || took > 2500*time.Millisecond {
		t.Fatalf("parked connection closed %s after its last byte, want about 2s", took)
	}
	inst.waitLog(1, "idle_timeout", func(e logEntry) bool {
		return e.DisconnectReason == "idle_timeout" && e.BytesSent == 1 && e.BytesReceived == 1
	})
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
}
