package streams_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// headerUpstream is an echo upstream that reads the PROXY header Aegis
// sends first and records the client it names.
type headerUpstream struct {
	*loopback.Server
	mu      sync.Mutex
	sources []string
}

func newHeaderUpstream(t *testing.T) *headerUpstream {
	u := &headerUpstream{}
	u.Server = newUpstream(t, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		h, err := proxyproto.Read(br)
		src := "no header: " + fmt.Sprint(err)
		if err == nil {
			src = h.SourceAddr.(*net.TCPAddr).IP.String()
		}
		u.mu.Lock()
		u.sources = append(u.sources, src)
		u.mu.Unlock()
		_, _ = io.Copy(c, br)
	})
	return u
}

func (u *headerUpstream) seen() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.sources...)
}

// TestAcceptProxyProtocolBehindHAProxyAndNginx puts HAProxy (send-proxy-v2)
// and nginx (stream, proxy_protocol on: v1) in front of a stream with
// accept_proxy_protocol required: the log, the ACL, the live connection
// list and the PROXY header Aegis sends its upstream all show the client
// that connected to the front proxy, not the proxy. Sources outside
// trusted_proxy_cidrs, garbage and a header that never ends are closed,
// in time, each by its reason, counted and logged.
func TestAcceptProxyProtocolBehindHAProxyAndNginx(t *testing.T) {
	checkNoLeaks(t)
	up := newHeaderUpstream(t)
	port, haPort, ngxPort := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{
		"accept_proxy_protocol":        "required",
		"trusted_proxy_cidrs":          []string{"127.0.0.1", "127.0.0.6/31", "127.0.0.8"},
		"proxy_header_timeout_seconds": 1,
		"blacklist_cidrs":              []string{"127.0.0.3"},
		"proxy_protocol_version":       2,
	})))
	testenv.HAProxy(t, fmt.Sprintf(`global
    maxconn 64
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:%d
    default_backend be
backend be
    server aegis 127.0.0.1:%d send-proxy-v2
`, haPort, port))
	testenv.Nginx(t, fmt.Sprintf(`    server {
        listen 127.0.0.1:%d;
        proxy_pass 127.0.0.1:%d;
        proxy_protocol on;
    }`, ngxPort, port))
	for _, p := range []int{haPort, ngxPort} {
		testenv.Eventually(t, fmt.Sprintf("port %d listening", p), func() bool { return !refusedAt(t, p) })
	}

	// Through HAProxy from 127.0.0.2, then through nginx from 127.0.0.4.
	for _, tc := range []struct {
		front  string
		port   int
		client string
	}{{"haproxy", haPort, "127.0.0.2"}, {"nginx", ngxPort, "127.0.0.4"}} {
		c := dialFrom(t, tc.client, tc.port)
		if got := roundTrip(t, c, "hello\n"); got != "hello\n" {
			t.Fatalf("%s: echo %q", tc.front, got)
		}
		// The front proxy's connection of the listening probe above (from
		// 127.0.0.1) may still be open for a moment.
		var conns []spec.ActiveConn
		var err error
		if !testenv.Within(5*time.Second, func() bool {
			conns, err = streams.Running().ActiveConnections(1)
			return err == nil && len(conns) == 1 && conns[0].SourceIP == tc.client
		}) {
			t.Errorf("%s: live connections %+v (%v), want one from %s", tc.front, conns, err, tc.client)
		}
		c.Close()
		e := inst.waitLog(1, tc.client, func(e logEntry) bool { return e.SourceIP == tc.client })
		if e.Action != "allowed" || e.BytesSent != 6 {
			t.Errorf("%s: log entry %+v", tc.front, e)
		}
		if got := up.seen(); !slices.Contains(got, tc.client) {
			t.Errorf("%s: the upstream's PROXY headers name %v, want %s among them", tc.front, got, tc.client)
		}
	}

	// The ACL sees the client behind HAProxy.
	c := dialFrom(t, "127.0.0.3", haPort)
	expectClosed(t, c, 5*time.Second)
	inst.waitLog(1, "127.0.0.3 blocked by the ACL", func(e logEntry) bool {
		return e.SourceIP == "127.0.0.3" && e.Action == "blocked" && e.DisconnectReason == "acl_denied"
	})

	// Straight to Aegis: a source that is not a trusted proxy, with a
	// header claiming to be another client.
	for _, tc := range []struct {
		name, src, send, reason string
		within                  time.Duration
	}{
		{"untrusted", "127.0.0.5", "PROXY TCP4 127.0.0.2 127.0.0.1 5000 80\r\nhi", "proxy_header_untrusted", time.Second},
		{"garbage", "127.0.0.6", "GET / HTTP/1.0\r\n\r\n", "proxy_header_missing", time.Second},
		{"malformed", "127.0.0.7", "PROXY TCP4 999.0.0.1 127.0.0.1 5000 80\r\n", "proxy_header_invalid", time.Second},
		{"slowloris", "127.0.0.8", "PROXY TCP4 127.0.0.2 ", "proxy_header_invalid", 3 * time.Second},
	} {
		start := time.Now()
		c := dialFrom(t, tc.src, port)
		if _, err := c.Write([]byte(tc.send)); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, c, tc.within)
		if tc.name == "slowloris" && time.Since(start) < 900*time.Millisecond {
			t.Errorf("slowloris: closed after %v, before the 1s proxy_header_timeout_seconds", time.Since(start))
		}
		inst.waitLog(1, tc.name, func(e logEntry) bool {
			return e.SourceIP == tc.src && e.Action == "blocked" && e.DisconnectReason == tc.reason
		})
	}
	if st := inst.stats()[1]; st.BlockedConnections < 5 {
		t.Errorf("blocked_connections %d, want at least 5", st.BlockedConnections)
	}
	// (127.0.0.1: the checks above that the front proxies listen.)
	for _, src := range up.seen() {
		if src != "127.0.0.1" && src != "127.0.0.2" && src != "127.0.0.4" {
			t.Errorf("the upstream saw %v, want only clients through the front proxies", up.seen())
		}
	}
}

// TestAcceptProxyProtocolUDPBehindFrontProxy puts a UDP stream behind a
// front proxy that sends a PROXY v2 header on every datagram: the stream
// takes it off (accept_proxy_protocol required) and sends its own, naming
// the client that sent to the front. A datagram with a header from a
// source that is not trusted is dropped, counted and logged.
func TestAcceptProxyProtocolUDPBehindFrontProxy(t *testing.T) {
	checkNoLeaks(t)
	var mu sync.Mutex
	var got []string
	upSrv := loopback.ServeUDP(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(p)))
		if err != nil {
			return
		}
		payload := p[16+int(binary.BigEndian.Uint16(p[14:16])):]
		mu.Lock()
		got = append(got, h.SourceAddr.(*net.UDPAddr).IP.String()+" "+string(payload))
		mu.Unlock()
		_, _ = pc.WriteToUDPAddrPort(payload, from)
	})
	back := freePort(t)
	h := host(2, back, upSrv.Port, map[string]any{"accept_proxy_protocol": "required", "trusted_proxy_cidrs": []string{"127.0.0.1"}})
	h["protocol"] = "udp"
	h["proxy_protocol_version"] = 2
	inst := startCaddy(t, hosts(h))
	// The front proxy: a relay that sends each datagram on with a v2
	// header naming its client, as a front Aegis (another process: one
	// process refuses to relay into its own stream) and caddy-l4 do, and
	// hands the reply back.
	toBack, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: back})
	if err != nil {
		t.Fatal(err)
	}
	defer toBack.Close()
	frontSrv := loopback.ServeUDP(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		hdr := &proxyproto.Header{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.UDPv4,
			SourceAddr: net.UDPAddrFromAddrPort(from), DestinationAddr: pc.LocalAddr()}
		b, err := hdr.Format()
		if err != nil {
			return
		}
		if _, err := toBack.Write(append(b, p...)); err != nil {
			return
		}
		buf := make([]byte, 2048)
		_ = toBack.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := toBack.Read(buf); err == nil {
			_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	front := frontSrv.Port
	c := udpDial(t, "127.0.0.2", "127.0.0.1", front)
	if r := udpRoundTrip(t, c, "query", 5*time.Second); r != "query" {
		t.Fatalf("reply %q, want query", r)
	}
	// The entry's next datagram: its header is only measured and taken off.
	if r := udpRoundTrip(t, c, "again", 5*time.Second); r != "again" {
		t.Fatalf("reply %q, want again", r)
	}
	mu.Lock()
	if len(got) != 2 || got[0] != "127.0.0.2 query" || got[1] != "127.0.0.2 again" {
		t.Errorf("the upstream got %q, want the client 127.0.0.2 and the payload alone, twice", got)
	}
	mu.Unlock()

	// Straight to the back stream from a source it does not trust.
	hdr := &proxyproto.Header{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.UDPv4,
		SourceAddr: &net.UDPAddr{IP: net.IPv4(10, 9, 9, 9), Port: 53}, DestinationAddr: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: back}}
	b, err := hdr.Format()
	if err != nil {
		t.Fatal(err)
	}
	c2 := udpDial(t, "127.0.0.5", "127.0.0.1", back)
	if r := udpRoundTrip(t, c2, string(b)+"spoof", 300*time.Millisecond); r != "" {
		t.Errorf("a datagram from an untrusted source got reply %q", r)
	}
	inst.waitLog(2, "127.0.0.5 untrusted", func(e logEntry) bool {
		return e.SourceIP == "127.0.0.5" && e.Action == "blocked" && e.DisconnectReason == "proxy_header_untrusted"
	})
	inst.waitStats(2, "one blocked", func(s spec.Status) bool { return s.BlockedConnections >= 1 })
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 {
		t.Errorf("the upstream got %q after the untrusted datagram", got)
	}
}

// TestAcceptProxyProtocolAppliesLive turns accept_proxy_protocol on and off
// on a listening stream through the management functions the API calls:
// each new connection takes the setting then in force, and an open one
// keeps its own.
func TestAcceptProxyProtocolAppliesLive(t *testing.T) {
	checkNoLeaks(t)
	up := newHeaderUpstream(t)
	inst := startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	ctx := context.Background()
	port := freePort(t)
	s := apiStream(2, port, up.Port)
	s.ProxyProtocolVersion = 2
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	const header = "PROXY TCP4 192.0.2.44 127.0.0.1 4000 80\r\n"
	// Off: the header is the client's data, and the upstream's own header
	// names the connection's source.
	open := dial(t, port)
	if got := roundTrip(t, open, header+"hi\n"); got != header+"hi\n" {
		t.Fatalf("off: echo %q", got)
	}

	s.AcceptProxyProtocol, s.TrustedProxyCIDRs = "required", []string{"127.0.0.1"}
	if _, err := streams.UpdateHost(ctx, 2, s); err != nil {
		t.Fatal(err)
	}
	c := dial(t, port)
	if _, err := c.Write([]byte(header)); err != nil {
		t.Fatal(err)
	}
	if got := roundTrip(t, c, "hi\n"); got != "hi\n" {
		t.Fatalf("required: echo %q, want the bytes after the header alone", got)
	}
	c.Close()
	inst.waitLog(2, "the header's client", func(e logEntry) bool { return e.SourceIP == "192.0.2.44" })
	// The connection opened before the edit keeps reading no header.
	if got := roundTrip(t, open, header); got != header {
		t.Fatalf("the open connection after the edit: echo %q", got)
	}

	s.AcceptProxyProtocol, s.TrustedProxyCIDRs = "off", nil
	if _, err := streams.UpdateHost(ctx, 2, s); err != nil {
		t.Fatal(err)
	}
	c = dial(t, port)
	if got := roundTrip(t, c, header); got != header {
		t.Fatalf("off again: echo %q", got)
	}
	seen := up.seen()
	if want := []string{"127.0.0.1", "192.0.2.44", "127.0.0.1"}; fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("the upstream's PROXY headers name %v, want %v", seen, want)
	}
}
