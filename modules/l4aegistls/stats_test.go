package l4aegistls_test

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// The stream's shared state tells a handshake that timed out from one that
// failed otherwise; HandshakeStats.Failed counts both.
func TestHandshakeOutcomes(t *testing.T) {
	checkNoLeaks(t)
	const stream = 7101
	id := certID(t)
	cert := newCert(t, "x.test")
	l4aegistls.Register(id, l4aegistls.NewStaticCert(cert))
	up := echoUpstream(t)
	c := startChain(t, &l4aegistls.Handler{CertID: id, StreamID: stream, HandshakeTimeout: caddy.Duration(300 * time.Millisecond)}, up.addr, chainOpts{})

	closedWithin(t, dialRaw(t, c.addr), 3*time.Second) // says nothing: times out
	plain := dialRaw(t, c.addr)
	if _, err := plain.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	closedWithin(t, plain, 3*time.Second)
	tc, _, err := dialTLS(t, c.addr, "x.test", roots(cert), nil)
	if err != nil {
		t.Fatal(err)
	}
	echoes(t, tc, "inside")
	tc.Close()

	hs := streamstate.Lookup(stream).Handshakes()
	eventually(t, "three handshakes done", func() bool {
		return hs.Succeeded.Load()+hs.Failed.Load()+hs.TimedOut.Load()+hs.Rejected.Load() == 3
	})
	if ok, failed, timedOut, rejected := hs.Succeeded.Load(), hs.Failed.Load(), hs.TimedOut.Load(), hs.Rejected.Load(); ok != 1 || failed != 1 || timedOut != 1 || rejected != 0 {
		t.Fatalf("outcomes: %d ok, %d failed, %d timed out, %d rejected; want 1 ok, 1 failed, 1 timed out", ok, failed, timedOut, rejected)
	}
	if st := c.tls.Stats(); st.Succeeded != 1 || st.Failed != 2 || st.Rejected != 0 {
		t.Fatalf("stats %+v, want 1 succeeded and 2 failed (the timeout included)", st)
	}
}
