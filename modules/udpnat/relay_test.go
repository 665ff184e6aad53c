package udpnat

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// testRelay is a relay serving one socket on 127.0.0.1 in front of a UDP
// echo server, torn down with the test.
type testRelay struct {
	r     *Relay
	state *streamstate.State
	addr  *net.UDPAddr // the relay's socket
}

func newTestRelay(t testing.TB, cfg Config) *testRelay {
	t.Helper()
	cfg.Upstream = tagEcho(t, "")
	return startRelay(t, cfg)
}

// tagEcho is a UDP upstream on 127.0.0.1, closed with the test, that
// answers each datagram with tag in front of it; it returns its address.
// It allocates nothing per datagram.
func tagEcho(t testing.TB, tag string) string {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		copy(buf, tag)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf[len(tag):])
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil {
				_, _ = pc.WriteToUDPAddrPort(buf[:len(tag)+n], from)
			}
		}
	}()
	t.Cleanup(func() { // after the relay's
		pc.Close()
		<-done
	})
	return pc.LocalAddr().String()
}

// startRelay serves a relay with cfg on a socket of 127.0.0.1, torn down
// with the test.
func startRelay(t testing.TB, cfg Config) *testRelay {
	t.Helper()
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	state := streamstate.New(1)
	r := Acquire(state, pc.LocalAddr().String())
	r.SetConfig(cfg)
	if err := r.AddSocket(pc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.RemoveSocket(pc, pc.Close)
		Release(r)
		_ = state.Destruct()
	})
	return &testRelay{r: r, state: state, addr: pc.LocalAddr().(*net.UDPAddr)}
}

// limits is the admission policy of l.
func limits(t testing.TB, l streamstate.Limits) *streamstate.Policy {
	t.Helper()
	p, err := streamstate.NewPolicy(l, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (tr *testRelay) client(t testing.TB) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, tr.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// flow is one flow as a resolver's client makes it: a new socket, one
// round trip (p, its echo into buf), closed.
func (tr *testRelay) flow(t testing.TB, p, buf []byte) {
	t.Helper()
	c, err := net.DialUDP("udp", nil, tr.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	roundTrip(t, c, p, buf)
}

// logs makes the relay's stream log into the returned channel (room for
// 4 records), in place of its storage.
func (tr *testRelay) logs() <-chan streamstate.LogRecord {
	logged := make(chan streamstate.LogRecord, 4)
	tr.state.SetLogSink(func(r streamstate.LogRecord) bool { logged <- r; return true })
	return logged
}

// nextLog waits up to 5 s for the log record of what (an entry) to end.
func nextLog(t testing.TB, logged <-chan streamstate.LogRecord, what string) streamstate.LogRecord {
	t.Helper()
	select {
	case r := <-logged:
		return r
	case <-time.After(5 * time.Second):
		t.Fatalf("%s did not end within 5s", what)
		return streamstate.LogRecord{}
	}
}

// roundTrip sends p and reads the echo into buf.
func roundTrip(t testing.TB, c *net.UDPConn, p, buf []byte) {
	if _, err := c.Write(p); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(buf)
	if err != nil || n != len(p) {
		t.Fatalf("echo: n=%d err=%v", n, err)
	}
}

// Relaying a datagram each way on an existing NAT entry allocates nothing:
// not the demux, not the entry's reply path, not the counters.
func TestRelayDatagramsDoNotAllocate(t *testing.T) {
	testNoAllocations(t, Config{})
}

// Nor do the rate limits' buckets, on a datagram that they let through.
func TestLimitedRelayDatagramsDoNotAllocate(t *testing.T) {
	testNoAllocations(t, Config{Policy: limits(t, streamstate.Limits{UploadRate: 1 << 30, DownloadRate: 1 << 30})})
}

func testNoAllocations(t *testing.T, cfg Config) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	tr := newTestRelay(t, cfg)
	c := tr.client(t)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	p, buf := make([]byte, 64), make([]byte, 2048)
	for range 100 {
		roundTrip(t, c, p, buf)
	}
	allocs := testing.AllocsPerRun(2000, func() { roundTrip(t, c, p, buf) })
	if allocs > 0 {
		t.Fatalf("%.2f allocations per datagram round trip through the relay, want 0", allocs)
	}
	if tr.r.Entries() != 1 || tr.state.SinceReload().BytesSent != 64*(100+2001) {
		t.Fatalf("entries %d, bytes sent %d", tr.r.Entries(), tr.state.SinceReload().BytesSent)
	}
}

// BenchmarkRelayRoundTrip is one client's 64-byte echo through the relay,
// on loopback; compare with BenchmarkDirectRoundTrip.
func BenchmarkRelayRoundTrip(b *testing.B) {
	tr := newTestRelay(b, Config{})
	c := tr.client(b)
	p, buf := make([]byte, 64), make([]byte, 2048)
	b.ReportAllocs()
	for b.Loop() {
		roundTrip(b, c, p, buf)
	}
}

// BenchmarkRelayRoundTripLimited is the same echo through upload and
// download rate limits that every datagram is within.
func BenchmarkRelayRoundTripLimited(b *testing.B) {
	tr := newTestRelay(b, Config{Policy: limits(b, streamstate.Limits{UploadRate: 1 << 30, DownloadRate: 1 << 30})})
	c := tr.client(b)
	p, buf := make([]byte, 64), make([]byte, 2048)
	b.ReportAllocs()
	for b.Loop() {
		roundTrip(b, c, p, buf)
	}
}

// BenchmarkDirectRoundTrip is the same echo without the relay.
func BenchmarkDirectRoundTrip(b *testing.B) {
	tr := newTestRelay(b, Config{})
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(*tr.r.cfg.Load().targets[0].Load()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p, buf := make([]byte, 64), make([]byte, 2048)
	b.ReportAllocs()
	for b.Loop() {
		roundTrip(b, c, p, buf)
	}
}

func TestProxyHeaderParsesBack(t *testing.T) {
	for _, tc := range []struct{ src, dst, wantSrc, wantDst string }{
		{"192.0.2.1:5000", "198.51.100.2:53", "192.0.2.1:5000", "198.51.100.2:53"},
		{"[::ffff:192.0.2.1]:5000", "[::ffff:198.51.100.2]:53", "192.0.2.1:5000", "198.51.100.2:53"},
		{"[2001:db8::1]:5000", "[2001:db8::2]:443", "[2001:db8::1]:5000", "[2001:db8::2]:443"},
		// Mixed families are written as IPv6.
		{"192.0.2.1:5000", "[2001:db8::2]:443", "[::ffff:192.0.2.1]:5000", "[2001:db8::2]:443"},
	} {
		hdr, err := proxyHeader(netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst))
		if err != nil {
			t.Fatalf("%s → %s: %v", tc.src, tc.dst, err)
		}
		if len(hdr) > headroom {
			t.Fatalf("%s → %s: header of %d bytes does not fit the headroom of %d", tc.src, tc.dst, len(hdr), headroom)
		}
		h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(append(hdr, "payload"...))))
		if err != nil {
			t.Fatalf("%s → %s: go-proxyproto cannot read the header: %v", tc.src, tc.dst, err)
		}
		gs, gd := h.SourceAddr.(*net.UDPAddr).AddrPort().String(), h.DestinationAddr.(*net.UDPAddr).AddrPort().String()
		if !h.TransportProtocol.IsDatagram() || gs != tc.wantSrc || gd != tc.wantDst {
			t.Errorf("%s → %s: header says %s → %s (%v), want %s → %s DGRAM", tc.src, tc.dst, gs, gd, h.TransportProtocol, tc.wantSrc, tc.wantDst)
		}
	}
}

// The idle timeout ends an idle entry, not one that moves datagrams.
func TestIdleTimeoutEndsIdleEntriesOnly(t *testing.T) {
	tr := newTestRelay(t, Config{Policy: limits(t, streamstate.Limits{IdleTimeout: 300 * time.Millisecond, LogConnections: true})})
	idle, busy := tr.client(t), tr.client(t)
	_ = idle.SetDeadline(time.Now().Add(10 * time.Second))
	_ = busy.SetDeadline(time.Now().Add(10 * time.Second))
	p, buf := []byte("x"), make([]byte, 16)
	roundTrip(t, idle, p, buf)
	roundTrip(t, busy, p, buf)
	deadline := time.Now().Add(5 * time.Second)
	for tr.r.Entries() != 1 {
		// Keep one entry busy well past the idle timeout.
		roundTrip(t, busy, p, buf)
		time.Sleep(20 * time.Millisecond)
		if time.Now().After(deadline) {
			t.Fatalf("idle entry not evicted: %d entries", tr.r.Entries())
		}
	}
	var reasons []string
	tr.state.Sessions(func(ss *streamstate.Session) bool {
		reasons = append(reasons, ss.Source.String())
		return true
	})
	if len(reasons) != 1 || reasons[0] != busy.LocalAddr().String() {
		t.Fatalf("open sessions after eviction: %v, want only the busy client %s", reasons, busy.LocalAddr())
	}
}

// The relay of a stream address lives in the stream's shared state: a
// second Acquire of the address (a reload) gets the same relay, with its
// NAT table, and the stream counts its entries.
func TestRelayLivesInStreamState(t *testing.T) {
	tr := newTestRelay(t, Config{})
	same := Acquire(tr.state, tr.addr.String())
	defer Release(same)
	if same != tr.r {
		t.Fatal("a second Acquire of the address made another relay")
	}
	roundTrip(t, tr.client(t), []byte("x"), make([]byte, 8))
	if tr.state.UDPEntries() != 1 || tr.r.Entries() != 1 {
		t.Fatalf("entries: stream %d, relay %d; want 1", tr.state.UDPEntries(), tr.r.Entries())
	}
}

// BenchmarkRelayNewFlow is a DNS-shaped flow: a new client socket sends
// one datagram, reads the answer and closes, and with Responses 1 the
// entry closes after the answer. It measures the cost of a new entry.
func BenchmarkRelayNewFlow(b *testing.B) {
	tr := newTestRelay(b, Config{Responses: 1})
	p, buf := []byte("query"), make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		tr.flow(b, p, buf)
	}
}

// With udp_responses, a datagram dropped after its entry's earlier
// datagrams got their answers (one came while it was on its way) leaves
// nothing expected: the entry has its answers and closes, as if the last
// answer had come after the drop. A dropped datagram before any answer
// leaves the entry open for the next.
func TestDroppedDatagramAfterTheLastAnswerClosesTheEntry(t *testing.T) {
	e := &entry{cfg: &config{Config: Config{Responses: 1}}, ss: new(streamstate.Session)}
	e.expect() // the first query: one answer expected
	e.expect() // the second: two
	e.ss.AddDatagramReceived(5)
	if e.answered(1) {
		t.Fatal("one answer of two closed the entry")
	}
	if !e.unexpect() { // the second query is dropped
		t.Fatal("the drop left no answer expected after one came, and the entry did not close")
	}
	if !e.gone() || e.unexpect() || e.answered(1) {
		t.Fatal("the entry is not closing once, for good")
	}

	first := &entry{cfg: &config{Config: Config{Responses: 1}}, ss: new(streamstate.Session)}
	first.expect()
	if first.unexpect() || first.gone() {
		t.Fatal("a first datagram dropped before any answer closed its entry")
	}
	if !first.expect() || !first.answered(1) {
		t.Fatal("the entry did not take its next datagram and close on its answer")
	}
}
