package l4aegistls_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// ---- certificates ----------------------------------------------------------

// newCert makes a self-signed ECDSA P-256 server certificate for name,
// valid for an hour.
func newCert(t testing.TB, name string) *tls.Certificate {
	t.Helper()
	return &testenv.Cert(t, testenv.CertOptions{Names: []string{name}, NotAfter: time.Now().Add(time.Hour)}).TLS
}

func roots(certs ...*tls.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c.Leaf)
	}
	return p
}

var lastCertID atomic.Int64

// certID returns a registry id no other test uses, unregistered when the
// test ends.
func certID(t testing.TB) int64 {
	id := 1000 + lastCertID.Add(1)
	t.Cleanup(func() { l4aegistls.Unregister(id) })
	return id
}

// ---- the chain -------------------------------------------------------------

// chain serves guard → aegis_tls → aegis_proxy on a loopback listener the
// way a plain layer4 server does: each accepted connection goes through
// layer4.WrapConnection and the compiled handler chain.
type chain struct {
	addr  string
	guard *l4aegisguard.Handler
	tls   *l4aegistls.Handler
	logs  *observer.ObservedLogs // aegis_tls's log, from debug up
	// reasons gets the disconnect reason of each connection that ended.
	reasons chan streamstate.Reason
}

type chainOpts struct {
	guard *l4aegisguard.Handler // default: a guard without limits
	// prefetch reads this many bytes from each connection before the
	// chain sees it, as a layer4 matcher would.
	prefetch int
	// wrap, when set, replaces each accepted connection before the chain
	// sees it.
	wrap func(net.Conn) net.Conn
	// halfClose sets aegis_proxy's half_close.
	halfClose bool
}

func startChain(t *testing.T, th *l4aegistls.Handler, upstream string, o chainOpts) *chain {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	guard := o.guard
	if guard == nil {
		guard = new(l4aegisguard.Handler)
	}
	guard.LogConnections = true
	proxy := &l4aegisproxy.Handler{Upstream: upstream, DialTimeout: caddy.Duration(2 * time.Second), HalfClose: o.halfClose}
	var cleanups []func() error
	// Registered first, so it runs after the server's own cleanup has
	// closed the connections and waited for their handlers.
	t.Cleanup(func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			_ = cleanups[i]()
		}
		cancel()
	})
	for _, p := range []interface {
		Provision(caddy.Context) error
		Cleanup() error
	}{guard, th, proxy} {
		if err := p.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		cleanups = append(cleanups, p.Cleanup)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	th.SetLogger(zap.New(core))
	c := &chain{guard: guard, tls: th, logs: logs, reasons: make(chan streamstate.Reason, 64)}
	guard.State().SetLogSink(func(r streamstate.LogRecord) bool {
		select {
		case c.reasons <- r.Reason:
		default:
		}
		return true
	})
	h := layer4.Handlers{guard, th, proxy}.Compile()
	c.addr = loopback.Serve(t, "127.0.0.1:0", func(conn net.Conn) {
		var buf []byte
		if o.prefetch > 0 {
			buf = make([]byte, o.prefetch)
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(conn, buf); err != nil {
				return
			}
			_ = conn.SetReadDeadline(time.Time{})
		}
		if o.wrap != nil {
			conn = o.wrap(conn)
		}
		_ = h.Handle(layer4.WrapConnection(conn, buf, zap.NewNop()))
	}).Addr
	return c
}

// reason waits for the disconnect reason of the next connection to end.
func (c *chain) reason(t *testing.T) streamstate.Reason {
	t.Helper()
	select {
	case r := <-c.reasons:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no connection log entry within 5s")
		return 0
	}
}

// failures returns the errors of aegis_tls's "tls handshake failed" log
// entries.
func (c *chain) failures() []string {
	var out []string
	for _, e := range c.logs.FilterMessage("tls handshake failed").All() {
		out = append(out, e.ContextMap()["error"].(string))
	}
	return out
}

// ---- upstreams and clients -----------------------------------------------

// recorder is an upstream that records the bytes it gets.
type recorder struct {
	addr string
	mu   sync.Mutex
	got  bytes.Buffer
}

func (r *recorder) received() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.got.String()
}

func (r *recorder) record(p []byte) {
	r.mu.Lock()
	r.got.Write(p)
	r.mu.Unlock()
}

// echoUpstream echoes what it gets, recording it, until the client
// half-closes, then closes.
func echoUpstream(t *testing.T) *recorder {
	t.Helper()
	r := new(recorder)
	r.addr = loopback.Serve(t, "127.0.0.1:0", func(c net.Conn) {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				r.record(buf[:n])
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}).Addr
	return r
}

// dialTLS connects to addr and runs a TLS handshake for serverName that
// trusts only pool. The connection is closed when the test ends.
func dialTLS(t testing.TB, addr, serverName string, pool *x509.CertPool, verify func(tls.ConnectionState) error) (*tls.Conn, net.Conn, error) {
	t.Helper()
	raw := dialRaw(t, addr)
	tc := tls.Client(raw, &tls.Config{ServerName: serverName, RootCAs: pool, VerifyConnection: verify})
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		return nil, raw, err
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, raw, nil
}

func dialRaw(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echoes writes msg on c and fails the test unless it reads msg back.
func echoes(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if got := testenv.RoundTrip(t, c, msg); got != msg {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

// closedWithin waits for the peer to close c and returns how long that
// took; it fails the test if it takes longer than within.
func closedWithin(t testing.TB, c net.Conn, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(within))
	_, err := io.Copy(io.Discard, c) // an alert may come first
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open after %s", within)
	}
	return time.Since(start)
}

// eventually fails the test unless cond holds within 5 seconds.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ---- goroutine leaks -------------------------------------------------------

var ownCode = regexp.MustCompile(`caddy-aegis/modules/(l4aegis[a-z]+|streamstate)\.`)

// checkNoLeaks fails the test if a goroutine running this project's
// handlers is alive 5 seconds after the test's cleanups. Call it first, so
// that its check runs after the cleanups registered later.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		var leaked string
		deadline := time.Now().Add(5 * time.Second)
		for {
			leaked = ownGoroutines()
			if leaked == "" {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("goroutines still running after the test:\n%s", leaked)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

func ownGoroutines() string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i > 0 && ownCode.MatchString(g) { // the first is the caller's
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
