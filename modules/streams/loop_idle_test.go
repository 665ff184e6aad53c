package streams_test

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// idle_timeout_seconds, the parts TestIdleTimeout, TestParkedIdleTimeout
// and TestFaultUpstreamNeverReads leave out: bytes that move only
// downstream, in drips with pauses longer than a quiet connection stays
// active, keep a connection alive, which then ends about the timeout
// after its last byte; a client that stops reading while the upstream
// sends (after a quiet spell) counts as idle and is ended (the
// upstream's write fails, so it does not hang); a half-closed connection that goes quiet ends at the
// timeout too. Each is logged idle_timeout with its bytes.
func TestLoopIdleTimeout(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const drips = 8
	const dripGap = 400 * time.Millisecond
	var lastDrip atomic.Int64
	dripper := newUpstream(t, func(c net.Conn) {
		for range drips {
			time.Sleep(dripGap)
			if _, err := c.Write([]byte{'d'}); err != nil {
				return
			}
			lastDrip.Store(time.Now().UnixNano())
		}
		_, _ = io.Copy(io.Discard, c) // until the proxy ends it
	})
	floodEnded := make(chan error, 1)
	flooder := newUpstream(t, func(c net.Conn) {
		time.Sleep(quietPause) // the connection goes quiet first
		_ = c.SetWriteDeadline(time.Now().Add(15 * time.Second))
		chunk := make([]byte, 64<<10)
		var err error
		for err == nil {
			_, err = c.Write(chunk)
		}
		floodEnded <- err
	})
	quietRead := make(chan string, 1)
	release := make(chan struct{})
	quiet := newUpstream(t, func(c net.Conn) {
		_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
		req, _ := io.ReadAll(c) // the client's request, then its end
		quietRead <- string(req)
		<-release // quiet, with its write side open
	})
	t.Cleanup(func() { close(release) }) // before the upstream's close
	pDrip, pFlood, pQuiet := freePort(t), freePort(t), freePort(t)
	idle := map[string]any{"idle_timeout_seconds": 1}
	inst := startCaddy(t, hosts(
		host(1, pDrip, dripper.Port, idle),
		host(2, pFlood, flooder.Port, idle),
		host(3, pQuiet, quiet.Port, map[string]any{"idle_timeout_seconds": 1, "half_close": true}),
	))

	t.Run("downstream drips keep it alive", func(t *testing.T) {
		c := dial(t, pDrip)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got := make([]byte, drips)
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("%d bytes %s apart, nothing upstream, idle timeout 1s: cut after %q: %v", drips, dripGap, got, err)
		}
		expectClosed(t, c, 8*time.Second)
		took := time.Since(time.Unix(0, lastDrip.Load()))
		if took < 900*time.Millisecond || took > 3*time.Second {
			t.Errorf("ended %s after the last byte, want about the 1s idle timeout", took)
		}
		inst.in(t).expectEnds(1, []connEnd{{0, drips, "idle_timeout"}})
	})
	t.Run("a client that stops reading", func(t *testing.T) {
		c := dial(t, pFlood)
		start := time.Now()
		var err error
		select {
		case err = <-floodEnded:
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream's writes to a client that reads nothing still go on (or wait) after 10s")
		}
		// The buffers fill within moments; the connection ends when no byte
		// moved for 1s, which the client's receive window, still opening
		// a little after they filled, may put off once (seen: 1s or 2s).
		took := time.Since(start)
		if took < quietPause+900*time.Millisecond || isTimeout(err) {
			t.Fatalf("the upstream's writes ended after %s with %v; want the proxy to end the connection after the 1s idle timeout", took, err)
		}
		c.Close()
		e := inst.in(t).waitLogs(2, 1, 10*time.Second)[0]
		if e.DisconnectReason != "idle_timeout" || e.BytesSent != 0 || e.BytesReceived == 0 {
			t.Fatalf("log entry %+v; want idle_timeout, nothing sent, something received", e)
		}
		t.Logf("ended %s after the upstream began sending, %d KiB in buffers", (took - quietPause).Round(time.Millisecond), e.BytesReceived>>10)
	})
	t.Run("half-closed, then quiet", func(t *testing.T) {
		c := dial(t, pQuiet).(*net.TCPConn)
		writeAll(t, "client", c, []byte("request"))
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		sent := time.Now()
		select {
		case req := <-quietRead:
			if req != "request" {
				t.Fatalf("the upstream read %q and the end, want %q", req, "request")
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the client's end did not reach the upstream within 5s")
		}
		expectClosed(t, c, 8*time.Second)
		took := time.Since(sent)
		if took < 900*time.Millisecond || took > 4*time.Second {
			t.Errorf("a half-closed quiet connection ended %s after its last byte, want about the 1s idle timeout", took)
		}
		inst.in(t).expectEnds(3, []connEnd{{7, 0, "idle_timeout"}})
	})
}
