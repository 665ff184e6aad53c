package streams_test

import (
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

func TestRelayCountsAndLogs(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, nil)))

	c := dial(t, port)
	if got := roundTrip(t, c, "hello, stream"); got != "hello, stream" {
		t.Fatalf("echo through the stream: got %q", got)
	}
	// A relay step counts its bytes after its write returns, so the echo
	// can reach the client a moment before the upload step is counted.
	st := inst.waitStats(1, "1 active connection with 13 bytes each way", func(s spec.Status) bool {
		return s.ActiveConnections == 1 && s.BytesSent == 13 && s.BytesReceived == 13
	})
	if !st.Listening || st.TotalConnections != 1 || st.BytesSent != 13 || st.BytesReceived != 13 {
		t.Fatalf("stats with one open connection: %+v", st)
	}
	c.Close()
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	e := inst.waitLog(1, "action allowed", func(e logEntry) bool { return e.Action == "allowed" })
	if e.Stream != "test-1" || e.SourceIP != "127.0.0.1" || e.BytesSent != 13 || e.BytesReceived != 13 || e.DisconnectReason != "client_close" {
		t.Fatalf("log entry: %+v", e)
	}
}

func TestACL(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	p4allow, p4deny, p6 := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		// Only 127.0.0.1 may connect; 127.0.0.2 is outside the whitelist.
		host(1, p4allow, up.Port, map[string]any{"whitelist_cidrs": []string{"127.0.0.1"}}),
		// The whole loopback range is allowed but 127.0.0.3/32 is blacklisted.
		host(2, p4deny, up.Port, map[string]any{"whitelist_cidrs": []string{"127.0.0.0/8"}, "blacklist_cidrs": []string{"127.0.0.3/32"}}),
		// IPv6: listen on ::1, blacklist ::1 itself.
		host(3, p6, up.Port, map[string]any{"listen_address": "::1", "blacklist_cidrs": []string{"::1/128"}}),
	))

	from := func(src string, port int, dst string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", net.JoinHostPort(dst, fmt.Sprint(port)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}

	if got := roundTrip(t, from("127.0.0.1", p4allow, "127.0.0.1"), "ok"); got != "ok" {
		t.Fatalf("whitelisted source: got %q", got)
	}
	expectClosed(t, from("127.0.0.2", p4allow, "127.0.0.1"), 5*time.Second)
	if got := roundTrip(t, from("127.0.0.2", p4deny, "127.0.0.1"), "ok"); got != "ok" {
		t.Fatalf("source inside whitelist, outside blacklist: got %q", got)
	}
	expectClosed(t, from("127.0.0.3", p4deny, "127.0.0.1"), 5*time.Second)
	expectClosed(t, from("::1", p6, "::1"), 5*time.Second)

	for id, want := range map[int64]uint64{1: 1, 2: 1, 3: 1} {
		inst.waitStats(id, fmt.Sprintf("%d blocked", want), func(s spec.Status) bool { return s.BlockedConnections == want })
	}
	inst.waitLog(1, "blocked 127.0.0.2", func(e logEntry) bool {
		return e.Action == "blocked" && e.SourceIP == "127.0.0.2" && e.DisconnectReason == "acl_denied"
	})
	inst.waitLog(3, "blocked ::1", func(e logEntry) bool {
		return e.Action == "blocked" && e.SourceIP == "::1" && e.DisconnectReason == "acl_denied"
	})
}

func TestMaxConnections(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"max_connections": 2})))

	a, b := dial(t, port), dial(t, port)
	roundTrip(t, a, "a")
	roundTrip(t, b, "b")
	expectClosed(t, dial(t, port), 5*time.Second)
	inst.waitLog(1, "max_connections", func(e logEntry) bool {
		return e.Action == "blocked" && e.DisconnectReason == "max_connections"
	})

	// A slot frees up when a connection ends.
	a.Close()
	inst.waitStats(1, "1 active", func(s spec.Status) bool { return s.ActiveConnections == 1 })
	if got := roundTrip(t, dial(t, port), "c"); got != "c" {
		t.Fatalf("after a slot freed up: got %q", got)
	}
	roundTrip(t, b, "b") // the existing one kept working throughout
}

// With half_close true, one side's end is passed on and the other side
// can still send.
func TestHalfClose(t *testing.T) {
	checkNoLeaks(t)
	// The upstream reads the whole request, then answers and closes.
	up := newUpstream(t, func(c net.Conn) {
		req, _ := io.ReadAll(c)
		_, _ = c.Write([]byte("got " + string(req)))
	})
	// This one speaks first, closes its write half, and keeps reading.
	first := newUpstream(t, func(c net.Conn) {
		_, _ = c.Write([]byte("banner"))
		_ = c.(*net.TCPConn).CloseWrite()
		rest, _ := io.ReadAll(c)
		_, _ = fmt.Fprintf(io.Discard, "%s", rest)
	})
	p1, p2 := freePort(t), freePort(t)
	half := map[string]any{"half_close": true}
	inst := startCaddy(t, hosts(host(1, p1, up.Port, half), host(2, p2, first.Port, half)))

	c := dial(t, p1).(*net.TCPConn)
	if _, err := c.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := io.ReadAll(c)
	if err != nil || string(resp) != "got request" {
		t.Fatalf("client half-closed: response %q, err %v", resp, err)
	}
	inst.waitLog(1, "client_close", func(e logEntry) bool { return e.DisconnectReason == "client_close" && e.BytesReceived == 11 })

	// Upstream half-closes first: the client still gets to send.
	c2 := dial(t, p2).(*net.TCPConn)
	_ = c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	banner, err := io.ReadAll(c2)
	if err != nil || string(banner) != "banner" {
		t.Fatalf("upstream half-closed: got %q, err %v", banner, err)
	}
	if _, err := c2.Write([]byte("still talking")); err != nil {
		t.Fatalf("writing after the upstream's half-close: %v", err)
	}
	c2.CloseWrite()
	e := inst.waitLog(2, "upstream_close", func(e logEntry) bool { return e.DisconnectReason == "upstream_close" })
	if e.BytesSent != uint64(len("still talking")) {
		t.Fatalf("bytes sent after the upstream's half-close: %+v", e)
	}
}

func TestIdleTimeout(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"idle_timeout_seconds": 1})))

	// A slow, steady upload (a byte every 300 ms, nothing coming back)
	// lasts three idle timeouts and is never cut.
	slow := dial(t, port)
	for i := 0; i < 10; i++ {
		if _, err := slow.Write([]byte{'x'}); err != nil {
			t.Fatalf("slow transfer cut after %d bytes: %v", i, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if st := inst.stats()[1]; st.ActiveConnections != 1 || st.BytesSent != 10 {
		t.Fatalf("slow transfer: %+v", st)
	}

	// A quiet one is closed after about the idle timeout.
	quiet := dial(t, port)
	start := time.Now()
	expectClosed(t, quiet, 5*time.Second)
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("idle connection closed after %s, before the 1s idle timeout", d)
	}
	inst.waitLog(1, "idle_timeout", func(e logEntry) bool { return e.DisconnectReason == "idle_timeout" })
	slow.Close()
}

func TestDialTimeout(t *testing.T) {
	checkNoLeaks(t)
	// An upstream that never answers: a listener whose accept queue is full
	// drops further SYNs, so a dial to it hangs.
	ln := fullListener(t)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, ln, map[string]any{"connection_timeout_seconds": 1})))

	c := dial(t, port)
	start := time.Now()
	expectClosed(t, c, 8*time.Second)
	if d := time.Since(start); d < 900*time.Millisecond {
		t.Fatalf("closed after %s, before the 1s dial timeout", d)
	}
	inst.waitLog(1, "dial_failed", func(e logEntry) bool { return e.DisconnectReason == "dial_failed" })
}

// fullListener returns the port of a listener with a backlog of one that
// never accepts and whose queue is already full, so a dial to it hangs.
func fullListener(t *testing.T) int {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	port := sa.(*syscall.SockaddrInet4).Port
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for i := 0; i < 16; i++ {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err != nil {
			if isTimeout(err) {
				return port
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatal("could not fill the listener's accept queue")
	return 0
}
