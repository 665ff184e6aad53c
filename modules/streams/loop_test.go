package streams_test

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// localName is a host name that resolves to a loopback address but that
// validation does not know for local (it resolves no name): this
// machine's own name, as /etc/hosts usually has it.
func localName(t *testing.T) string {
	t.Helper()
	name, err := os.Hostname()
	if err != nil {
		t.Skip("no host name:", err)
	}
	ips, err := net.DefaultResolver.LookupNetIP(t.Context(), "ip", name)
	if err != nil || len(ips) == 0 || !ips[0].Unmap().IsLoopback() {
		t.Skipf("host name %q does not resolve to a loopback address first (%v, %v)", name, ips, err)
	}
	return name
}

// A stream whose upstream resolves to its own listener only at run time
// (validation cannot see it): every TCP connection is closed at once with
// disconnect_reason upstream_loop, each new UDP client is dropped and
// logged so, both are counted, the health check says so, and no
// descriptor is left behind: without the check, one connection opened
// connections to itself until the process had none left (issue 22).
func TestUpstreamLoopAtRunTime(t *testing.T) {
	checkNoLeaks(t)
	name := localName(t)
	tcpPort, udpPort := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		host(1, tcpPort, tcpPort, map[string]any{"upstream_host": name, "listen_address": "",
			"health_check_enabled": true, "health_check_interval_seconds": 1}),
		host(2, udpPort, udpPort, map[string]any{"upstream_host": name, "protocol": "udp"}),
	))
	base := measure(t)

	const n = 20
	for range n {
		c := dial(t, tcpPort)
		expectClosed(t, c, 5*time.Second)
		c.Close()
	}
	inst.waitLog(1, "disconnect_reason upstream_loop", func(e logEntry) bool { return e.DisconnectReason == "upstream_loop" })
	st := inst.waitStats(1, "no connection open", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	if st.TotalConnections != n {
		t.Errorf("tcp: %d connections counted, want %d: no connection of the stream's own may reach it", st.TotalConnections, n)
	}
	if got := streamstate.Lookup(1).UpstreamLoops.Load(); got != n {
		t.Errorf("tcp: %d upstream loops counted, want %d", got, n)
	}
	inst.waitStats(1, "the health check reports the loop", func(s spec.Status) bool {
		return s.HealthStatus == "unhealthy" && strings.Contains(s.LastHealthError, "upstream_loop")
	})

	u := udpDial(t, "127.0.0.1", "127.0.0.1", udpPort)
	for range n {
		if _, err := u.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
	}
	inst.waitLog(2, "a blocked client with upstream_loop", func(e logEntry) bool {
		return e.Action == "blocked" && e.DisconnectReason == "upstream_loop"
	})
	if !testenv.Within(5*time.Second, func() bool { return streamstate.Lookup(2).UpstreamLoops.Load() == n }) {
		t.Errorf("udp: %d upstream loops counted, want %d", streamstate.Lookup(2).UpstreamLoops.Load(), n)
	}
	if st := inst.stats()[2]; st.ActiveConnections != 0 || st.TotalConnections != 0 {
		t.Errorf("udp: a NAT entry was opened: %+v", st)
	}

	// Two streams that relay into each other through the name: A's dial
	// to B is refused, so no connection goes round.
	pa, pb := freePort(t), freePort(t)
	if err := inst.load(hosts(
		host(3, pa, pb, map[string]any{"upstream_host": name}),
		host(4, pb, pa, map[string]any{"upstream_host": name}),
	)); err != nil {
		t.Fatal(err)
	}
	c := dial(t, pa)
	expectClosed(t, c, 5*time.Second)
	c.Close()
	inst.waitLog(3, "A to B refused with upstream_loop", func(e logEntry) bool { return e.DisconnectReason == "upstream_loop" })
	if st := inst.waitStats(3, "no connection open", func(s spec.Status) bool { return s.ActiveConnections == 0 }); st.TotalConnections != 1 {
		t.Errorf("stream A: %d connections, want 1", st.TotalConnections)
	}
	if st := inst.stats()[4]; st.TotalConnections != 0 {
		t.Errorf("stream B: %d connections, want none", st.TotalConnections)
	}

	var after usage
	if !testenv.Within(5*time.Second, func() bool { after = measure(t); return after.fds <= base.fds+2 }) {
		t.Errorf("descriptors: %d before, %d after %d looping connections and datagrams", base.fds, after.fds, n)
	}
}

// A listener on every address answers on each of this machine's
// addresses: the run-time check takes them all for its own, and no other.
func TestUpstreamLoopIsOwnListener(t *testing.T) {
	p := freePort(t)
	startCaddy(t, hosts(host(1, p, freePort(t), map[string]any{"listen_address": ""})))
	for _, tc := range []struct {
		udp  bool
		addr string
		want bool
	}{
		{false, "127.0.0.1", true},
		{false, "127.0.0.2", true},
		{false, "::1", true},
		{false, "0.0.0.0", true},
		{true, "127.0.0.1", false},
		{false, "192.0.2.200", false}, // not this machine's
	} {
		ap := netip.AddrPortFrom(netip.MustParseAddr(tc.addr), uint16(p))
		if got := streamstate.IsOwnListener(tc.udp, ap); got != tc.want {
			t.Errorf("IsOwnListener(udp %v, %s) = %v, want %v", tc.udp, ap, got, tc.want)
		}
	}
}
