package streams_test

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// newUDPUpstream runs handle for each datagram that reaches a UDP server
// on addr (e.g. "127.0.0.1:0"), closed with the test; handle may reply
// with pc.
func newUDPUpstream(t *testing.T, addr string, handle func(pc *net.UDPConn, p []byte, from netip.AddrPort)) *loopback.UDPServer {
	t.Helper()
	return loopback.ServeUDP(t, addr, handle)
}

// udpEcho sends every datagram back.
func udpEcho(pc *net.UDPConn, p []byte, from netip.AddrPort) { _, _ = pc.WriteToUDPAddrPort(p, from) }

// udpWho answers "<source address>|<payload>", so a test can see which
// upstream socket (NAT entry) a datagram came through.
func udpWho(pc *net.UDPConn, p []byte, from netip.AddrPort) {
	_, _ = pc.WriteToUDPAddrPort(append([]byte(from.String()+"|"), p...), from)
}

// udpHost is a UDP stream host config.
func udpHost(id int64, listenPort, upstreamPort int, extra map[string]any) map[string]any {
	h := host(id, listenPort, upstreamPort, extra)
	if _, ok := extra["protocol"]; !ok {
		h["protocol"] = "udp"
	}
	return h
}

func TestUDPEchoStatsAndIdleLog(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"idle_timeout_seconds": 1})))

	c := udpDial(t, "", "127.0.0.1", port)
	for i := range 3 {
		msg := fmt.Sprintf("datagram %d", i)
		if got := udpRoundTrip(t, c, msg, 2*time.Second); got != msg {
			t.Fatalf("echo through the NAT: got %q, want %q", got, msg)
		}
	}
	// The relay counts a reply just after sending it.
	st := inst.waitStats(1, "30 bytes back", func(s spec.Status) bool { return s.BytesReceived == 30 })
	if !st.Listening || st.Protocol != "udp" || st.ActiveConnections != 1 || st.TotalConnections != 1 || st.BytesSent != 30 || st.BytesReceived != 30 {
		t.Fatalf("stats with one NAT entry: %+v", st)
	}
	if st.HealthStatus != "not_checked" {
		t.Fatalf("health of a UDP stream without checks: %q", st.HealthStatus)
	}
	// No traffic for the idle timeout: the entry goes, with its log line.
	inst.waitStats(1, "the entry evicted", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	e := inst.waitLog(1, "idle_timeout", func(e logEntry) bool { return e.DisconnectReason == "idle_timeout" })
	if e.Action != "allowed" || e.SourceIP != "127.0.0.1" || e.BytesSent != 30 || e.BytesReceived != 30 || e.DurationMS < 900 {
		t.Fatalf("eviction log entry: %+v", e)
	}
	// The client comes back: a new entry.
	if got := udpRoundTrip(t, c, "again", 2*time.Second); got != "again" {
		t.Fatalf("after eviction: got %q", got)
	}
	if st := inst.stats()[1]; st.TotalConnections != 2 || st.ActiveConnections != 1 {
		t.Fatalf("stats after a second entry: %+v", st)
	}
}

func TestUDPManyClientsOwnReplies(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpWho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, nil)))

	const clients, rounds = 40, 25
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	upstreamSources := make([]string, clients)
	for i := range clients {
		c := udpDial(t, "", "127.0.0.1", port)
		wg.Go(func() {
			buf := make([]byte, 2048)
			for r := range rounds {
				msg := fmt.Sprintf("client %d round %d", i, r)
				if _, err := c.Write([]byte(msg)); err != nil {
					errs <- err
					return
				}
				_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
				n, err := c.Read(buf)
				if err != nil {
					errs <- fmt.Errorf("client %d round %d: %v", i, r, err)
					return
				}
				src, payload, _ := strings.Cut(string(buf[:n]), "|")
				if payload != msg {
					errs <- fmt.Errorf("client %d got %q, want its own %q", i, payload, msg)
					return
				}
				if r == 0 {
					upstreamSources[i] = src
				} else if src != upstreamSources[i] {
					errs <- fmt.Errorf("client %d: upstream saw source %s, then %s: the NAT entry changed", i, upstreamSources[i], src)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	seen := map[string]bool{}
	for _, s := range upstreamSources {
		if seen[s] {
			t.Errorf("two clients share the upstream source %s", s)
		}
		seen[s] = true
	}
	st := inst.stats()[1]
	var sent uint64
	for i := range clients {
		for r := range rounds {
			sent += uint64(len(fmt.Sprintf("client %d round %d", i, r)))
		}
	}
	if st.ActiveConnections != clients || st.TotalConnections != clients || st.BytesSent != sent || st.BytesReceived <= sent {
		t.Fatalf("stats after %d clients: %+v", clients, st)
	}
}

func TestUDPACLAndBlockedLogOncePerSource(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{
		"listen_address":  "0.0.0.0",
		"whitelist_cidrs": []string{"127.0.0.0/8"},
		"blacklist_cidrs": []string{"127.0.0.2"},
	})))

	ok := udpDial(t, "127.0.0.1", "127.0.0.1", port)
	if got := udpRoundTrip(t, ok, "allowed", 2*time.Second); got != "allowed" {
		t.Fatalf("allowed client: got %q", got)
	}
	denied := udpDial(t, "127.0.0.2", "127.0.0.1", port)
	for i := range 20 {
		if got := udpRoundTrip(t, denied, fmt.Sprint("denied ", i), 50*time.Millisecond); got != "" {
			t.Fatalf("blacklisted client got a reply: %q", got)
		}
	}
	st := inst.waitStats(1, "20 blocked", func(s spec.Status) bool { return s.BlockedConnections == 20 })
	if st.ActiveConnections != 1 || st.TotalConnections != 1 {
		t.Fatalf("a denied source made NAT state: %+v", st)
	}
	inst.waitLog(1, "action blocked", func(e logEntry) bool { return e.Action == "blocked" })
	time.Sleep(200 * time.Millisecond) // let any further lines be written
	var blocked []logEntry
	for _, e := range inst.connLogs() {
		if e.Action == "blocked" {
			blocked = append(blocked, e)
		}
	}
	if len(blocked) != 1 || blocked[0].SourceIP != "127.0.0.2" || blocked[0].DisconnectReason != "acl_denied" {
		t.Fatalf("want one blocked line for 20 datagrams of one source, got %+v", blocked)
	}
	// The allowed client still works.
	if got := udpRoundTrip(t, ok, "still", 2*time.Second); got != "still" {
		t.Fatalf("allowed client after the flood: got %q", got)
	}
}

func TestUDPEntryCap(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"max_connections": 2})))

	a, b, c := udpDial(t, "", "127.0.0.1", port), udpDial(t, "", "127.0.0.1", port), udpDial(t, "", "127.0.0.1", port)
	if udpRoundTrip(t, a, "a", 2*time.Second) != "a" || udpRoundTrip(t, b, "b", 2*time.Second) != "b" {
		t.Fatal("the first two clients should get through")
	}
	if got := udpRoundTrip(t, c, "c", 200*time.Millisecond); got != "" {
		t.Fatalf("a third client past max_connections 2 got %q", got)
	}
	if udpRoundTrip(t, a, "a2", 2*time.Second) != "a2" || udpRoundTrip(t, b, "b2", 2*time.Second) != "b2" {
		t.Fatal("existing entries must keep working past the cap")
	}
	st := inst.stats()[1]
	if st.ActiveConnections != 2 || st.BlockedConnections != 1 || st.TotalConnections != 2 {
		t.Fatalf("stats at the cap: %+v", st)
	}
	inst.waitLog(1, "max_connections", func(e logEntry) bool { return e.Action == "blocked" && e.DisconnectReason == "max_connections" })
}

// A client that floods the stream and never reads its replies must not slow
// another client down or cost it a datagram.
func TestUDPFloodingClientDoesNotStallOthers(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	startCaddy(t, hosts(udpHost(1, port, up.Port, nil)))

	flood := udpDial(t, "", "127.0.0.1", port)
	_ = flood.SetReadBuffer(4096) // its replies pile up and overflow
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		p := make([]byte, 1200)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_, _ = flood.Write(p)
		}
	})
	defer func() { close(stop); wg.Wait() }()

	c := udpDial(t, "", "127.0.0.1", port)
	for i := range 200 {
		msg := fmt.Sprint("ping ", i)
		// Loopback can drop under the flood; a lost datagram is resent,
		// a slow answer is not accepted.
		got := ""
		for try := 0; try < 3 && got != msg; try++ {
			got = udpRoundTrip(t, c, msg, time.Second)
			for got != "" && got != msg { // a late reply to an earlier try
				got = udpRead(t, c, time.Second)
			}
		}
		if got != msg {
			t.Fatalf("round %d beside a flooding client: got %q", i, got)
		}
	}
}

// UDP rate limits police: a datagram over the budget is dropped (and
// counted), never delayed. The client's bucket holds one second's worth
// and starts full; a datagram larger than it passes only when it is full.
// At 500 B/s, of 100 datagrams of 1000 B sent over a second, the first
// passes and leaves the bucket in debt for the rest.
func TestUDPRateLimitsDrop(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"upload_rate_bytes": 500})))
	c := udpDial(t, "", "127.0.0.1", port)
	_ = c.SetReadBuffer(1 << 20)
	p := make([]byte, 1000)
	start := time.Now()
	for i := range 100 {
		time.Sleep(time.Until(start.Add(time.Duration(i) * 10 * time.Millisecond)))
		if _, err := c.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	for udpRead(t, c, 300*time.Millisecond) != "" {
		got++
	}
	if got < 1 || got > 2 {
		t.Fatalf("upload limit 500 B/s: %d of 100 datagrams of 1000 B sent over %v came back, want 1-2", got, time.Since(start))
	}
	st := inst.waitStats(1, "every datagram counted", func(s spec.Status) bool { return s.DatagramsDropped+uint64(got) >= 100 })
	if st.DatagramsDropped != uint64(100-got) || st.BytesSent != uint64(got*1000) {
		t.Fatalf("stats after rate dropping: %+v (got %d back)", st, got)
	}
}

func TestUDPDownloadRateDrops(t *testing.T) {
	checkNoLeaks(t)
	// The upstream answers each datagram with ten of 1000 bytes.
	up := newUDPUpstream(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		big := make([]byte, 1000)
		for range 10 {
			_, _ = pc.WriteToUDPAddrPort(big, from)
		}
	})
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"download_rate_bytes": 10000})))
	c := udpDial(t, "", "127.0.0.1", port)
	_ = c.SetReadBuffer(1 << 20)
	start := time.Now()
	for range 20 {
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	got := 0
	for udpRead(t, c, 300*time.Millisecond) != "" {
		got++
	}
	// The full bucket's 10, and what it gained while the replies came.
	if want := 10 + int(time.Since(start)/(100*time.Millisecond)); got < 10 || got > want {
		t.Fatalf("download limit 10000 B/s: %d of 200 replies of 1000 B arrived, want 10-%d", got, want)
	}
	if st := inst.stats()[1]; st.DatagramsDropped != uint64(200-got) {
		t.Fatalf("stats after download rate dropping: %+v (got %d)", st, got)
	}
}

// A steady flow of twice a 100 kB/s upload limit: beyond the first (full)
// bucket, what reaches the upstream stays within 5% of the limit.
func TestUDPRateLimitHoldsTheRate(t *testing.T) {
	checkNoLeaks(t)
	const limit = 100_000
	up := newUDPUpstream(t, "127.0.0.1:0", func(*net.UDPConn, []byte, netip.AddrPort) {})
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"upload_rate_bytes": limit})))
	c := udpDial(t, "", "127.0.0.1", port)
	p := make([]byte, 1000)
	const n, gap = 600, 5 * time.Millisecond // 200 kB/s for 3 s
	start := time.Now()
	for i := range n {
		time.Sleep(time.Until(start.Add(time.Duration(i) * gap)))
		if _, err := c.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	span := time.Since(start)
	st := inst.waitStats(1, "every datagram counted", func(s spec.Status) bool { return s.BytesSent/1000+s.DatagramsDropped >= n })
	rate := float64(st.BytesSent-limit) / span.Seconds()
	if rate < 0.95*limit || rate > 1.05*limit {
		t.Fatalf("%d B/s limit, 200 kB/s offered for %v: %d bytes passed, %.0f B/s beyond the first bucket, want within 5%%",
			limit, span, st.BytesSent, rate)
	}
}

// One 60 KB datagram on a 1 kB/s limit passes; it leaves the bucket 59 kB
// in debt, so nothing passes after it for about a minute (the minute
// itself is timed on a fake clock in streamstate's TestBucket tests).
func TestUDPBigDatagramThenNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"upload_rate_bytes": 1000})))
	c := udpDial(t, "", "127.0.0.1", port)
	big := strings.Repeat("b", 60000)
	if got := udpRoundTrip(t, c, big, 2*time.Second); got != big {
		t.Fatalf("a 60 KB datagram on a full 1 kB/s bucket: got %d bytes back", len(got))
	}
	for i := range 20 {
		if got := udpRoundTrip(t, c, "small", 100*time.Millisecond); got != "" {
			t.Fatalf("datagram %d after the 60 KB one came back: the limit let %q through", i, got)
		}
	}
	st := inst.waitStats(1, "20 drops", func(s spec.Status) bool { return s.DatagramsDropped >= 20 })
	if st.DatagramsDropped != 20 || st.BytesSent != 60000 {
		t.Fatalf("stats after a 60 KB datagram and 20 small ones: %+v", st)
	}
}

// Every datagram upstream carries a PROXY v2 header with the client's
// address and the address it sent to, also on a wildcard listener; the
// reply comes from that address.
func TestUDPProxyProtocolV2(t *testing.T) {
	checkNoLeaks(t)
	type seen struct {
		h       *proxyproto.Header
		payload string
	}
	got := make(chan seen, 16)
	up := newUDPUpstream(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		br := bufio.NewReader(bytes.NewReader(p))
		h, err := proxyproto.Read(br)
		if err != nil {
			got <- seen{}
			return
		}
		rest := make([]byte, br.Buffered())
		_, _ = br.Read(rest)
		got <- seen{h, string(rest)}
		_, _ = pc.WriteToUDPAddrPort(rest, from)
	})
	p4, p4any, p6 := freePort(t), freePort(t), freePort(t)
	startCaddy(t, hosts(
		udpHost(1, p4, up.Port, map[string]any{"proxy_protocol_version": 2}),
		udpHost(2, p4any, up.Port, map[string]any{"proxy_protocol_version": 2, "listen_address": "0.0.0.0"}),
		udpHost(3, p6, up.Port, map[string]any{"proxy_protocol_version": 2, "listen_address": "::1"}),
	))

	check := func(src, dst string, port int) {
		t.Helper()
		c := udpDial(t, src, dst, port)
		for i := range 3 {
			msg := fmt.Sprintf("to %s #%d", dst, i)
			if r := udpRoundTrip(t, c, msg, 2*time.Second); r != msg {
				t.Fatalf("%s→%s:%d: reply %q, want %q (a connected client only takes replies from the address it sent to)", src, dst, port, r, msg)
			}
			s := <-got
			if s.h == nil {
				t.Fatalf("%s→%s:%d: datagram %d without a valid PROXY v2 header", src, dst, port, i)
			}
			wantSrc := c.LocalAddr().(*net.UDPAddr).AddrPort()
			wantDst := netip.AddrPortFrom(netip.MustParseAddr(dst), uint16(port))
			gs, gd := s.h.SourceAddr.(*net.UDPAddr).AddrPort(), s.h.DestinationAddr.(*net.UDPAddr).AddrPort()
			if s.h.Version != 2 || !s.h.TransportProtocol.IsDatagram() || gs != wantSrc || gd != wantDst || s.payload != msg {
				t.Fatalf("%s→%s:%d: header %+v (%s → %s) payload %q; want %s → %s, DGRAM, %q", src, dst, port, s.h, gs, gd, s.payload, wantSrc, wantDst, msg)
			}
		}
	}
	check("127.0.0.1", "127.0.0.1", p4)
	check("127.0.0.1", "127.0.0.1", p4any)
	check("127.0.0.5", "127.0.0.7", p4any) // wildcard: the address actually used
	check("::1", "::1", p6)
}

func TestUDPAndTCPOnOnePort(t *testing.T) {
	checkNoLeaks(t)
	tcpUp := newUpstream(t, echo)
	// One port number for both upstream kinds, as a DNS server has.
	udpUp := newUDPUpstream(t, fmt.Sprintf("127.0.0.1:%d", tcpUp.Port), udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, udpUp.Port, map[string]any{"protocol": "tcp+udp"})))

	tc := dial(t, port)
	if got := roundTrip(t, tc, "over tcp"); got != "over tcp" {
		t.Fatalf("tcp side: got %q", got)
	}
	uc := udpDial(t, "", "127.0.0.1", port)
	if got := udpRoundTrip(t, uc, "over udp!", 2*time.Second); got != "over udp!" {
		t.Fatalf("udp side: got %q", got)
	}
	// The relay counts a reply just after sending it.
	st := inst.waitStats(1, "17 bytes each way", func(s spec.Status) bool { return s.BytesReceived == 17 })
	if !st.Listening || st.Protocol != "tcp+udp" || st.ActiveConnections != 2 || st.TotalConnections != 2 || st.BytesSent != 17 || st.BytesReceived != 17 {
		t.Fatalf("stats of tcp+udp with one connection each: %+v", st)
	}
}

// A reload that keeps the stream keeps its NAT entries: the client's
// datagrams go on through the same upstream socket. Changing the upstream
// closes them, and the next datagram goes to the new upstream.
func TestUDPReloadKeepsEntries(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpWho)
	up2 := newUDPUpstream(t, "127.0.0.1:0", udpWho)
	port, other := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, nil)))

	c := udpDial(t, "", "127.0.0.1", port)
	first := udpRoundTrip(t, c, "before", 2*time.Second)
	src, _, _ := strings.Cut(first, "|")
	if src == "" {
		t.Fatalf("no reply before the reload: %q", first)
	}
	for i := range 3 {
		// Rename the stream and add another one: a reload of the whole app.
		cfg := hosts(
			udpHost(1, port, up.Port, map[string]any{"name": fmt.Sprint("renamed-", i), "idle_timeout_seconds": 30}),
			udpHost(2, other, up.Port, nil))
		if err := inst.load(cfg); err != nil {
			t.Fatal(err)
		}
		got := udpRoundTrip(t, c, fmt.Sprint("after ", i), 2*time.Second)
		if got != src+"|after "+fmt.Sprint(i) {
			t.Fatalf("reload %d: got %q, want the same upstream source %s", i, got, src)
		}
	}
	if st := inst.stats()[1]; st.ActiveConnections != 1 || !st.Listening {
		t.Fatalf("stats after reloads: %+v", st)
	}

	if err := inst.load(hosts(udpHost(1, port, up2.Port, nil))); err != nil {
		t.Fatal(err)
	}
	inst.waitLog(1, "config_changed", func(e logEntry) bool { return e.DisconnectReason == "config_changed" })
	got := udpRoundTrip(t, c, "moved", 2*time.Second)
	src2, payload, _ := strings.Cut(got, "|")
	if payload != "moved" || src2 == src {
		t.Fatalf("after the upstream changed: got %q", got)
	}
	up.Close(5 * time.Second) // nothing may reach the old upstream any more

	// Removing the stream closes the entry.
	if err := inst.load(hosts(udpHost(2, other, up2.Port, nil))); err != nil {
		t.Fatal(err)
	}
	inst.waitLog(1, "stream_removed", func(e logEntry) bool { return e.DisconnectReason == "stream_removed" })
	if r := udpRoundTrip(t, c, "gone", 200*time.Millisecond); r != "" {
		t.Fatalf("a removed stream answered: %q", r)
	}
}

// Stopping Caddy frees every goroutine and every socket of the UDP relay.
func TestUDPStopFreesEverything(t *testing.T) {
	if n := udpSockets(t); n != 0 {
		t.Fatalf("%d UDP sockets open before the test", n)
	}
	t.Run("run", func(t *testing.T) {
		checkNoLeaks(t)
		up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
		port := freePort(t)
		inst := startCaddy(t, hosts(udpHost(1, port, up.Port, nil)))
		for i := range 50 {
			c := udpDial(t, "", "127.0.0.1", port)
			if got := udpRoundTrip(t, c, fmt.Sprint(i), 2*time.Second); got != fmt.Sprint(i) {
				t.Fatalf("client %d: got %q", i, got)
			}
		}
		inst.waitStats(1, "50 entries", func(s spec.Status) bool { return s.ActiveConnections == 50 })
		// 50 clients, 50 upstream sockets, the upstream and the listener.
		if n := udpSockets(t); n != 102 {
			t.Fatalf("%d UDP sockets open with 50 NAT entries, want 102", n)
		}
	})
	// Caddy stopped with the subtest.
	if n := udpSockets(t); n != 0 {
		t.Fatalf("%d UDP sockets still open after stopping a stream with 50 NAT entries", n)
	}
}

// udpSockets counts this process's open UDP sockets.
func udpSockets(t *testing.T) int {
	t.Helper()
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/self/net/udp", "/proc/self/net/udp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Skip("no", f, err)
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			if fields := strings.Fields(line); len(fields) > 9 {
				inodes[fields[9]] = true
			}
		}
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	n := 0
	for _, e := range ents {
		l, _ := os.Readlink("/proc/self/fd/" + e.Name())
		if ino, ok := strings.CutPrefix(l, "socket:["); ok && inodes[strings.TrimSuffix(ino, "]")] {
			n++
		}
	}
	return n
}

// TestUDPCountersMoveDuringTransfer: a long UDP transfer through one NAT
// entry shows bytes_sent and bytes_received moving while the entry is
// open (the relay counts in the entry's session, and the stats read the
// open sessions), and exact once the entry has ended.
func TestUDPCountersMoveDuringTransfer(t *testing.T) {
	checkNoLeaks(t)
	up := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	port := freePort(t)
	inst := startCaddy(t, hosts(udpHost(1, port, up.Port, map[string]any{"idle_timeout_seconds": 1})))
	c := udpDial(t, "", "127.0.0.1", port)
	const n, size = 400, 1000
	msg := bytes.Repeat([]byte("u"), size)
	buf := make([]byte, 2*size)
	var echoed int
	var midSent, midRecv int
	for i := range n {
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		// One datagram in flight at a time: none is lost to a full buffer.
		if m, err := c.Read(buf); err == nil && m == size {
			echoed++
		}
		if i%40 == 20 {
			st := inst.stats()[1]
			if st.ActiveConnections == 1 && st.BytesSent > 0 && st.BytesSent < n*size {
				midSent++
			}
			if st.ActiveConnections == 1 && st.BytesReceived > 0 && st.BytesReceived < n*size {
				midRecv++
			}
		}
	}
	if echoed != n {
		t.Fatalf("%d of %d datagrams echoed", echoed, n)
	}
	if midSent == 0 || midRecv == 0 {
		t.Fatalf("stats moved mid-transfer %d times (sent) and %d (received): want both while the entry is open", midSent, midRecv)
	}
	st := inst.waitStats(1, "the entry evicted", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	if st.BytesSent != n*size || st.BytesReceived != n*size {
		t.Fatalf("after the entry ended: bytes_sent %d, bytes_received %d, want %d each", st.BytesSent, st.BytesReceived, n*size)
	}
}
