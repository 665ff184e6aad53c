package l4aegistls_test

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
)

// Outcomes tell a handshake that timed out from one that failed otherwise;
// HandshakeStats.Failed counts both. AllOutcomes has the stream while a
// handler of it is provisioned.
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

	eventually(t, "three handshakes done", func() bool {
		o := l4aegistls.AllOutcomes()[stream]
		return o.OK+o.Failed+o.TimedOut+o.Rejected == 3
	})
	if o := l4aegistls.AllOutcomes()[stream]; o != (l4aegistls.Outcomes{OK: 1, Failed: 1, TimedOut: 1}) {
		t.Fatalf("outcomes %+v, want 1 ok, 1 failed, 1 timed out", o)
	}
	if st := c.tls.Stats(); st.Succeeded != 1 || st.Failed != 2 || st.Rejected != 0 {
		t.Fatalf("stats %+v, want 1 succeeded and 2 failed (the timeout included)", st)
	}
}
