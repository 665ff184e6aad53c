package streams_test

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// reset closes c with a reset (RST) instead of an orderly end.
func reset(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// expectGone fails unless c's peer ends it (the end or a reset) within 5
// s; whatever was in flight may still be read first.
func expectGone(t *testing.T, who string, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if err != nil && (isTimeout(err) || !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("%s: %v; want the end or a reset within 5s", who, err)
	}
}

// Faults of either side, on a connection moving bytes and on one that
// went quiet: the client resets during a download and while quiet
// (client_error), the upstream resets while quiet (upstream_error), the
// upstream goes away while quiet, its listener too (upstream_close, and
// the next connection dial_failed). The other side sees its end each
// time, the max_connections slot is free for the next connection, the log
// has the reason and the exact bytes, another stream echoes throughout,
// and nothing is left behind. (TestFaultUpstreamRefuses, …ResetsMidStream,
// …NeverReads and …DisappearsWith1000Open have the other faults.)
func TestLoopFaultsActiveAndQuiet(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up, conns := handedUpstream(t)
	echoUp := newUpstream(t, echo)
	port, other := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"max_connections": 1}), host(2, other, echoUp.Port, nil)))
	stop := keepEchoing(t, other)
	var want []connEnd
	next := func(t *testing.T) (net.Conn, net.Conn) {
		t.Helper()
		c := dial(t, port)
		u := nextConn(t, conns)
		exchange(t, c, u, "hello")
		return c, u
	}

	t.Run("client resets during a download", func(t *testing.T) {
		c, u := next(t)
		sent := make(chan int64, 1)
		go func() {
			_ = u.SetWriteDeadline(time.Now().Add(10 * time.Second))
			chunk := make([]byte, 64<<10)
			var n int64
			for {
				m, err := u.Write(chunk)
				n += int64(m)
				if err != nil {
					sent <- n
					return
				}
			}
		}()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1<<20)); err != nil {
			t.Fatalf("reading the download: %v", err)
		}
		reset(t, c)
		select {
		case n := <-sent:
			t.Logf("the upstream's writes failed after %d KiB", n>>10)
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream still writes 10s after the client's reset")
		}
		e := inst.in(t).waitLogs(1, 1, 10*time.Second)[0]
		if e.DisconnectReason != "client_error" || e.BytesSent != 5 || e.BytesReceived < 5+1<<20 {
			t.Fatalf("log entry %+v; want client_error, 5 bytes sent and the download received", e)
		}
		want = append(want, connEnd{5, e.BytesReceived, "client_error"})
	})
	t.Run("client resets while quiet", func(t *testing.T) {
		c, u := next(t)
		time.Sleep(quietPause)
		reset(t, c)
		expectGone(t, "upstream", u)
		want = append(want, connEnd{5, 5, "client_error"})
		inst.in(t).expectEnds(1, want)
	})
	t.Run("upstream resets while quiet", func(t *testing.T) {
		c, u := next(t)
		time.Sleep(quietPause)
		reset(t, u)
		expectGone(t, "client", c)
		want = append(want, connEnd{5, 5, "upstream_error"})
		inst.in(t).expectEnds(1, want)
	})
	t.Run("upstream goes away while quiet", func(t *testing.T) {
		c, u := next(t)
		time.Sleep(quietPause)
		// Its listener and its connection close; its handlers return when
		// the test ends (handedUpstream), so Close does not wait for them.
		up.Close(0)
		expectEnd(t, "client", c)
		_, err := u.Read(make([]byte, 1))
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("the upstream's side: %v, want it closed", err)
		}
		want = append(want, connEnd{5, 5, "upstream_close"})
		inst.in(t).expectEnds(1, want)
		expectClosed(t, dial(t, port), 5*time.Second)
		want = append(want, connEnd{0, 0, "dial_failed"})
		inst.in(t).expectEnds(1, want)
	})
	stop()
	inst.waitStats(1, "every connection counted", func(s spec.Status) bool {
		return s.ActiveConnections == 0 && s.TotalConnections == uint64(len(want)) && s.BlockedConnections == 0
	})
	if st := inst.stats()[1]; st.BytesSent != 5*4 {
		t.Errorf("bytes sent %d, want %d", st.BytesSent, 5*4)
	}
}
