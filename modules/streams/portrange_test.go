package streams_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// portServers runs, on each of n ports from first, a TCP server that
// sends its port number and a UDP server that answers with it.
func portServers(t *testing.T, first, n int) {
	for p := first; p < first+n; p++ {
		addr := fmt.Sprintf("127.0.0.1:%d", p)
		name := strconv.Itoa(p)
		loopback.Serve(t, addr, func(c net.Conn) {
			if _, err := c.Write([]byte(name)); err == nil {
				_, _ = io.Copy(io.Discard, c) // until the client closes
			}
		})
		loopback.ServeUDP(t, addr, func(pc *net.UDPConn, _ []byte, from netip.AddrPort) {
			_, _ = pc.WriteToUDPAddrPort([]byte(name), from)
		})
	}
}

// readName connects to port and returns the upstream's port number it
// sends, five digits; the connection stays open until the test ends.
func readName(t *testing.T, port int) string {
	t.Helper()
	c := dial(t, port)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("port %d: %v", port, err)
	}
	c.Close()
	return string(b)
}

// TestPortRange: a 100-port tcp+udp range relays port listen_port + k to
// upstream port upstream_port + k, over TCP and UDP; the stats count the
// stream as a whole and the live list shows the port a connection came in
// on. With upstream_port_fixed every port goes to upstream_port.
func TestPortRange(t *testing.T) {
	checkNoLeaks(t)
	const n = 100
	upFirst := testenv.FreePortRange(t, n)
	portServers(t, upFirst, n)
	// Each range with a free port on either side.
	first, fixed := testenv.FreePortRange(t, n+2)+1, testenv.FreePortRange(t, n+2)+1
	inst := startCaddy(t, hosts(
		host(1, first, upFirst, map[string]any{"protocol": "tcp+udp", "listen_port_end": first + n - 1}),
		host(2, fixed, upFirst+7, map[string]any{"listen_port_end": fixed + n - 1, "upstream_port_fixed": true})))
	for k := range n {
		if got, want := readName(t, first+k), strconv.Itoa(upFirst+k); got != want {
			t.Fatalf("tcp port %d: upstream %s, want %s", first+k, got, want)
		}
		if got, want := udpRoundTrip(t, udpDial(t, "", "127.0.0.1", first+k), "x", 2*time.Second), strconv.Itoa(upFirst+k); got != want {
			t.Fatalf("udp port %d: upstream %q, want %s", first+k, got, want)
		}
		if got, want := readName(t, fixed+k), strconv.Itoa(upFirst+7); got != want {
			t.Fatalf("fixed: port %d: upstream %s, want %s", fixed+k, got, want)
		}
	}
	if !refusedAt(t, first+n) || !refusedAt(t, first-1) {
		t.Error("a port just outside the range listens")
	}
	// A client has its answer a moment before the relay counts the write
	// that sent it: wait for the count, which must then be exact.
	want := uint64(2 * n * len(strconv.Itoa(upFirst)))
	inst.waitStats(1, fmt.Sprintf("200 connections and %d bytes received", want), func(s spec.Status) bool {
		return s.TotalConnections == 2*n && s.Listening && s.BytesReceived == want
	})
	inst.waitStats(2, "100 connections", func(s spec.Status) bool { return s.TotalConnections == n })

	// The live list: the port each connection came in on.
	held := dial(t, first+42)
	if _, err := io.ReadFull(held, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	heldFixed := dial(t, fixed+9)
	if _, err := io.ReadFull(heldFixed, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	for _, h := range []struct {
		id   int64
		port int
	}{{1, first + 42}, {2, fixed + 9}} {
		testenv.Eventually(t, fmt.Sprintf("stream %d's held connection on port %d in the live list", h.id, h.port), func() bool {
			conns, err := streams.Running().ActiveConnections(h.id)
			if err != nil {
				return false
			}
			for _, c := range conns {
				if c.Protocol == "tcp" && c.ListenPort == h.port {
					return true
				}
			}
			return false
		})
	}
}

// TestPortRangeRefused: a range that overlaps another stream's port, or
// holds a port something else has bound, is refused naming the first
// clash, and nothing of it listens.
func TestPortRangeRefused(t *testing.T) {
	checkNoLeaks(t)
	first := testenv.FreePortRange(t, 20)
	up := newUpstream(t, echo)
	inst := startCaddy(t, hosts(host(1, first+5, up.Port, nil)))

	err := inst.load(hosts(host(1, first+5, up.Port, nil), host(2, first, up.Port, map[string]any{"listen_port_end": first + 19})))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("listen_port %d-%d/tcp overlaps stream 1 (\"test-1\") on 127.0.0.1:%d (%d), first at port %d", first, first+19, first+5, first+5, first+5)) {
		t.Errorf("an overlapping range: %v", err)
	}

	// Caddy's admin port (the config's) anywhere in the range.
	admin := inst.caddy.AdminPort
	err = inst.load(hosts(host(1, first+5, up.Port, nil), host(2, admin-3, up.Port, map[string]any{"listen_port_end": admin + 3})))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("listen_port %d-%d includes port %d, Caddy's admin endpoint", admin-3, admin+3, admin)) {
		t.Errorf("a range over the admin port: %v", err)
	}

	// Port first+12 held by another program: all or nothing.
	ln, lerr := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", first+12))
	if lerr != nil {
		t.Fatal(lerr)
	}
	defer ln.Close()
	err = inst.load(hosts(host(1, first+5, up.Port, nil), host(2, first+6, up.Port, map[string]any{"listen_port_end": first + 19})))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("listen_port %d (tcp)", first+12)) || !strings.Contains(err.Error(), "already in use") {
		t.Errorf("a range with a port in use: %v", err)
	}
	for _, p := range []int{first + 6, first + 11, first + 13, first + 19} {
		if !refusedAt(t, p) {
			t.Errorf("port %d listens after the refused range", p)
		}
	}
	// The first stream still runs.
	if got := roundTrip(t, dial(t, first+5), "ok"); got != "ok" {
		t.Errorf("stream 1 after the refused loads: %q", got)
	}
}
