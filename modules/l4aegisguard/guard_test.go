package l4aegisguard_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// provision provisions the handler in a context without a config, as a
// plain layer4 config would, and cleans it up with the test.
func provision(t *testing.T, h *l4aegisguard.Handler) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := h.Provision(ctx); err != nil {
		cancel()
		return err
	}
	t.Cleanup(func() {
		_ = h.Cleanup()
		cancel()
	})
	return nil
}

func TestAllowed(t *testing.T) {
	type probe struct {
		ip    string
		allow bool
	}
	cases := []struct {
		name        string
		white, deny []string
		probes      []probe
	}{
		{"empty lists allow all", nil, nil, []probe{
			{"10.1.2.3", true}, {"::1", true}, {"::ffff:192.0.2.1", true}, {"2001:db8::1", true},
		}},
		{"v4 whitelist", []string{"10.0.0.0/8"}, nil, []probe{
			{"10.1.2.3", true}, {"10.255.255.255", true}, {"11.0.0.1", false},
			{"::ffff:10.1.2.3", true}, // IPv4-mapped source on a dual-stack socket
			{"::ffff:11.0.0.1", false}, {"::1", false}, {"2001:db8::1", false},
		}},
		{"bare v4 means /32", []string{"192.0.2.7"}, nil, []probe{
			{"192.0.2.7", true}, {"::ffff:192.0.2.7", true}, {"192.0.2.8", false}, {"192.0.2.6", false},
		}},
		{"mapped whitelist entries fold to v4", []string{"::ffff:10.0.0.0/104", "::ffff:192.0.2.7"}, nil, []probe{
			{"10.9.9.9", true}, {"::ffff:10.9.9.9", true}, {"192.0.2.7", true}, {"11.0.0.1", false}, {"192.0.2.8", false},
		}},
		{"v6 whitelist", []string{"2001:db8::/32"}, nil, []probe{
			{"2001:db8::1", true}, {"2001:db8:ffff::1", true}, {"2001:db9::1", false}, {"10.0.0.1", false}, {"::ffff:10.0.0.1", false},
		}},
		{"bare v6 means /128", []string{"2001:db8::5"}, nil, []probe{
			{"2001:db8::5", true}, {"2001:db8::6", false},
		}},
		{"blacklist only", nil, []string{"10.0.0.0/8", "2001:db8::/32"}, []probe{
			{"10.0.0.1", false}, {"::ffff:10.0.0.1", false}, {"2001:db8::1", false},
			{"192.0.2.1", true}, {"::ffff:192.0.2.1", true}, {"::1", true},
		}},
		{"bare mapped blacklist entry", nil, []string{"::ffff:192.0.2.7"}, []probe{
			{"192.0.2.7", false}, {"::ffff:192.0.2.7", false}, {"192.0.2.8", true},
		}},
		{"blacklist wins inside whitelist", []string{"10.0.0.0/8", "::1"}, []string{"10.0.0.5", "10.1.0.0/16"}, []probe{
			{"10.0.0.5", false}, {"::ffff:10.0.0.5", false}, {"10.1.2.3", false},
			{"10.0.0.6", true}, {"::1", true}, {"11.0.0.1", false}, {"::2", false},
		}},
		{"spaces around entries", []string{" 10.0.0.0/8 "}, []string{"\t10.0.0.1"}, []probe{
			{"10.0.0.2", true}, {"10.0.0.1", false},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := &l4aegisguard.Handler{WhitelistCIDRs: tc.white, BlacklistCIDRs: tc.deny}
			if err := provision(t, h); err != nil {
				t.Fatal(err)
			}
			for _, p := range tc.probes {
				if got := h.Allowed(netip.MustParseAddr(p.ip)); got != p.allow {
					t.Errorf("whitelist %q blacklist %q: Allowed(%s) = %v, want %v", tc.white, tc.deny, p.ip, got, p.allow)
				}
			}
		})
	}
}

func TestProvisionErrors(t *testing.T) {
	cases := []struct {
		h    l4aegisguard.Handler
		want string
	}{
		{l4aegisguard.Handler{WhitelistCIDRs: []string{"10.0.0.0/8", "10.0.0.300/8"}}, `whitelist_cidrs "10.0.0.300/8"`},
		{l4aegisguard.Handler{BlacklistCIDRs: []string{"not-an-ip"}}, `blacklist_cidrs "not-an-ip"`},
		{l4aegisguard.Handler{BlacklistCIDRs: []string{"fe80::1%eth0"}}, `blacklist_cidrs "fe80::1%eth0"`},
		{l4aegisguard.Handler{WhitelistCIDRs: []string{""}}, `whitelist_cidrs ""`},
		{l4aegisguard.Handler{MaxConnections: -1}, "max_connections -1"},
		{l4aegisguard.Handler{UploadRateBytes: -5}, "upload_rate_bytes -5"},
		{l4aegisguard.Handler{DownloadRateBytes: -6}, "download_rate_bytes -6"},
		{l4aegisguard.Handler{IdleTimeout: caddy.Duration(-time.Second)}, "idle_timeout -1s"},
		{l4aegisguard.Handler{MaxConnectionsPerIP: -2}, "max_connections_per_ip -2"},
		{l4aegisguard.Handler{ConnectionRatePerIP: -3}, "connection_rate_per_ip -3"},
		{l4aegisguard.Handler{ConnectionRateWindow: caddy.Duration(-time.Second)}, "connection_rate_window -1s"},
		{l4aegisguard.Handler{AcceptProxyProtocol: "yes"}, `accept_proxy_protocol "yes": must be off, optional or required`},
		{l4aegisguard.Handler{AcceptProxyProtocol: "required"}, "trusted_proxy_cidrs: required when accept_proxy_protocol is required"},
		{l4aegisguard.Handler{AcceptProxyProtocol: "optional", TrustedProxyCIDRs: []string{"lb"}}, `trusted_proxy_cidrs "lb"`},
		{l4aegisguard.Handler{ProxyHeaderTimeout: caddy.Duration(-time.Second)}, "proxy_header_timeout -1s"},
	}
	for _, tc := range cases {
		h := tc.h
		err := provision(t, &h)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Provision(%+v): got error %v, want one containing %q", tc.h, err, tc.want)
		}
	}
}

// chain runs a guard (and an aegis_proxy to an echo upstream) on a loopback
// listener, the way a plain layer4 server would: each accepted connection
// goes through layer4.WrapConnection and the compiled handler chain.
type chain struct {
	guard *l4aegisguard.Handler
	addr  string
}

// startChain provisions guard and a proxy to upstream, and serves listen
// ("127.0.0.1:0" or "[::1]:0"). wrap, when set, replaces each accepted
// connection before the chain sees it.
func startChain(t *testing.T, listen, upstream string, guard *l4aegisguard.Handler, wrap func(net.Conn) net.Conn) *chain {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	proxy := &l4aegisproxy.Handler{Upstream: upstream, DialTimeout: caddy.Duration(2 * time.Second)}
	if err := guard.Provision(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := proxy.Provision(ctx); err != nil {
		_ = guard.Cleanup()
		cancel()
		t.Fatal(err)
	}
	h := layer4.Handlers{guard, proxy}.Compile()
	// Registered first, so it runs after the server's own cleanup has
	// closed the connections and waited for their handlers.
	t.Cleanup(func() {
		_ = proxy.Cleanup()
		_ = guard.Cleanup()
		cancel()
	})
	srv := loopback.Serve(t, listen, func(conn net.Conn) {
		in := conn
		if wrap != nil {
			in = wrap(conn)
		}
		_ = h.Handle(layer4.WrapConnection(in, nil, zap.NewNop()))
	})
	c := &chain{guard: guard, addr: srv.Addr}
	return c
}

// On a plain layer4 route (no streams app), the guard's Cleanup (a
// reload) closes its open connections and has written their log lines by
// the time it returns, even when the rest of the chain takes a while to
// end: none is queued after the log writer stopped.
func TestGuardCleanupLogsOpenConnections(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	guard := &l4aegisguard.Handler{LogConnections: true}
	if err := guard.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	var logged atomic.Int64
	guard.State().SetLogSink(func(streamstate.LogRecord) bool { logged.Add(1); return true })
	read := make(chan struct{}, 1)
	h := layer4.Handlers{guard, slowEnd{read}}.Compile()
	srv := loopback.Serve(t, "127.0.0.1:0", func(conn net.Conn) {
		_ = h.Handle(layer4.WrapConnection(conn, nil, zap.NewNop()))
	})
	c := dialFrom(t, "", srv.Addr)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	<-read
	_ = guard.Cleanup()
	if n := logged.Load(); n != 1 {
		t.Fatalf("%d log lines written when Cleanup returned, want the open connection's", n)
	}
}

// slowEnd reads its connection until it is closed, then takes 200 ms to
// return, as a relay with a slow end would.
type slowEnd struct{ read chan<- struct{} }

func (s slowEnd) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	b := make([]byte, 16)
	for {
		if _, err := cx.Read(b); err != nil {
			break
		}
		s.read <- struct{}{}
	}
	time.Sleep(200 * time.Millisecond)
	return nil
}

// echoUpstream serves an echo on listen and returns its address.
func echoUpstream(t *testing.T, listen string) string {
	t.Helper()
	return loopback.Serve(t, listen, func(c net.Conn) { _, _ = io.Copy(c, c) }).Addr
}

func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func echoes(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if got := testenv.RoundTrip(t, c, msg); got != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// refused asserts that the chain closes c at once without relaying.
func refused(t *testing.T, c net.Conn) {
	t.Helper()
	_, _ = c.Write([]byte("ping"))
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, err := c.Read(make([]byte, 16))
	if n != 0 || err == nil {
		t.Fatalf("want the connection closed without an answer, got n=%d err=%v", n, err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection was not closed within 3s")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// remoteAs makes a connection report another remote address, as a
// dual-stack listener reports IPv4 clients (::ffff:a.b.c.d).
type remoteAs struct {
	net.Conn
	addr net.Addr
}

func (c remoteAs) RemoteAddr() net.Addr { return c.addr }

func TestGuardACLRealConnections(t *testing.T) {
	up := echoUpstream(t, "127.0.0.1:0")

	// IPv4: only 127.0.0.1 (a bare IP) and 127.0.0.16/28, minus 127.0.0.17.
	g4 := &l4aegisguard.Handler{WhitelistCIDRs: []string{"127.0.0.1", "127.0.0.16/28"}, BlacklistCIDRs: []string{"127.0.0.17"}}
	c4 := startChain(t, "127.0.0.1:0", up, g4, nil)
	ok1, ok2 := dialFrom(t, "127.0.0.1", c4.addr), dialFrom(t, "127.0.0.18", c4.addr)
	echoes(t, ok1, "from 127.0.0.1")
	echoes(t, ok2, "from 127.0.0.18")
	refused(t, dialFrom(t, "127.0.0.2", c4.addr))
	refused(t, dialFrom(t, "127.0.0.17", c4.addr))
	st := g4.State()
	if n := st.Active.Load(); n != 2 {
		t.Fatalf("IPv4 chain: %d active connections, want the 2 allowed ones", n)
	}
	ok1.Close()
	ok2.Close()
	waitFor(t, "no active connection", func() bool { return st.Active.Load() == 0 })
	if tot, blk := st.Total.Load(), st.Blocked.Load(); tot != 4 || blk != 2 {
		t.Fatalf("IPv4 chain: total %d blocked %d, want 4 and 2", tot, blk)
	}

	// IPv6: a bare ::1 in the blacklist refuses the loopback client.
	g6 := &l4aegisguard.Handler{BlacklistCIDRs: []string{"::1"}}
	c6 := startChain(t, "[::1]:0", up, g6, nil)
	refused(t, dialFrom(t, "", c6.addr))
	g6w := &l4aegisguard.Handler{WhitelistCIDRs: []string{"::1/128"}}
	c6w := startChain(t, "[::1]:0", up, g6w, nil)
	echoes(t, dialFrom(t, "", c6w.addr), "from ::1")

	// IPv4-mapped sources, as a dual-stack listener reports them, match
	// IPv4 entries: the accepted connections claim ::ffff:127.0.0.x.
	mapped := func(last byte) func(net.Conn) net.Conn {
		return func(c net.Conn) net.Conn {
			return remoteAs{c, &net.TCPAddr{IP: net.ParseIP(fmt.Sprintf("::ffff:127.0.0.%d", last)), Port: 40000}}
		}
	}
	gm := &l4aegisguard.Handler{WhitelistCIDRs: []string{"127.0.0.0/29"}, BlacklistCIDRs: []string{"127.0.0.5"}}
	cmAllowed := startChain(t, "127.0.0.1:0", up, gm, mapped(4))
	echoes(t, dialFrom(t, "", cmAllowed.addr), "mapped 127.0.0.4")
	gm2 := &l4aegisguard.Handler{WhitelistCIDRs: []string{"127.0.0.0/29"}, BlacklistCIDRs: []string{"127.0.0.5"}}
	cmDenied := startChain(t, "127.0.0.1:0", up, gm2, mapped(5))
	refused(t, dialFrom(t, "", cmDenied.addr))
	gm3 := &l4aegisguard.Handler{WhitelistCIDRs: []string{"127.0.0.0/29"}}
	cmOutside := startChain(t, "127.0.0.1:0", up, gm3, mapped(9))
	refused(t, dialFrom(t, "", cmOutside.addr))
}

func TestGuardMaxConnectionsAndCounters(t *testing.T) {
	up := echoUpstream(t, "127.0.0.1:0")
	g := &l4aegisguard.Handler{MaxConnections: 2}
	c := startChain(t, "127.0.0.1:0", up, g, nil)
	st := g.State()

	a := dialFrom(t, "", c.addr)
	echoes(t, a, "aaaa")
	b := dialFrom(t, "", c.addr)
	echoes(t, b, "bb")
	refused(t, dialFrom(t, "", c.addr))
	if n := st.Active.Load(); n != 2 {
		t.Fatalf("active = %d, want 2", n)
	}
	a.Close()
	waitFor(t, "one active connection", func() bool { return st.Active.Load() == 1 })
	cc := dialFrom(t, "", c.addr)
	echoes(t, cc, "c")
	echoes(t, b, "bb")
	b.Close()
	cc.Close()
	waitFor(t, "no active connection", func() bool { return st.Active.Load() == 0 })
	// 4+2+1+2 bytes each way; the refused connection's "ping" never counts.
	if tot := st.SinceReload(); tot.BytesSent != 9 || tot.BytesReceived != 9 {
		t.Fatalf("bytes sent %d received %d, want 9 and 9", tot.BytesSent, tot.BytesReceived)
	}
	if tot, blk := st.Total.Load(), st.Blocked.Load(); tot != 4 || blk != 1 {
		t.Fatalf("total %d blocked %d, want 4 and 1", tot, blk)
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	var h l4aegisguard.Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`aegis_guard {
		stream_id 7
		stream_name postgres
		whitelist_cidrs 10.0.0.0/8 192.0.2.7
		whitelist_cidrs ::1
		blacklist_cidrs 10.0.0.5
		max_connections 100
		max_connections_per_ip 5
		connection_rate_per_ip 10
		connection_rate_window 30s
		upload_rate_bytes 1048576
		download_rate_bytes 2097152
		idle_timeout 90s
		log_connections
		accept_proxy_protocol optional
		trusted_proxy_cidrs 10.1.0.0/16
		trusted_proxy_cidrs 10.2.0.1
		proxy_header_timeout 2s
	}`))
	if err != nil {
		t.Fatal(err)
	}
	want := l4aegisguard.Handler{
		StreamID:             7,
		StreamName:           "postgres",
		WhitelistCIDRs:       []string{"10.0.0.0/8", "192.0.2.7", "::1"},
		BlacklistCIDRs:       []string{"10.0.0.5"},
		MaxConnections:       100,
		MaxConnectionsPerIP:  5,
		ConnectionRatePerIP:  10,
		ConnectionRateWindow: caddy.Duration(30 * time.Second),
		UploadRateBytes:      1 << 20,
		DownloadRateBytes:    2 << 20,
		IdleTimeout:          caddy.Duration(90 * time.Second),
		LogConnections:       true,

		AcceptProxyProtocol: "optional",
		TrustedProxyCIDRs:   []string{"10.1.0.0/16", "10.2.0.1"},
		ProxyHeaderTimeout:  caddy.Duration(2 * time.Second),
	}
	if fmt.Sprintf("%+v", h) != fmt.Sprintf("%+v", want) {
		t.Fatalf("got  %+v\nwant %+v", h, want)
	}

	var off l4aegisguard.Handler
	if err := off.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_guard {\n log_connections false\n}")); err != nil || off.LogConnections {
		t.Fatalf("log_connections false: %+v, %v", off, err)
	}
	var empty l4aegisguard.Handler
	if err := empty.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_guard")); err != nil {
		t.Fatalf("no options: %v", err)
	}

	for _, tc := range []struct{ in, want string }{
		{"aegis_guard {\n stream_id seven\n}", `stream_id "seven"`},
		{"aegis_guard {\n stream_id 1 2\n}", "stream_id"},
		{"aegis_guard {\n max_connections many\n}", `max_connections "many"`},
		{"aegis_guard {\n upload_rate_bytes 1.5\n}", `upload_rate_bytes "1.5"`},
		{"aegis_guard {\n download_rate_bytes 1MB\n}", `download_rate_bytes "1MB"`},
		{"aegis_guard {\n idle_timeout soon\n}", `idle_timeout "soon"`},
		{"aegis_guard {\n connection_rate_window soon\n}", `connection_rate_window "soon"`},
		{"aegis_guard {\n max_connections_per_ip x\n}", `max_connections_per_ip "x"`},
		{"aegis_guard {\n idle_timeout\n}", "idle_timeout"},
		{"aegis_guard {\n log_connections maybe\n}", `log_connections "maybe"`},
		{"aegis_guard {\n log_connections true false\n}", `log_connections "true false"`},
		{"aegis_guard {\n max_connections 1 2\n}", "max_connections"},
		{"aegis_guard {\n idle_timeout 1s 2s\n}", "idle_timeout"},
		{"aegis_guard {\n stream_name a b\n}", "stream_name"},
		{"aegis_guard {\n whitelist_cidrs\n}", "whitelist_cidrs"},
		{"aegis_guard {\n blacklist_cidrs\n}", "blacklist_cidrs"},
		{"aegis_guard {\n stream_name\n}", "stream_name"},
		{"aegis_guard {\n rate_limit 5\n}", `"rate_limit"`},
		{"aegis_guard {\n accept_proxy_protocol always\n}", `accept_proxy_protocol "always": must be off, optional or required`},
		{"aegis_guard {\n proxy_header_timeout soon\n}", `proxy_header_timeout "soon"`},
		{"aegis_guard {\n trusted_proxy_cidrs\n}", "trusted_proxy_cidrs"},
		{"aegis_guard extra", "extra"},
		{"aegis_guard {\n max_connections 1\n max_connections 2\n}", `aegis_guard option "max_connections" given twice`},
		{"aegis_guard {\n log_connections\n log_connections false\n}", `aegis_guard option "log_connections" given twice`},
		{"aegis_guard {\n idle_timeout 1s {\n x\n }\n}", `aegis_guard option "idle_timeout": blocks are not supported`},
		{"aegis_guard {\n whitelist_cidrs 10.0.0.0/8 {\n ::1\n }\n}", `aegis_guard option "whitelist_cidrs": blocks are not supported`},
		{"aegis_guard {\n log_connections {\n x\n }\n}", `aegis_guard option "log_connections": blocks are not supported`},
	} {
		var h l4aegisguard.Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got error %v, want one naming %s", tc.in, err, tc.want)
		}
	}
}

// TestGuardProxyHeaderPlainLayer4: in a plain layer4 chain, a guard with
// accept_proxy_protocol applies its access lists to the client the header
// names, and the session and the PROXY header's client go on to the
// relay; a header from outside trusted_proxy_cidrs is refused.
func TestGuardProxyHeaderPlainLayer4(t *testing.T) {
	up := echoUpstream(t, "127.0.0.1:0")
	g := &l4aegisguard.Handler{AcceptProxyProtocol: "required", TrustedProxyCIDRs: []string{"127.0.0.1"},
		BlacklistCIDRs: []string{"192.0.2.66"}}
	c := startChain(t, "127.0.0.1:0", up, g, nil)

	ok := dialFrom(t, "127.0.0.1", c.addr)
	if _, err := ok.Write([]byte("PROXY TCP4 192.0.2.5 127.0.0.1 4000 80\r\n")); err != nil {
		t.Fatal(err)
	}
	echoes(t, ok, "behind a proxy")
	var sources []string
	g.State().Sessions(func(ss *streamstate.Session) bool {
		sources = append(sources, ss.Source.String())
		return true
	})
	if len(sources) != 1 || sources[0] != "192.0.2.5:4000" {
		t.Errorf("open sessions from %v, want the header's client 192.0.2.5:4000", sources)
	}

	denied := dialFrom(t, "127.0.0.1", c.addr)
	if _, err := denied.Write([]byte("PROXY TCP4 192.0.2.66 127.0.0.1 4000 80\r\n")); err != nil {
		t.Fatal(err)
	}
	refused(t, denied)
	refused(t, dialFrom(t, "127.0.0.2", c.addr))
	st := g.State()
	if acl, untrusted := st.BlockedBy(streamstate.BlockACL), st.BlockedBy(streamstate.BlockProxyHeaderUntrusted); acl != 1 || untrusted != 1 {
		t.Errorf("blocked: acl_denied %d, proxy_header_untrusted %d; want 1 and 1", acl, untrusted)
	}
}
