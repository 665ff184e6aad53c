package streams_test

import (
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// quietPause is longer than any pause after which a quiet connection
// leaves the active path (today's parkDelay is 250 ms), so that what
// follows it resumes a connection that went quiet.
const quietPause = 600 * time.Millisecond

// readAllExact reads c to its end within 10 s and fails unless it read
// exactly want.
func readAllExact(t *testing.T, who string, c net.Conn, want []byte) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("%s: read %d bytes, then %v; want %d and the end", who, len(got), err, len(want))
	}
	if i := mismatch(got, want); i >= 0 {
		t.Fatalf("%s: read %d bytes, want %d; they differ from byte %d", who, len(got), len(want), i)
	}
}

// writeAll writes p to c within 10 s.
func writeAll(t *testing.T, who string, c net.Conn, p []byte) {
	t.Helper()
	_ = c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(p); err != nil {
		t.Fatalf("%s: writing %d bytes: %v", who, len(p), err)
	}
}

// exchange sends msg from the client c to the upstream u and back.
func exchange(t *testing.T, c, u net.Conn, msg string) {
	t.Helper()
	for _, hop := range [][2]net.Conn{{c, u}, {u, c}} {
		writeAll(t, "exchange", hop[0], []byte(msg))
		got := make([]byte, len(msg))
		_ = hop[1].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(hop[1], got); err != nil || string(got) != msg {
			t.Fatalf("exchange of %q: read %q, %v", msg, got, err)
		}
	}
}

// expectEnd fails unless c reads nothing more and its end within 5 s.
func expectEnd(t *testing.T, who string, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("%s: read %d, %v; want the end (EOF)", who, n, err)
	}
}

// Half-close across quiet spells, both ways, with half_close on and off
// as the README defines it. On: the side that ends first has its end
// passed on, and the other direction keeps moving, in bursts separated by
// pauses longer than a quiet connection stays active, until it ends too.
// Off: the first end, coming after a quiet spell, closes both sides
// (the other side reads what was in flight, then the end, though it never
// closed). Bytes exact, reasons and counters exact.
func TestLoopHalfCloseAcrossQuiet(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up, conns := handedUpstream(t)
	pOn, pOff := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, pOn, up.Port, map[string]any{"half_close": true}), host(2, pOff, up.Port, nil)))
	first, second := randomBytes(1, 1<<20+5), randomBytes(2, 1000)

	t.Run("on, client ends first", func(t *testing.T) {
		c := dial(t, pOn).(*net.TCPConn)
		u := nextConn(t, conns)
		writeAll(t, "client", c, []byte("request"))
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		readAllExact(t, "upstream, the client's request", u, []byte("request"))
		time.Sleep(quietPause)
		writeAll(t, "upstream", u, first)
		time.Sleep(quietPause)
		writeAll(t, "upstream", u, second)
		_ = u.(*net.TCPConn).CloseWrite()
		readAllExact(t, "client, the answer", c, append(first[:len(first):len(first)], second...))
		u.Close()
		inst.in(t).expectEnds(1, []connEnd{{7, uint64(len(first) + len(second)), "client_close"}})
	})
	t.Run("on, upstream ends first", func(t *testing.T) {
		c := dial(t, pOn).(*net.TCPConn)
		u := nextConn(t, conns)
		writeAll(t, "upstream", u, []byte("banner"))
		_ = u.(*net.TCPConn).CloseWrite()
		readAllExact(t, "client, the banner", c, []byte("banner"))
		time.Sleep(quietPause)
		writeAll(t, "client", c, first)
		time.Sleep(quietPause)
		writeAll(t, "client", c, second)
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		readAllExact(t, "upstream, the upload", u, append(first[:len(first):len(first)], second...))
		u.Close()
		inst.in(t).expectEnds(1, []connEnd{
			{7, uint64(len(first) + len(second)), "client_close"},
			{uint64(len(first) + len(second)), 6, "upstream_close"},
		})
	})
	inst.expectTotals(1, 2, 7+uint64(len(first)+len(second)), 6+uint64(len(first)+len(second)))

	t.Run("off, client ends after a quiet spell", func(t *testing.T) {
		c := dial(t, pOff).(*net.TCPConn)
		u := nextConn(t, conns)
		exchange(t, c, u, "hello")
		time.Sleep(quietPause)
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		expectEnd(t, "upstream, after the client's end", u)
		expectEnd(t, "client, after its own end (the upstream never closed)", c)
		inst.in(t).expectEnds(2, []connEnd{{5, 5, "client_close"}})
	})
	t.Run("off, upstream ends after a quiet spell", func(t *testing.T) {
		c := dial(t, pOff).(*net.TCPConn)
		u := nextConn(t, conns)
		exchange(t, c, u, "hello")
		time.Sleep(quietPause)
		writeAll(t, "upstream", u, first)
		_ = u.(*net.TCPConn).CloseWrite()
		readAllExact(t, "client, the rest and the end", c, first)
		expectEnd(t, "upstream, after its own end (the client never closed)", u)
		inst.in(t).expectEnds(2, []connEnd{{5, 5, "client_close"}, {5, 5 + uint64(len(first)), "upstream_close"}})
	})
	inst.expectTotals(2, 2, 10, 10+uint64(len(first)))
}

// A half-closed connection (half_close on: the client shut its write
// side, the upstream's direction goes on) that is then cut ends with the
// reason of the cut, not client_close: the API closes it (admin_closed),
// or the upstream resets it (upstream_error). (Its idle timeout:
// TestLoopIdleTimeout.) Both sides see the end, and nothing is left.
func TestLoopHalfClosedThenCut(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up, conns := handedUpstream(t)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"half_close": true})))
	// halfClosed opens a connection whose client sent "request" and shut
	// its write side, and whose upstream read them and answered "ok",
	// then went quiet.
	halfClosed := func(t *testing.T) (*net.TCPConn, net.Conn) {
		t.Helper()
		c := dial(t, port).(*net.TCPConn)
		u := nextConn(t, conns)
		writeAll(t, "client", c, []byte("request"))
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		readAllExact(t, "upstream", u, []byte("request"))
		writeAll(t, "upstream", u, []byte("ok"))
		got := make([]byte, 2)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "ok" {
			t.Fatalf("client: read %q, %v", got, err)
		}
		time.Sleep(quietPause)
		return c, u
	}
	var want []connEnd
	t.Run("closed through the API", func(t *testing.T) {
		c, u := halfClosed(t)
		a, ok := findConn(t, 1, c)
		if !ok {
			t.Fatal("the half-closed connection is not in the live list")
		}
		if err := streams.Running().CloseConnection(1, a.ID); err != nil {
			t.Fatal(err)
		}
		expectEnd(t, "client", c)
		expectGone(t, "upstream", u)
		want = append(want, connEnd{7, 2, "admin_closed"})
		inst.in(t).expectEnds(1, want)
	})
	t.Run("reset by the upstream", func(t *testing.T) {
		c, u := halfClosed(t)
		reset(t, u)
		expectGone(t, "client", c)
		want = append(want, connEnd{7, 2, "upstream_error"})
		inst.in(t).expectEnds(1, want)
	})
}
