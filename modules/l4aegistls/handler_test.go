package l4aegistls_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// sniRecorder is a certificate source that records the server names
// clients ask for.
type sniRecorder struct {
	*l4aegistls.StaticCert
	names chan string
}

func (s *sniRecorder) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	select {
	case s.names <- hello.ServerName:
	default:
	}
	return s.StaticCert.GetCertificate(hello)
}

// peerIs is a VerifyConnection that wants cert as the peer's certificate
// and name as the server name.
func peerIs(cert *tls.Certificate, name string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 || !cs.PeerCertificates[0].Equal(cert.Leaf) {
			return errors.New("peer certificate is not the expected one")
		}
		if cs.ServerName != name {
			return fmt.Errorf("server name %q, want %q", cs.ServerName, name)
		}
		return nil
	}
}

func TestHandshakeAndRelay(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "db.example.test")
	id := certID(t)
	src := &sniRecorder{StaticCert: l4aegistls.NewStaticCert(cert), names: make(chan string, 4)}
	l4aegistls.Register(id, src)
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{})

	tc, _, err := dialTLS(t, c.addr, "db.example.test", roots(cert), peerIs(cert, "db.example.test"))
	if err != nil {
		t.Fatal(err)
	}
	if got := <-src.names; got != "db.example.test" {
		t.Errorf("the certificate source got server name %q, want db.example.test", got)
	}
	if v := tc.ConnectionState().Version; v < tls.VersionTLS12 {
		t.Errorf("negotiated %s, want TLS 1.2 or later", tls.VersionName(v))
	}
	const msg = "SELECT 1; -- plain text at the upstream"
	echoes(t, tc, msg)
	if got := up.received(); got != msg {
		t.Fatalf("upstream got %q, want %q", got, msg)
	}

	// Half-close: the upstream sees the end, echoes nothing more and
	// closes; the client gets a clean end of stream (close_notify).
	if err := tc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := io.ReadAll(tc); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: read %q, %v; want a clean EOF", rest, err)
	}
	if r := c.reason(t); r != streamstate.ReasonClientClose {
		t.Errorf("disconnect reason %s, want client_close", r)
	}
	st := c.tls.Stats()
	if st.Succeeded != 1 || st.Failed != 0 || st.Rejected != 0 || st.InProgress != 0 {
		t.Errorf("stats %+v, want 1 success", st)
	}
	// The guard counts below TLS: wire bytes, records and handshake
	// included.
	if sent := c.guard.State().SinceReload().BytesSent; sent <= uint64(len(msg)) {
		t.Errorf("guard counted %d bytes sent, want the TLS wire bytes (> %d)", sent, len(msg))
	}
}

func TestHotReplacement(t *testing.T) {
	checkNoLeaks(t)
	certA, certB := newCert(t, "svc.test"), newCert(t, "svc.test")
	id := certID(t)
	sc := l4aegistls.NewStaticCert(certA)
	l4aegistls.Register(id, sc)
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{})
	pool := roots(certA, certB)

	c1, _, err := dialTLS(t, c.addr, "svc.test", pool, peerIs(certA, "svc.test"))
	if err != nil {
		t.Fatalf("client 1: %v", err)
	}
	echoes(t, c1, "one")

	sc.Store(certB)
	c2, _, err := dialTLS(t, c.addr, "svc.test", pool, peerIs(certB, "svc.test"))
	if err != nil {
		t.Fatalf("client 2, after Store: %v", err)
	}
	echoes(t, c2, "two")
	echoes(t, c1, "one, still") // client 1 keeps its session
	if !c1.ConnectionState().PeerCertificates[0].Equal(certA.Leaf) {
		t.Error("client 1's session changed certificate")
	}

	// Registering another source under the id works the same way.
	certC := newCert(t, "svc.test")
	l4aegistls.Register(id, l4aegistls.NewStaticCert(certC))
	c3, _, err := dialTLS(t, c.addr, "svc.test", roots(certC), peerIs(certC, "svc.test"))
	if err != nil {
		t.Fatalf("client 3, after Register: %v", err)
	}
	echoes(t, c3, "three")
	echoes(t, c2, "two, still")
}

func TestHandshakeTimeout(t *testing.T) {
	for _, tc := range []struct {
		name string
		idle time.Duration
	}{
		{"guard without idle timeout", 0},
		// The guard sets its idle timeout as the read deadline on every
		// read, over the handshake deadline: the context still ends it.
		{"guard idle timeout longer", 5 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeaks(t)
			id := certID(t)
			l4aegistls.Register(id, l4aegistls.NewStaticCert(newCert(t, "x.test")))
			up := echoUpstream(t)
			c := startChain(t, &l4aegistls.Handler{CertID: id, HandshakeTimeout: caddy.Duration(300 * time.Millisecond)}, up.addr,
				chainOpts{guard: &l4aegisguard.Handler{IdleTimeout: caddy.Duration(tc.idle)}})

			// Timed from before the dial: the server's clock starts after
			// it, so a late start here cannot make the close look early.
			dialed := time.Now()
			silent := dialRaw(t, c.addr)
			closedWithin(t, silent, 3*time.Second)
			took := time.Since(dialed)
			if took < 300*time.Millisecond || took > 2*time.Second {
				t.Errorf("closed after %s, want about 300ms", took)
			}
			if r := c.reason(t); r != streamstate.ReasonTLSHandshakeFailed {
				t.Errorf("disconnect reason %s, want tls_handshake_failed", r)
			}
			if st := c.tls.Stats(); st.Failed != 1 || st.Succeeded != 0 || st.InProgress != 0 {
				t.Errorf("stats %+v, want 1 failure", st)
			}
			if f := c.failures(); len(f) != 1 || !strings.Contains(f[0], "no handshake within handshake_timeout 300ms") {
				t.Errorf("failure log errors %q, want 1 naming handshake_timeout", f)
			}
		})
	}
}

func TestPlainTextClient(t *testing.T) {
	checkNoLeaks(t)
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(newCert(t, "x.test")))
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{})

	plain := dialRaw(t, c.addr)
	if _, err := plain.Write([]byte("GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	closedWithin(t, plain, 3*time.Second)
	if r := c.reason(t); r != streamstate.ReasonTLSHandshakeFailed {
		t.Errorf("disconnect reason %s, want tls_handshake_failed", r)
	}
	if st := c.tls.Stats(); st.Failed != 1 || st.Succeeded != 0 {
		t.Errorf("stats %+v, want 1 failure", st)
	}
	if got := up.received(); got != "" {
		t.Errorf("upstream got %q, want nothing", got)
	}
}

func TestMaxHandshakes(t *testing.T) {
	checkNoLeaks(t)
	const stream = 7001
	id := certID(t)
	cert := newCert(t, "x.test")
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := echoUpstream(t)
	newHandler := func() *l4aegistls.Handler {
		// All from one source: no per-source bound below the stream's.
		return &l4aegistls.Handler{CertID: id, StreamID: stream, MaxHandshakes: 2, MaxHandshakesPerIP: 2, HandshakeTimeout: caddy.Duration(time.Second)}
	}
	c1 := startChain(t, newHandler(), up.addr, chainOpts{})
	// A second chain of the same stream, as after a chain swap: it shares
	// the bound.
	c2 := startChain(t, newHandler(), up.addr, chainOpts{})

	stalled1, stalled2 := dialRaw(t, c1.addr), dialRaw(t, c1.addr)
	eventually(t, "2 handshakes in progress", func() bool {
		st, _ := l4aegistls.Stats(stream)
		return st.InProgress == 2
	})
	if st := c2.tls.Stats(); st.InProgress != 2 {
		t.Fatalf("the second handler sees %d handshakes in progress, want 2 (shared by stream_id)", st.InProgress)
	}

	third := dialRaw(t, c2.addr)
	// Queued, it would wait for a stalled handshake's 1s timeout.
	if took := closedWithin(t, third, 3*time.Second); took > 800*time.Millisecond {
		t.Errorf("third connection closed after %s, want at once", took)
	}
	if r := c2.reason(t); r != streamstate.ReasonTLSHandshakeFailed {
		t.Errorf("third connection: disconnect reason %s, want tls_handshake_failed", r)
	}
	if st, _ := l4aegistls.Stats(stream); st.Rejected != 1 || st.Failed != 0 || st.InProgress != 2 {
		t.Errorf("stats after the third %+v, want 1 rejected, 2 in progress", st)
	}

	closedWithin(t, stalled1, 3*time.Second)
	closedWithin(t, stalled2, 3*time.Second)
	eventually(t, "no handshake in progress", func() bool {
		st, _ := l4aegistls.Stats(stream)
		return st.InProgress == 0
	})
	later, _, err := dialTLS(t, c2.addr, "x.test", roots(cert), nil)
	if err != nil {
		t.Fatalf("a later connection: %v", err)
	}
	echoes(t, later, "later")
	want := l4aegistls.HandshakeStats{Succeeded: 1, Failed: 2, Rejected: 1}
	if st, ok := l4aegistls.Stats(stream); !ok || st != want {
		t.Errorf("Stats(%d) = %+v, %v; want %+v", stream, st, ok, want)
	}
}

// One source holds at most max_handshakes_per_ip handshakes in progress
// (by default an eighth of max_handshakes): the next one from it is closed
// at once, counted (Rejected, RejectedPerIP, the stream's blocked
// source_share) with the reason source_share, while a client from another
// source still completes its handshake.
func TestMaxHandshakesPerIP(t *testing.T) {
	checkNoLeaks(t)
	const stream = 7002
	id := certID(t)
	cert := newCert(t, "x.test")
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := echoUpstream(t)
	// 16 in all: 2 per source by default.
	c := startChain(t, &l4aegistls.Handler{CertID: id, StreamID: stream, MaxHandshakes: 16, HandshakeTimeout: caddy.Duration(2 * time.Second)}, up.addr, chainOpts{})
	stalled := []net.Conn{dialRaw(t, c.addr), dialRaw(t, c.addr)}
	eventually(t, "2 handshakes in progress", func() bool {
		st, _ := l4aegistls.Stats(stream)
		return st.InProgress == 2
	})
	third := dialRaw(t, c.addr)
	if took := closedWithin(t, third, 3*time.Second); took > 800*time.Millisecond {
		t.Errorf("third connection from the source closed after %s, want at once", took)
	}
	if r := c.reason(t); r != streamstate.ReasonSourceShare {
		t.Errorf("third connection: disconnect reason %s, want source_share", r)
	}
	// Another source completes its handshake meanwhile.
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	raw, err := d.Dial("tcp", c.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc := tls.Client(raw, &tls.Config{ServerName: "x.test", RootCAs: roots(cert)})
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("a client from 127.0.0.2 while 127.0.0.1 holds its share: %v", err)
	}
	_ = raw.SetDeadline(time.Time{})
	echoes(t, tc, "other source")
	st, _ := l4aegistls.Stats(stream)
	if st.Rejected != 1 || st.RejectedPerIP != 1 || st.Succeeded != 1 {
		t.Errorf("stats %+v, want 1 rejected (per IP), 1 succeeded", st)
	}
	if n := streamstate.Lookup(stream).BlockedBy(streamstate.BlockSourceShare); n != 1 {
		t.Errorf("blocked source_share = %d, want 1", n)
	}
	for _, s := range stalled {
		closedWithin(t, s, 4*time.Second)
	}
}

func TestNoCertificateRegistered(t *testing.T) {
	checkNoLeaks(t)
	id := certID(t)
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{})
	cert := newCert(t, "late.test")

	wantFail := func(what, errText string) {
		t.Helper()
		_, raw, err := dialTLS(t, c.addr, "late.test", roots(cert), nil)
		if err == nil {
			t.Fatalf("%s: handshake succeeded", what)
		}
		closedWithin(t, raw, 3*time.Second)
		if r := c.reason(t); r != streamstate.ReasonTLSHandshakeFailed {
			t.Errorf("%s: disconnect reason %s, want tls_handshake_failed", what, r)
		}
		f := c.failures()
		if len(f) == 0 || !strings.Contains(f[len(f)-1], errText) {
			t.Errorf("%s: failure log errors %q, want the last to contain %q", what, f, errText)
		}
	}
	wantFail("nothing registered", fmt.Sprintf("cert_id %d: no certificate registered", id))

	// Registered after provisioning: used from the next handshake on.
	sc := l4aegistls.NewStaticCert(cert)
	l4aegistls.Register(id, sc)
	tc, _, err := dialTLS(t, c.addr, "late.test", roots(cert), peerIs(cert, "late.test"))
	if err != nil {
		t.Fatalf("after Register: %v", err)
	}
	echoes(t, tc, "hello")

	sc.Store(nil)
	wantFail("nil stored", fmt.Sprintf("cert_id %d: no certificate stored", id))
	l4aegistls.Unregister(id)
	wantFail("unregistered", fmt.Sprintf("cert_id %d: no certificate registered", id))
	echoes(t, tc, "established connections are not affected")

	if st := c.tls.Stats(); st.Failed != 3 || st.Succeeded != 1 {
		t.Errorf("stats %+v, want 3 failures and 1 success", st)
	}
}

// A matcher may have read the start of the ClientHello: the handshake gets
// those bytes, and the handlers after aegis_tls do not.
func TestPrefetchedClientHello(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "x.test")
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{prefetch: 9})

	tc, _, err := dialTLS(t, c.addr, "x.test", roots(cert), peerIs(cert, "x.test"))
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, tc, "after a prefetch")
	if got := up.received(); got != "after a prefetch" {
		t.Errorf("upstream got %q, want only the plain text", got)
	}
}

// The upstream half-closes: the client gets close_notify and a FIN on the
// socket, and can still send.
func TestUpstreamHalfClose(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "x.test")
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := new(recorder)
	up.addr = loopback.Serve(t, "127.0.0.1:0", func(conn net.Conn) {
		if _, err := conn.Write([]byte("greeting")); err != nil {
			return
		}
		_ = conn.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(conn)
		up.record(b)
	}).Addr
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{halfClose: true})

	tc, raw, err := dialTLS(t, c.addr, "x.test", roots(cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(tc)
	if err != nil || string(got) != "greeting" {
		t.Fatalf("read %q, %v; want greeting and a clean EOF", got, err)
	}
	_ = raw.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := raw.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("socket after close_notify: read %d, %v; want EOF (half-closed)", n, err)
	}
	_ = raw.SetReadDeadline(time.Time{})

	if _, err := tc.Write([]byte("still sending")); err != nil {
		t.Fatal(err)
	}
	if err := tc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the upstream to get the client's bytes", func() bool { return up.received() == "still sending" })
	if r := c.reason(t); r != streamstate.ReasonUpstreamClose {
		t.Errorf("disconnect reason %s, want upstream_close", r)
	}
}

func TestProvisionErrors(t *testing.T) {
	for _, tc := range []struct {
		h    l4aegistls.Handler
		want string
	}{
		{l4aegistls.Handler{}, "cert_id 0: required"},
		{l4aegistls.Handler{CertID: -3}, "cert_id -3: required, must be >= 1"},
		{l4aegistls.Handler{}, "or give cert_tag"},
		{l4aegistls.Handler{CertID: 2, CertTag: "db"}, `cert_id 2 and cert_tag "db": give one of them, not both`},
		{l4aegistls.Handler{CertID: 1, StreamID: -1}, "stream_id -1: must be >= 0"},
		{l4aegistls.Handler{CertID: 1, HandshakeTimeout: caddy.Duration(-time.Second)}, "handshake_timeout -1s: must be >= 0"},
		{l4aegistls.Handler{CertID: 1, MaxHandshakes: -2}, "max_handshakes -2: must be >= 0"},
	} {
		h := tc.h
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		err := h.Provision(ctx)
		_ = h.Cleanup()
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Provision(%+v): got error %v, want one containing %q", tc.h, err, tc.want)
		}
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	var h l4aegistls.Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`aegis_tls {
		cert_id 12
		stream_id 7
		handshake_timeout 3s
		max_handshakes 64
	}`))
	if err != nil {
		t.Fatal(err)
	}
	want := l4aegistls.Handler{CertID: 12, StreamID: 7, HandshakeTimeout: caddy.Duration(3 * time.Second), MaxHandshakes: 64}
	if fmt.Sprintf("%+v", h) != fmt.Sprintf("%+v", want) {
		t.Fatalf("got  %+v\nwant %+v", h, want)
	}
	var tagged l4aegistls.Handler
	if err := tagged.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_tls {\n cert_tag db\n}")); err != nil || tagged.CertTag != "db" || tagged.CertID != 0 {
		t.Fatalf("cert_tag: %+v, %v", tagged, err)
	}

	for _, tc := range []struct{ in, want string }{
		{"aegis_tls {\n cert_id twelve\n}", `cert_id "twelve"`},
		{"aegis_tls {\n cert_id 1 2\n}", "cert_id: want one value"},
		{"aegis_tls {\n cert_id\n}", "cert_id: want one value"},
		{"aegis_tls {\n stream_id x\n}", `stream_id "x"`},
		{"aegis_tls {\n max_handshakes lots\n}", `max_handshakes "lots"`},
		{"aegis_tls {\n handshake_timeout soon\n}", `handshake_timeout "soon"`},
		{"aegis_tls {\n cert_id 1\n cert_id 2\n}", `"cert_id" given twice`},
		{"aegis_tls {\n cert_id 1 {\n x\n }\n}", "blocks are not supported"},
		{"aegis_tls {\n alpn h2\n}", `unknown aegis_tls option "alpn"`},
		{"aegis_tls {\n cert_tag\n}", "cert_tag: want one value"},
		{"aegis_tls {\n cert_tag a b\n}", "cert_tag: want one value"},
		{"aegis_tls {\n cert_tag a\n cert_tag b\n}", `"cert_tag" given twice`},
		{"aegis_tls 12", "12"},
	} {
		var h l4aegistls.Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got error %v, want one containing %s", tc.in, err, tc.want)
		}
	}
}

func TestModuleRegistered(t *testing.T) {
	mi, err := caddy.GetModule("layer4.handlers.aegis_tls")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := mi.New().(*l4aegistls.Handler); !ok {
		t.Fatalf("module New returns %T", mi.New())
	}
}

// floodUpstream sends size bytes, or without end for 0, then half-closes,
// while it discards what it gets.
func floodUpstream(t *testing.T, size int) string {
	t.Helper()
	return loopback.Serve(t, "127.0.0.1:0", func(conn net.Conn) {
		go func() { _, _ = io.Copy(io.Discard, conn) }()
		buf := make([]byte, 16<<10)
		for sent := 0; size == 0 || sent < size; {
			n := len(buf)
			if size > 0 {
				n = min(n, size-sent)
			}
			if _, err := conn.Write(buf[:n]); err != nil {
				return
			}
			sent += n
		}
		_ = conn.(*net.TCPConn).CloseWrite()
	}).Addr
}

// A client that stops reading while it keeps sending: *tls.Conn cannot
// retry a write that timed out, so the connection ends as idle after the
// idle timeout, instead of the relay retrying a dead connection.
func TestClientStopsReading(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "x.test")
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	c := startChain(t, &l4aegistls.Handler{CertID: id}, floodUpstream(t, 0),
		chainOpts{guard: &l4aegisguard.Handler{IdleTimeout: caddy.Duration(300 * time.Millisecond)}})
	tc, _, err := dialTLS(t, c.addr, "x.test", roots(cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := tc.Write([]byte("x")); err != nil {
				return
			}
		}
	}()
	select {
	case r := <-c.reasons:
		if r != streamstate.ReasonIdleTimeout {
			t.Errorf("disconnect reason %s, want idle_timeout", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a client that stopped reading still connected after 5s")
	}
}

// slowClient takes the first fast bytes written to it at once, then at
// most chunk bytes per write, one chunk every pause, as a client on a slow
// link does; a write deadline that passes meanwhile ends the write with
// what was taken.
type slowClient struct {
	*net.TCPConn
	fast     int
	chunk    int
	pause    time.Duration
	deadline atomic.Pointer[time.Time]
}

func (s *slowClient) SetWriteDeadline(t time.Time) error {
	s.deadline.Store(&t)
	return nil
}

func (s *slowClient) SetDeadline(t time.Time) error {
	s.deadline.Store(&t)
	return s.TCPConn.SetReadDeadline(t)
}

func (s *slowClient) Write(p []byte) (int, error) {
	if s.fast > 0 {
		n, err := s.TCPConn.Write(p)
		s.fast -= n
		return n, err
	}
	var written int
	for written < len(p) {
		wake := time.Now().Add(s.pause)
		if d := s.deadline.Load(); d != nil && !d.IsZero() && d.Before(wake) {
			time.Sleep(time.Until(*d))
			return written, os.ErrDeadlineExceeded
		}
		time.Sleep(s.pause)
		n, err := s.TCPConn.Write(p[written:min(len(p), written+s.chunk)])
		written += n
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

// A client that reads slowly, but reads, is not cut by the idle timeout,
// even when one write of the relay to it takes longer than that.
func TestSlowReaderKeepsGoing(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "x.test")
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	// Past its first 128 KiB, a TLS connection writes records of 16 KiB.
	// Then about 50 KiB/s: a record takes some 320ms to write, the idle
	// timeout is 250ms.
	const fast, size = 160 << 10, 224 << 10
	slow := func(c net.Conn) net.Conn {
		return &slowClient{TCPConn: c.(*net.TCPConn), fast: fast, chunk: 2 << 10, pause: 40 * time.Millisecond}
	}
	c := startChain(t, &l4aegistls.Handler{CertID: id}, floodUpstream(t, size),
		chainOpts{wrap: slow, guard: &l4aegisguard.Handler{IdleTimeout: caddy.Duration(250 * time.Millisecond)}})
	tc, _, err := dialTLS(t, c.addr, "x.test", roots(cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.Copy(io.Discard, tc)
	if err != nil || got != size {
		t.Fatalf("got %d bytes, %v (reason %s); want %d", got, err, c.reason(t), size)
	}
}

// Large writes go out as batches of records; both directions at once, in
// chunks bigger than a record, arrive intact and in order.
func TestBulkBothWays(t *testing.T) {
	checkNoLeaks(t)
	cert := newCert(t, "bulk.example.test")
	id := certID(t)
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id}, up.addr, chainOpts{})
	tc, _, err := dialTLS(t, c.addr, "bulk.example.test", roots(cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
	const size = 4 << 20
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i*7 + i>>13)
	}
	errc := make(chan error, 1)
	go func() {
		var err error
		for off := 0; off < size && err == nil; off += 100 << 10 { // 100 KiB: several records each
			_, err = tc.Write(want[off:min(off+100<<10, size)])
		}
		errc <- err
	}()
	got := make([]byte, size)
	if _, err := io.ReadFull(tc, got); err != nil {
		t.Fatalf("reading the echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the echo of 4 MiB through TLS differs from what was sent")
	}
}
