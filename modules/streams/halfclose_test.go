package streams_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// relayPath is a stream whose connections take one of the relay's paths.
type relayPath struct {
	name string
	id   int64
	port int
	// dial connects a client; a TLS client has done its handshake.
	dial func() (net.Conn, error)
}

// startRelayPaths runs three streams to the upstream at upPort, with the
// extra settings, one per path of the TCP relay: splice (raw sockets, no
// limit), copy (a rate limit: the relay copies through the guard's
// wrapper) and tls (terminated TLS, a stored certificate; copy too).
func startRelayPaths(t *testing.T, upPort int, extra map[string]any) (*testCaddy, []relayPath) {
	t.Helper()
	with := func(more map[string]any) map[string]any {
		m := map[string]any{}
		for k, v := range extra {
			m[k] = v
		}
		for k, v := range more {
			m[k] = v
		}
		return m
	}
	pSplice, pCopy, pTLS := freePort(t), freePort(t), freePort(t)
	splice := host(1, pSplice, upPort, with(nil))
	cp := host(2, pCopy, upPort, with(map[string]any{"upload_rate_bytes": 1 << 30, "download_rate_bytes": 1 << 30}))
	inst := startCaddy(t, hosts(splice, cp))

	ca := newTestCA(t)
	chain, key := ca.leaf(t, "halfclose.test", 7)
	cert, err := streams.CreateCertificate(context.Background(), spec.CertInput{Name: "hc", Certificate: chain, PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	tlsHost := host(3, pTLS, upPort, with(map[string]any{"ssl_enabled": true, "ssl_cert_id": cert.ID}))
	if err := inst.load(hosts(splice, cp, tlsHost)); err != nil {
		t.Fatal(err)
	}
	plain := func(port int) func() (net.Conn, error) {
		return func() (net.Conn, error) {
			return net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
		}
	}
	return inst, []relayPath{
		{"splice", 1, pSplice, plain(pSplice)},
		{"copy", 2, pCopy, plain(pCopy)},
		{"tls", 3, pTLS, func() (net.Conn, error) {
			d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second},
				Config: &tls.Config{RootCAs: ca.pool, ServerName: "halfclose.test"}}
			return d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", pTLS))
		}},
	}
}

// A client that reads a reply to its end (the upstream closed) and
// reconnects at once finds its slot free: with max_connections 1 and the
// default half_close false, none of 200 immediate reconnects is refused,
// on every relay path. (Before, when the slot was freed only once the
// client had closed too, about one in four was.)
func TestReconnectAtOnceFindsTheSlotFree(t *testing.T) {
	checkNoLeaks(t)
	const reply = "reply, then the end"
	up := newUpstream(t, func(c net.Conn) { _, _ = c.Write([]byte(reply)) })
	inst, paths := startRelayPaths(t, up.Port, map[string]any{"max_connections": 1})

	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			const cycles = 200
			refused := 0
			for i := 0; i < cycles; i++ {
				c, err := p.dial()
				var got []byte
				if err == nil {
					_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
					got, err = io.ReadAll(c)
					c.Close()
				}
				switch {
				case err == nil && string(got) == reply:
				case len(got) == 0:
					// Closed without a byte (a TLS client: without a
					// handshake): refused at max_connections.
					refused++
				default:
					t.Fatalf("cycle %d: read %q, %v; want %q and the end", i, got, err, reply)
				}
			}
			if refused > 0 {
				t.Fatalf("%d of %d immediate reconnects refused at max_connections 1; want 0", refused, cycles)
			}
			inst.waitStats(p.id, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
			e := inst.waitLog(p.id, "upstream_close", func(e logEntry) bool { return e.Action == "allowed" })
			if e.DisconnectReason != "upstream_close" {
				t.Fatalf("log entry %+v: want disconnect_reason upstream_close", e)
			}
		})
	}
}

// endingUpstream serves a payload, then reads until the client's end
// reaches it (EOF or a reset), reports that on ended, and keeps its side
// open until the test ends. With first set it shuts its write side after
// the payload.
func endingUpstream(t *testing.T, payload []byte, first bool, ended chan<- error) int {
	t.Helper()
	hold := make(chan struct{})
	up := newUpstream(t, func(c net.Conn) {
		if _, err := c.Write(payload); err != nil {
			ended <- err
			return
		}
		if first {
			_ = c.(*net.TCPConn).CloseWrite()
		}
		_, err := io.Copy(io.Discard, c)
		ended <- err
		<-hold
	})
	// Runs before the server's own cleanup, which waits for this handler.
	t.Cleanup(func() { close(hold) })
	return up.Port
}

// With half_close false, a client that shuts its write side has its
// connection closed, both sides: the upstream sees the end and the client
// reads what was in flight, then EOF, though the upstream never closed.
// Likewise an upstream that shuts its write side: the client reads the
// payload and EOF, and the upstream sees the end though the client never
// closed. Every relay path.
func TestEndClosesBothSides(t *testing.T) {
	checkNoLeaks(t)
	payload := bytes.Repeat([]byte("in flight "), 10<<10) // 100 KiB
	for _, first := range []string{"client", "upstream"} {
		t.Run(first+" ends", func(t *testing.T) {
			ended := make(chan error, 8)
			port := endingUpstream(t, payload, first == "upstream", ended)
			inst, paths := startRelayPaths(t, port, nil)
			for _, p := range paths {
				t.Run(p.name, func(t *testing.T) {
					c, err := p.dial()
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					_ = c.SetDeadline(time.Now().Add(10 * time.Second))
					var got []byte
					if first == "client" {
						if p.name == "tls" {
							// The guard counts TLS records: read the payload
							// before the end instead.
							got = make([]byte, len(payload))
							if _, err := io.ReadFull(c, got); err != nil {
								t.Fatal(err)
							}
						} else {
							// The whole payload is on its way to the client,
							// unread, when the client ends.
							inst.waitStats(p.id, "the payload relayed", func(s spec.Status) bool {
								return s.BytesReceived == uint64(len(payload))
							})
						}
						if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
							t.Fatal(err)
						}
					}
					select {
					case err := <-ended:
						t.Logf("the upstream saw the end: %v", err)
					case <-time.After(5 * time.Second):
						t.Fatal("the upstream saw no end within 5s")
					}
					rest, err := io.ReadAll(c)
					if err != nil {
						t.Fatalf("client: read %d bytes, then %v; want the rest of the payload and EOF", len(got)+len(rest), err)
					}
					if got = append(got, rest...); !bytes.Equal(got, payload) {
						t.Fatalf("client read %d bytes, want the %d of the payload", len(got), len(payload))
					}
					inst.waitStats(p.id, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
					e := inst.waitLog(p.id, "the connection's end", func(e logEntry) bool { return e.Action == "allowed" })
					if want := first + "_close"; e.DisconnectReason != want {
						t.Fatalf("log entry %+v: want disconnect_reason %s", e, want)
					}
				})
			}
		})
	}
}

// With half_close true the end is passed on and the connection stays open:
// the upstream sees the client's end, but the client reads no end, for
// the upstream has not closed. Turning half_close off through the API
// applies to the next connection.
func TestHalfCloseSettingAppliesOnEdit(t *testing.T) {
	checkNoLeaks(t)
	ended := make(chan error, 4)
	upPort := endingUpstream(t, []byte("hello"), false, ended)
	startCaddy(t, hosts(host(1, freePort(t), upPort, nil)))
	ctx := context.Background()
	s := apiStream(2, freePort(t), upPort)
	s.HalfClose = true
	if st, err := streams.CreateHost(ctx, s); err != nil || !st.HalfClose {
		t.Fatalf("creating a stream with half_close: %+v, %v", st, err)
	}

	// endsClient dials, reads the greeting, shuts its write side and waits
	// for the upstream to see that; then it reports whether the client
	// reads the end within 500ms.
	endsClient := func() bool {
		t.Helper()
		c := dial(t, s.ListenPort).(*net.TCPConn)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
			t.Fatalf("greeting: %q, %v", buf, err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ended:
		case <-time.After(5 * time.Second):
			t.Fatal("the upstream saw no end within 5s")
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := c.Read(buf)
		if n != 0 || err != nil && !errors.Is(err, io.EOF) && !isTimeout(err) {
			t.Fatalf("after the upstream saw the end: read %d, %v", n, err)
		}
		return errors.Is(err, io.EOF)
	}
	if endsClient() {
		t.Fatal("half_close true: the client read the end; want the connection left open")
	}
	s.HalfClose = false
	if st, err := streams.UpdateHost(ctx, 2, s); err != nil || st.HalfClose {
		t.Fatalf("turning half_close off: %+v, %v", st, err)
	}
	if !endsClient() {
		t.Fatal("half_close false after the edit: the client read no end within 500ms")
	}
}
