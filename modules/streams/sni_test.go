package streams_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// tlsEchoUpstream is a TLS server with a certificate for name (serial
// serial) that echoes.
func tlsEchoUpstream(t *testing.T, ca *testCA, name string, serial int64) int {
	t.Helper()
	chain, key := ca.leaf(t, name, serial)
	cert, err := tls.X509KeyPair([]byte(chain), []byte(key))
	if err != nil {
		t.Fatal(err)
	}
	up := newUpstream(t, func(c net.Conn) {
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		defer tc.Close()
		_, _ = io.Copy(tc, tc)
	})
	return up.Port
}

// TestSNISharedPort: TCP streams on one port told apart by server name.
// A stream whose sni matches terminates TLS with its own certificate, or
// passes the TLS bytes through to its TLS upstream; other names and
// clients without TLS go to the stream without sni; with none, they are
// closed (sni_no_match). Adding streams keeps the shared socket and the
// open connections.
func TestSNISharedPort(t *testing.T) {
	checkNoLeaks(t)
	ca := newTestCA(t)
	plain := newUpstream(t, echo)
	passUp := tlsEchoUpstream(t, ca, "x.b.test", 202)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(9, freePort(t), plain.Port, nil)))
	ctx := context.Background()
	chain, key := ca.leaf(t, "a.test", 101)
	cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "a", Certificate: chain, PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}

	// The default stream first, on a listener of its own; then the
	// streams with sni move it to the shared port.
	def := apiStream(3, port, plain.Port)
	if _, err := streams.CreateHost(ctx, def); err != nil {
		t.Fatal(err)
	}
	held := dial(t, port)
	if got := roundTrip(t, held, "before"); got != "before" {
		t.Fatalf("default stream: %q", got)
	}
	term := apiStream(1, port, plain.Port)
	term.SNI, term.SSLEnabled, term.SSLCertID = []string{"a.test"}, true, cert.ID
	pass := apiStream(2, port, passUp)
	pass.SNI = []string{"*.b.test"}
	for _, s := range []spec.Stream{term, pass} {
		if _, err := streams.CreateHost(ctx, s); err != nil {
			t.Fatalf("stream %d: %v", s.ID, err)
		}
	}
	// Overlapping names are refused, naming both streams.
	clash := apiStream(4, port, plain.Port)
	clash.SNI = []string{"y.b.test"}
	if _, err := streams.CreateHost(ctx, clash); err == nil || !strings.Contains(err.Error(), `sni "y.b.test": overlaps "*.b.test" of stream 2 ("api-2")`) {
		t.Errorf("an overlapping name: %v", err)
	}
	second := apiStream(5, port, plain.Port)
	if _, err := streams.CreateHost(ctx, second); err == nil || !strings.Contains(err.Error(), "overlaps stream 3") {
		t.Errorf("a second stream without sni: %v", err)
	}

	c, serial := tlsDial(t, ca, port, "a.test")
	if serial != 101 || roundTrip(t, c, "terminated") != "terminated" {
		t.Errorf("a.test: certificate serial %d, want 101 (the stream's own)", serial)
	}
	c, serial = tlsDial(t, ca, port, "x.b.test")
	if serial != 202 || roundTrip(t, c, "passed") != "passed" {
		t.Errorf("x.b.test: certificate serial %d, want 202 (the upstream's: passed through)", serial)
	}
	if got := roundTrip(t, dial(t, port), "no tls"); got != "no tls" {
		t.Errorf("a client without TLS: %q, want the default stream's echo", got)
	}
	if got := roundTrip(t, held, "after"); got != "after" {
		t.Errorf("the default stream's open connection after the move: %q", got)
	}
	// Another name goes to the default stream: its plain upstream echoes
	// the ClientHello, which is no TLS answer.
	before := inst.stats()[3].TotalConnections
	if _, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: ca.pool, ServerName: "c.test"}); err == nil {
		t.Error("c.test: a TLS handshake through the default stream's echo")
	}
	inst.waitStats(3, "c.test's connection", func(s spec.Status) bool { return s.TotalConnections > before })

	// Without the default stream: sni_no_match. The shared socket stays.
	if err := streams.DeleteHost(ctx, 3); err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	raw, err := net.DialTimeout("tcp", listen, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc := tls.Client(raw, &tls.Config{ServerName: "c.test", RootCAs: ca.pool})
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err == nil || testenv.IsTimeout(err) {
		t.Errorf("c.test with no default stream: %v, want closed", err)
	}
	inst.waitLog(0, "disconnect_reason sni_no_match", func(e logEntry) bool { return e.DisconnectReason == "sni_no_match" })
	if n := streams.SNINoMatch(listen); n != 1 {
		t.Errorf("sni_no_match count %d, want 1", n)
	}
	if v := inst.scrape().value("aegis_sni_no_match_total", "listen", listen); v != 1 {
		t.Errorf("aegis_sni_no_match_total = %v, want 1", v)
	}
	// Adding a stream keeps the port's listener (its count goes on) and
	// the open connections.
	other := apiStream(6, port, plain.Port)
	other.SNI = []string{"d.test"}
	if _, err := streams.CreateHost(ctx, other); err != nil {
		t.Fatal(err)
	}
	if got := roundTrip(t, c, "still"); got != "still" {
		t.Errorf("x.b.test's open connection after an add: %q", got)
	}
	if n := streams.SNINoMatch(listen); n != 1 {
		t.Errorf("sni_no_match count %d after an add, want 1 still (same listener)", n)
	}
	if _, serial := tlsDial(t, ca, port, "A.TEST"); serial != 101 {
		t.Errorf("A.TEST: serial %d, want 101 (names are not case-sensitive)", serial)
	}
	// An edit of a stream's names applies in place, to new connections.
	pass.SNI = []string{"*.c.test"}
	if _, err := streams.UpdateHost(ctx, 2, pass); err != nil {
		t.Fatal(err)
	}
	ic, err := tls.Dial("tcp", listen, &tls.Config{ServerName: "y.c.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("y.c.test after the edit: %v", err)
	}
	if s := ic.ConnectionState().PeerCertificates[0].SerialNumber.Int64(); s != 202 {
		t.Errorf("y.c.test: serial %d, want 202 (stream 2's upstream)", s)
	}
	ic.Close()
	if got := roundTrip(t, c, "edited"); got != "edited" {
		t.Errorf("x.b.test's open connection after its stream's edit: %q", got)
	}
	before = streams.SNINoMatch(listen)
	if _, err := tls.Dial("tcp", listen, &tls.Config{RootCAs: ca.pool, ServerName: "x.b.test"}); err == nil {
		t.Error("x.b.test after its name went: a handshake")
	}
	testenv.Eventually(t, "x.b.test refused", func() bool { return streams.SNINoMatch(listen) == before+1 })
}

// TestSNIConfigReload: streams with sni from the config; a reload that
// adds one keeps the shared listener (its sni_no_match count goes on) and
// the open connections; the picked stream's access list applies.
func TestSNIConfigReload(t *testing.T) {
	checkNoLeaks(t)
	ca := newTestCA(t)
	passUp := tlsEchoUpstream(t, ca, "x.b.test", 202)
	port := freePort(t)
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	b := host(1, port, passUp, map[string]any{"sni": []string{"*.b.test"}})
	acl := host(2, port, passUp, map[string]any{"sni": []string{"acl.test"}, "whitelist_cidrs": []string{"10.0.0.0/8"}})
	inst := startCaddy(t, hosts(b, acl))
	c, serial := tlsDial(t, ca, port, "x.b.test")
	if serial != 202 {
		t.Fatalf("x.b.test: serial %d", serial)
	}
	if _, err := tls.Dial("tcp", listen, &tls.Config{RootCAs: ca.pool, ServerName: "acl.test"}); err == nil {
		t.Error("acl.test from 127.0.0.1: handshake passed a whitelist of 10.0.0.0/8")
	}
	inst.waitStats(2, "the refused connection", func(s spec.Status) bool { return s.BlockedConnections == 1 })
	if _, err := tls.Dial("tcp", listen, &tls.Config{RootCAs: ca.pool, ServerName: "none.test"}); err == nil {
		t.Error("none.test: a handshake with no stream for it")
	}
	testenv.Eventually(t, "one sni_no_match", func() bool { return streams.SNINoMatch(listen) == 1 })

	d := host(3, port, passUp, map[string]any{"sni": []string{"d.test"}})
	if err := inst.load(hosts(b, acl, d)); err != nil {
		t.Fatal(err)
	}
	if n := streams.SNINoMatch(listen); n != 1 {
		t.Errorf("sni_no_match count %d after the reload, want 1 (the same listener)", n)
	}
	if got := roundTrip(t, c, "kept"); got != "kept" {
		t.Errorf("open connection after the reload: %q", got)
	}
	// d.test's upstream serves x.b.test's certificate: passed through.
	tc, err := tls.Dial("tcp", listen, &tls.Config{RootCAs: ca.pool, ServerName: "d.test", InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("d.test after the reload: %v", err)
	}
	tc.Close()
	inst.waitStats(3, "d.test's connection", func(s spec.Status) bool { return s.TotalConnections == 1 })

	// Removing the streams closes the port.
	if err := inst.load(hosts(host(4, freePort(t), passUp, nil))); err != nil {
		t.Fatal(err)
	}
	if !refusedAt(t, port) {
		t.Error("the shared port listens after its streams went")
	}
}

// A stream with sni joins the port of a stream that serves alone: the
// shared socket that the new stream binds starts accepting only once the
// old stream has joined it too, so none of the old stream's clients is
// closed as sni_no_match while the new stream is stored.
func TestSNIJoinKeepsTheOtherStreamsClients(t *testing.T) {
	checkNoLeaks(t)
	plain := newUpstream(t, echo)
	port := freePort(t)
	startCaddy(t, hosts(host(9, freePort(t), plain.Port, nil)))
	ctx := context.Background()
	if _, err := streams.CreateHost(ctx, apiStream(3, port, plain.Port)); err != nil {
		t.Fatal(err)
	}
	var ok, bad atomic.Int64
	stop := testenv.Repeat(8, func() {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			_, err = testenv.TryRoundTrip(c, "hello plain client\n")
			c.Close()
		}
		if err != nil {
			bad.Add(1)
		} else {
			ok.Add(1)
		}
	})
	time.Sleep(200 * time.Millisecond)
	s := apiStream(1, port, plain.Port)
	s.SNI = []string{"a.test"}
	// The new stream's shared socket is bound; the plain stream has not
	// moved to it yet. A slow store commit leaves it so this long.
	defer streams.SetCreatedHook(func() { time.Sleep(150 * time.Millisecond) })()
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	stop()
	// A connection in the old listener's queue as it closes is reset by
	// the kernel (no tcp_migrate_req): a few may fail that way. None is
	// routed without its stream.
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	if n := streams.SNINoMatch(listen); n > 0 || ok.Load() == 0 {
		t.Errorf("the plain stream's clients while a stream with sni joined its port: %d closed as sni_no_match, %d failed, %d relayed; want none sni_no_match", n, bad.Load(), ok.Load())
	}
}
