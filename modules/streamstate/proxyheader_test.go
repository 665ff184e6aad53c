package streamstate

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// v2 builds a PROXY v2 header with go-proxyproto.
func v2(t testing.TB, cmd proxyproto.ProtocolVersionAndCommand, tp proxyproto.AddressFamilyAndProtocol, src, dst string) []byte {
	t.Helper()
	h := &proxyproto.Header{Version: 2, Command: cmd, TransportProtocol: tp}
	if src != "" {
		s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
		if tp.IsDatagram() {
			h.SourceAddr, h.DestinationAddr = net.UDPAddrFromAddrPort(s), net.UDPAddrFromAddrPort(d)
		} else {
			h.SourceAddr, h.DestinationAddr = net.TCPAddrFromAddrPort(s), net.TCPAddrFromAddrPort(d)
		}
	}
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// proxyPolicy is a policy that takes headers from loopback only.
func proxyPolicy(t testing.TB, accept ProxyAccept, trusted string, timeout time.Duration) *Policy {
	t.Helper()
	p, err := NewPolicy(Limits{ProxyAccept: accept, TrustedProxies: []string{trusted}, ProxyHeaderTimeout: timeout}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestProxyHeaderTCP runs ProxyHeader on real loopback connections: the
// header's client comes out, the bytes after it stay for the relay
// (nothing is read past the header, however it arrives), and each kind of
// bad or missing header closes the connection by its reason, in time.
func TestProxyHeaderTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v1 := []byte("PROXY TCP4 203.0.113.9 198.51.100.1 40000 5432\r\n")
	v2tcp := v2(t, proxyproto.PROXY, proxyproto.TCPv6, "[2001:db8::9]:41000", "[2001:db8::1]:5432")
	local := v2(t, proxyproto.LOCAL, proxyproto.UNSPEC, "", "")
	cat := func(b ...[]byte) [][]byte { return b }
	for _, tc := range []struct {
		name    string
		accept  ProxyAccept
		trusted string
		parts   [][]byte // written in turn, a pause between
		stall   bool     // then the client stops sending
		ok      bool
		src     string // the client's source, "" for the connection's own
		reason  BlockReason
		rest    string // what the relay reads after
	}{
		{name: "v1", accept: ProxyRequired, parts: cat(append(v1[:len(v1):len(v1)], "hello"...)), ok: true, src: "203.0.113.9:40000", rest: "hello"},
		{name: "v2 in pieces", accept: ProxyRequired, parts: cat(v2tcp[:5], v2tcp[5:14], v2tcp[14:20], append(v2tcp[20:len(v2tcp):len(v2tcp)], "data"...)), ok: true, src: "[2001:db8::9]:41000", rest: "data"},
		{name: "v1 byte by byte", accept: ProxyRequired, parts: splitBytes(v1), ok: true, src: "203.0.113.9:40000"},
		{name: "v2 local", accept: ProxyRequired, parts: cat(append(local[:len(local):len(local)], "x"...)), ok: true, rest: "x"},
		{name: "optional, none", accept: ProxyOptional, parts: cat([]byte("SSH-2.0-x\r\n")), ok: true, rest: "SSH-2.0-x\r\n"},
		{name: "optional, v1", accept: ProxyOptional, parts: cat(v1), ok: true, src: "203.0.113.9:40000"},
		{name: "required, none", accept: ProxyRequired, parts: cat([]byte("GET / HTTP/1.0\r\n")), reason: BlockProxyHeaderMissing},
		{name: "required, silent", accept: ProxyRequired, stall: true, reason: BlockProxyHeaderMissing},
		{name: "garbage after the signature", accept: ProxyRequired, parts: cat([]byte("PROXY TCP4 not an address\r\n")), reason: BlockProxyHeaderInvalid},
		{name: "v1 without an end", accept: ProxyRequired, parts: cat(bytes.Repeat([]byte("PROXY "), 20)), reason: BlockProxyHeaderInvalid},
		{name: "slowloris", accept: ProxyRequired, parts: cat(v2tcp[:10]), stall: true, reason: BlockProxyHeaderInvalid},
		{name: "optional, slowloris", accept: ProxyOptional, parts: cat(v1[:10]), stall: true, reason: BlockProxyHeaderInvalid},
		{name: "untrusted, required", accept: ProxyRequired, trusted: "192.0.2.0/24", parts: cat(v1), reason: BlockProxyHeaderUntrusted},
		{name: "untrusted, optional", accept: ProxyOptional, trusted: "192.0.2.0/24", parts: cat([]byte("plain")), ok: true, rest: "plain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			trusted := tc.trusted
			if trusted == "" {
				trusted = "127.0.0.0/8"
			}
			const timeout = 300 * time.Millisecond
			p := proxyPolicy(t, tc.accept, trusted, timeout)
			st := New(0)
			st.SetGracePeriod(0)
			defer st.Destruct()

			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			go func() {
				for _, b := range tc.parts {
					c.Write(b)
					time.Sleep(5 * time.Millisecond)
				}
				if !tc.stall {
					c.(*net.TCPConn).CloseWrite()
				}
			}()
			own := s.RemoteAddr().(*net.TCPAddr).AddrPort()
			start := time.Now()
			addrs, ok := p.ProxyHeader(st, s, own)
			took := time.Since(start)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v (blocked: %v)", ok, tc.ok, blockedCounts(st))
			}
			if took > timeout+time.Second {
				t.Errorf("took %v, more than the %v header timeout", took, timeout)
			}
			if !ok {
				if n := st.BlockedBy(tc.reason); n != 1 {
					t.Errorf("blocked %v, want one %s", blockedCounts(st), tc.reason)
				}
				return
			}
			if got := addrs.Source; tc.src == "" && got.IsValid() || tc.src != "" && got != netip.MustParseAddrPort(tc.src) {
				t.Errorf("source %v, want %q", got, tc.src)
			}
			if tc.rest != "" {
				_ = s.SetReadDeadline(time.Now().Add(2 * time.Second))
				b, _ := io.ReadAll(s)
				if string(b) != tc.rest {
					t.Errorf("the relay reads %q, want %q", b, tc.rest)
				}
			}
		})
	}
}

func splitBytes(b []byte) [][]byte {
	out := make([][]byte, len(b))
	for i := range b {
		out[i] = b[i : i+1]
	}
	return out
}

func blockedCounts(st *State) map[string]uint64 {
	m := map[string]uint64{}
	for _, r := range BlockReasons() {
		if n := st.BlockedBy(r); n > 0 {
			m[r.String()] = n
		}
	}
	return m
}

// TestProxyDatagram: a trusted source's v2 header is taken off and names
// the client; other datagrams are dropped by reason or pass as they are.
func TestProxyDatagram(t *testing.T) {
	hdr := v2(t, proxyproto.PROXY, proxyproto.UDPv4, "203.0.113.9:5353", "198.51.100.1:53")
	front := netip.MustParseAddrPort("127.0.0.1:4000")
	outsider := netip.MustParseAddrPort("192.0.2.1:4000")
	for _, tc := range []struct {
		name   string
		accept ProxyAccept
		src    netip.AddrPort
		b      []byte
		ok     bool
		n      int
		client string
		reason BlockReason
	}{
		{"header", ProxyRequired, front, append(hdr[:len(hdr):len(hdr)], "q"...), true, len(hdr), "203.0.113.9:5353", 0},
		{"local", ProxyRequired, front, v2(t, proxyproto.LOCAL, proxyproto.UNSPEC, "", ""), true, 16, "", 0},
		{"none, required", ProxyRequired, front, []byte("query"), false, 0, "", BlockProxyHeaderMissing},
		{"none, optional", ProxyOptional, front, []byte("query"), true, 0, "", 0},
		{"truncated", ProxyRequired, front, hdr[:20], false, 0, "", BlockProxyHeaderInvalid},
		{"untrusted with one", ProxyOptional, outsider, hdr, false, 0, "", BlockProxyHeaderUntrusted},
		{"untrusted without, optional", ProxyOptional, outsider, []byte("q"), true, 0, "", 0},
		{"untrusted, required", ProxyRequired, outsider, []byte("q"), false, 0, "", BlockProxyHeaderUntrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := proxyPolicy(t, tc.accept, "127.0.0.1", 0)
			st := New(0)
			st.SetGracePeriod(0)
			defer st.Destruct()
			n, addrs, ok := p.ProxyDatagram(st, tc.b, tc.src, true)
			if ok != tc.ok || n != tc.n {
				t.Fatalf("n, ok = %d, %v; want %d, %v", n, ok, tc.n, tc.ok)
			}
			if !ok && st.BlockedBy(tc.reason) != 1 {
				t.Errorf("blocked %v, want one %s", blockedCounts(st), tc.reason)
			}
			if tc.client != "" && addrs.Source != netip.MustParseAddrPort(tc.client) || tc.client == "" && addrs.Source.IsValid() {
				t.Errorf("client %v, want %q", addrs.Source, tc.client)
			}
			// An open entry's datagram: the same length, no addresses,
			// and nothing allocated.
			if ok && n > 0 {
				n2, addrs2, ok2 := p.ProxyDatagram(st, tc.b, tc.src, false)
				if n2 != n || !ok2 || addrs2.Source.IsValid() {
					t.Errorf("without parse: %d %+v %v", n2, addrs2, ok2)
				}
				if a := testing.AllocsPerRun(100, func() { p.ProxyDatagram(st, tc.b, tc.src, false) }); a != 0 {
					t.Errorf("without parse: %v allocations per datagram", a)
				}
			}
		})
	}
}

// FuzzProxyHeader checks the parsing of a front proxy's PROXY header
// (ParseProxyHeader: headerLen, then go-proxyproto on exactly the
// header) against go-proxyproto reading the same bytes on its own: it
// never panics, a header it takes go-proxyproto takes too, with the same
// client, its length is within the input, and the input cut at that
// length parses the same (nothing after the header is needed or eaten).
//
// Seeds are in testdata/fuzz/FuzzProxyHeader. To fuzz:
//
//	go test -run '^$' -fuzz '^FuzzProxyHeader$' -fuzztime 60s ./modules/streamstate
func FuzzProxyHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		n, addrs, err := ParseProxyHeader(b)
		if err != nil || n == 0 {
			if n != 0 || addrs.Source.IsValid() {
				t.Fatalf("refused or no header, but n %d, addrs %+v", n, addrs)
			}
			return
		}
		if n > len(b) || n > maxProxyHeader {
			t.Fatalf("header length %d, input %d", n, len(b))
		}
		n2, addrs2, err := ParseProxyHeader(b[:n])
		if err != nil || n2 != n || addrs2 != addrs {
			t.Fatalf("cut at its length: %d %+v %v; whole: %d %+v", n2, addrs2, err, n, addrs)
		}
		h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(b)))
		if err != nil {
			t.Fatalf("taken (%d bytes, %+v), but go-proxyproto alone: %v", n, addrs, err)
		}
		if addrs.Source.IsValid() && addrPort(h.SourceAddr) != addrs.Source {
			t.Fatalf("client %v, go-proxyproto says %v", addrs.Source, h.SourceAddr)
		}
	})
}

// BenchmarkParseProxyHeader is the CPU a front proxy's header costs a new
// connection on top of its two system calls (a peek and a read): its
// length, then go-proxyproto's parse.
func BenchmarkParseProxyHeader(b *testing.B) {
	for _, tc := range []struct {
		name string
		hdr  []byte
	}{
		{"v1", []byte("PROXY TCP4 203.0.113.9 198.51.100.1 40000 5432\r\n")},
		{"v2", v2(b, proxyproto.PROXY, proxyproto.TCPv4, "203.0.113.9:40000", "198.51.100.1:5432")},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if n, _, err := ParseProxyHeader(tc.hdr); err != nil || n != len(tc.hdr) {
					b.Fatal(n, err)
				}
			}
		})
	}
}
