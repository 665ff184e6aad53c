package streams_test

// Faults of the upstream (issue 7): it refuses, resets mid-stream, accepts
// but never reads, answers slowly, or disappears with 1,000 connections
// open. In each case the proxy logs the right disconnect_reason, comes back
// to 0 active connections, frees every goroutine and file descriptor, and
// another stream keeps echoing throughout.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// fdTable returns this process's open file descriptors, number → target.
func fdTable(t testing.TB) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	m := make(map[string]string, len(ents))
	for _, e := range ents {
		// The directory's own descriptor is closed by now: no target.
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			m[e.Name()] = l
		}
	}
	return m
}

// checkNoLeaksOrFDs is checkNoLeaks, plus a check that every file
// descriptor the test opened (sockets, pipes, files) is closed 5 seconds at
// the most after the test, Caddy's stop and the test servers' close. Call
// it first.
func checkNoLeaksOrFDs(t *testing.T) {
	t.Helper()
	checkNoLeaks(t)
	before := fdTable(t)
	t.Cleanup(func() {
		// caddy.Stop leaves the admin endpoint and the default log's file
		// open for the next config, as it should; a config without them
		// closes them.
		if err := caddy.Load([]byte(`{"admin":{"disabled":true}}`), true); err != nil {
			t.Errorf("loading an empty config: %v", err)
		}
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping the empty config: %v", err)
		}
		var left []string
		ok := testenv.Within(5*time.Second, func() bool {
			// Keep-alive connections to the admin endpoint, and splice
			// pipes in their pool, which a collection closes.
			http.DefaultClient.CloseIdleConnections()
			runtime.GC()
			left = left[:0]
			for fd, target := range fdTable(t) {
				// A log line written through a replaced config's logger
				// opens Caddy's log file again, and nothing closes it:
				// Caddy's matter, not the proxy's.
				if strings.HasSuffix(strings.TrimSuffix(target, " (deleted)"), "/caddy.log") {
					continue
				}
				if before[fd] != target {
					left = append(left, fd+" → "+target)
				}
			}
			return len(left) == 0
		})
		if !ok {
			sockets := socketNames()
			for i, l := range left {
				if ino, ok := strings.CutPrefix(l[strings.Index(l, "→ ")+len("→ "):], "socket:["); ok {
					left[i] += " " + sockets[strings.TrimSuffix(ino, "]")]
				}
			}
			slices.Sort(left)
			t.Errorf("%d file descriptors opened during the test are still open: %v", len(left), left[:min(len(left), 20)])
		}
	})
}

// socketNames describes the sockets of this network namespace by inode:
// protocol, local and remote address (in the kernel's hex) and state.
func socketNames() map[string]string {
	m := map[string]string{}
	for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
		b, _ := os.ReadFile("/proc/self/net/" + proto)
		for _, line := range strings.Split(string(b), "\n")[1:] {
			if f := strings.Fields(line); len(f) > 9 {
				m[f[9]] = fmt.Sprintf("%s %s→%s state %s", proto, f[1], f[2], f[3])
			}
		}
	}
	b, _ := os.ReadFile("/proc/self/net/unix")
	for _, line := range strings.Split(string(b), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 6 {
			m[f[6]] = "unix " + strings.Join(f[7:], " ")
		}
	}
	return m
}

// keepEchoing checks, until the returned stop is called (or the test
// ends), that the stream on port keeps echoing: a round trip every 20ms on
// one connection held open, and on a new connection every tenth round.
// stop fails the test if a round failed.
func keepEchoing(t *testing.T, port int) (stop func()) {
	t.Helper()
	done := make(chan struct{})
	var (
		wg       sync.WaitGroup
		rounds   int
		firstErr error
	)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	wg.Go(func() {
		held, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			firstErr = err
			return
		}
		defer held.Close()
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			// The first round runs at once, so that even a case over in
			// less than a tick has checked the other stream.
			if i > 0 {
				select {
				case <-done:
					return
				case <-tick.C:
				}
			}
			msg := fmt.Sprintf("beside %d", i)
			if got, err := testenv.TryRoundTrip(held, msg); err != nil || got != msg {
				firstErr = fmt.Errorf("held connection, round %d: got %q, %v", i, got, err)
				return
			}
			if i%10 == 0 {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					firstErr = fmt.Errorf("new connection, round %d: %v", i, err)
					return
				}
				got, err := testenv.TryRoundTrip(c, msg)
				c.Close()
				if err != nil || got != msg {
					firstErr = fmt.Errorf("new connection, round %d: got %q, %v", i, got, err)
					return
				}
			}
			rounds++
		}
	})
	var once sync.Once
	stop = func() {
		once.Do(func() {
			close(done)
			wg.Wait()
			switch {
			case firstErr != nil:
				t.Errorf("the other stream stopped echoing after %d rounds: %v", rounds, firstErr)
			case rounds == 0:
				t.Errorf("the other stream was never checked")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// startWithBystander starts Caddy with stream 1 listening on port and
// relaying to upstreamPort (with the extra settings), and stream 2 relaying
// to an echo server, which keepEchoing checks until stop is called.
func startWithBystander(t *testing.T, port, upstreamPort int, extra map[string]any) (inst *testCaddy, stop func()) {
	t.Helper()
	echoUp := newUpstream(t, echo)
	other := freePort(t)
	inst = startCaddy(t, hosts(host(1, port, upstreamPort, extra), host(2, other, echoUp.Port, nil)))
	return inst, keepEchoing(t, other)
}

// waitLogs waits up to within for n connection-log entries of stream id
// and returns them. It reads the log file every 100ms, as it may be large.
func (inst *testCaddy) waitLogs(id int64, n int, within time.Duration) []logEntry {
	inst.t.Helper()
	deadline := time.Now().Add(within)
	for {
		var got []logEntry
		for _, e := range inst.connLogs() {
			if e.StreamID == id {
				got = append(got, e)
			}
		}
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			inst.t.Fatalf("stream %d: %d connection-log entries after %s, want %d", id, len(got), within, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// reasons counts the disconnect reasons of entries.
func reasons(entries []logEntry) map[string]int {
	m := map[string]int{}
	for _, e := range entries {
		m[e.DisconnectReason]++
	}
	return m
}

// The upstream port has nothing listening: each connection is closed at
// once, logged dial_failed, and nothing is left behind.
func TestFaultUpstreamRefuses(t *testing.T) {
	checkNoLeaksOrFDs(t)
	dead := freePort(t) // free, and no one listens on it
	port := freePort(t)
	inst, stop := startWithBystander(t, port, dead, map[string]any{"connection_timeout_seconds": 1})

	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_, _ = c.Write([]byte("hello"))
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			if n, err := c.Read(make([]byte, 16)); n != 0 || err == nil || isTimeout(err) {
				errs <- fmt.Errorf("client %d: want the proxy to close at once, got n=%d err=%v", i, n, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	took := time.Since(start)
	st := inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(1, n, 10*time.Second)
	stop()
	if r := reasons(entries); len(entries) != n || r["dial_failed"] != n {
		t.Fatalf("%d connections to a refusing upstream: reasons %v, want %d dial_failed", n, r, n)
	}
	if st.TotalConnections != n || st.BytesReceived != 0 {
		t.Fatalf("stats after %d refused dials: %+v", n, st)
	}
	t.Logf("%d connections to a refusing upstream closed in %s", n, took.Round(time.Millisecond))
}

// The upstream resets its connections (RST) mid-stream: after answering,
// and while the client uploads. Each is logged upstream_error, the client
// is closed, and nothing is left behind.
func TestFaultUpstreamResetsMidStream(t *testing.T) {
	checkNoLeaksOrFDs(t)
	// The upstream echoes the first message, then reads up to 64 KiB more
	// and resets the connection.
	up := newUpstream(t, func(c net.Conn) {
		buf := make([]byte, 64<<10)
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.ReadFull(c, buf)
		_ = c.(*net.TCPConn).SetLinger(0) // close with RST
	})
	port := freePort(t)
	inst, stop := startWithBystander(t, port, up.Port, nil)

	const perCase = 10
	var wg sync.WaitGroup
	errs := make(chan error, 2*perCase)
	for i := range perCase {
		// Reset after an answer: the upstream reads the 64 KiB that
		// follow, then resets while the client waits for more.
		wg.Go(func() {
			c, err := dialEcho(port, fmt.Sprintf("idle %03d", i))
			if err != nil {
				errs <- fmt.Errorf("idle client %d: %v", i, err)
				return
			}
			defer c.Close()
			_, _ = c.Write(make([]byte, 64<<10))
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := c.Read(make([]byte, 16)); n != 0 || err == nil || isTimeout(err) {
				errs <- fmt.Errorf("idle client %d after the upstream's reset: want closed, got n=%d err=%v", i, n, err)
			}
		})
		// Reset in the middle of an upload of 8 MiB.
		wg.Go(func() {
			c, err := dialEcho(port, fmt.Sprintf("upld %03d", i))
			if err != nil {
				errs <- fmt.Errorf("uploading client %d: %v", i, err)
				return
			}
			defer c.Close()
			// Until the proxy closes the connection: whatever the buffers on
			// the way take, they cannot take 5s of loopback traffic.
			_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			chunk := make([]byte, 256<<10)
			sent := 0
			for err == nil {
				var n int
				n, err = c.Write(chunk)
				sent += n
			}
			if isTimeout(err) {
				errs <- fmt.Errorf("uploading client %d: still open 5s into an upload to an upstream that reset after 64 KiB (%d bytes taken)", i, sent)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(1, 2*perCase, 10*time.Second)
	stop()
	if r := reasons(entries); r["upstream_error"] != 2*perCase {
		t.Fatalf("%d connections reset by the upstream: reasons %v, want all upstream_error", 2*perCase, r)
	}
	for _, e := range entries {
		if e.BytesReceived != 8 || e.BytesSent < 8 {
			t.Fatalf("a connection reset after an 8-byte echo: %+v", e)
		}
	}
}

// The upstream accepts but never reads: the client's upload fills every
// buffer on the way, and the idle timeout (which a write that makes no
// progress counts towards) closes the connection: idle_timeout.
func TestFaultUpstreamNeverReads(t *testing.T) {
	checkNoLeaksOrFDs(t)
	release := make(chan struct{})
	up := newUpstream(t, func(net.Conn) { <-release })
	t.Cleanup(func() { close(release) }) // before the server's close
	port := freePort(t)
	inst, stop := startWithBystander(t, port, up.Port, map[string]any{"idle_timeout_seconds": 1})

	const n = 5
	var wg sync.WaitGroup
	errs := make(chan error, n)
	var moved atomic.Int64
	for i := range n {
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			start := time.Now()
			_ = c.SetWriteDeadline(start.Add(8 * time.Second))
			chunk := make([]byte, 64<<10)
			var sent int64
			for err == nil {
				var n int
				n, err = c.Write(chunk)
				sent += int64(n)
			}
			moved.Add(sent)
			// Buffers fill within moments; the proxy then waits the 1s
			// idle timeout (counted from the last byte moved) and closes.
			switch closedAfter := time.Since(start); {
			case isTimeout(err):
				errs <- fmt.Errorf("client %d: still open 8s into an upload nobody reads (%d bytes taken)", i, sent)
			case closedAfter < 900*time.Millisecond:
				errs <- fmt.Errorf("client %d: closed %s into its upload, before the 1s idle timeout (%v)", i, closedAfter, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(1, n, 10*time.Second)
	stop()
	if r := reasons(entries); r["idle_timeout"] != n {
		t.Fatalf("%d uploads to an upstream that never reads: reasons %v, want all idle_timeout", n, r)
	}
	t.Logf("each stalled upload held about %d KiB in buffers before the idle timeout", moved.Load()/n>>10)
}

// The upstream answers slowly: a first byte after 700ms, then small pieces
// and 512 KiB chunks with pauses well within the 2s idle timeout, for
// about 3s in all. The answer arrives intact and the connection ends only
// when the client closes it.
func TestFaultUpstreamSlow(t *testing.T) {
	checkNoLeaksOrFDs(t)
	big := make([]byte, 4*512<<10)
	rng := rand.New(rand.NewPCG(7, 11))
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	small := []string{"s", "lo", "w a", "nsw", "er: "}
	want := []byte{}
	for _, s := range small {
		want = append(want, s...)
	}
	want = append(want, big...)

	up := newUpstream(t, func(c net.Conn) {
		if _, err := io.ReadFull(c, make([]byte, 5)); err != nil {
			return
		}
		time.Sleep(700 * time.Millisecond)
		for _, s := range small {
			if _, err := c.Write([]byte(s)); err != nil {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
		for off := 0; off < len(big); off += 512 << 10 {
			if _, err := c.Write(big[off : off+512<<10]); err != nil {
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
		_, _ = io.Copy(io.Discard, c) // until the client is done
	})
	port := freePort(t)
	inst, stop := startWithBystander(t, port, up.Port, map[string]any{"idle_timeout_seconds": 2})

	const n = 3
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if _, err := c.Write([]byte("hello")); err != nil {
				errs <- err
				return
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got := make([]byte, len(want))
			if n, err := io.ReadFull(c, got); err != nil {
				errs <- fmt.Errorf("client %d: %d of %d bytes of the slow answer, then %v", i, n, len(want), err)
				return
			}
			if !bytes.Equal(got, want) {
				errs <- fmt.Errorf("client %d: the slow answer arrived altered", i)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(1, n, 10*time.Second)
	stop()
	for _, e := range entries {
		if e.DisconnectReason != "client_close" || e.BytesSent != 5 || e.BytesReceived != uint64(len(want)) || e.DurationMS < 2500 {
			t.Fatalf("a slow answer of %d bytes over about 3s: log entry %+v, want client_close", len(want), e)
		}
	}
}

// The upstream process is killed with 1,000 connections open through the
// proxy: every one ends with an upstream reason, the clients see their
// connection end, and nothing is left behind.
func TestFaultUpstreamDisappearsWith1000Open(t *testing.T) {
	checkNoLeaksOrFDs(t)
	child := startHelper(t, "echo")
	upPort := child.intAfter("port", 30*time.Second)
	port := freePort(t)
	inst, stop := startWithBystander(t, port, upPort, nil)

	const n = 1000
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
				if err != nil {
					errs <- err
					continue
				}
				conns[i] = c
				msg := fmt.Sprintf("conn %04d", i)
				if got, err := testenv.TryRoundTrip(c, msg); err != nil || got != msg {
					errs <- fmt.Errorf("connection %d: echo %q, %v", i, got, err)
				}
			}
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	if len(errs) > 0 {
		t.Fatalf("opening %d connections: %d failed, first: %v", n, len(errs), <-errs)
	}
	inst.waitStats(1, fmt.Sprintf("%d active", n), func(s spec.Status) bool { return s.ActiveConnections == n })

	// The upstream process disappears. Each client reads until its
	// connection ends, then closes it, as a client does.
	killed := time.Now()
	child.kill()
	var ended sync.WaitGroup
	var slowest atomic.Int64
	for i, c := range conns {
		ended.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.Copy(io.Discard, c)
			if err != nil && (isTimeout(err) || !errors.Is(err, syscall.ECONNRESET)) {
				errs <- fmt.Errorf("connection %d after the upstream died: %v", i, err)
			}
			c.Close()
			d := int64(time.Since(killed))
			for old := slowest.Load(); d > old && !slowest.CompareAndSwap(old, d); old = slowest.Load() {
			}
		})
	}
	ended.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	inst.waitStats(1, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(1, n, 15*time.Second)
	stop()
	r := reasons(entries)
	if len(entries) != n || r["upstream_close"]+r["upstream_error"] != n {
		t.Fatalf("%d connections whose upstream died: %d log entries, reasons %v; want all upstream_close or upstream_error", n, len(entries), r)
	}
	t.Logf("upstream killed with %d connections open: all ended within %s; reasons %v",
		n, time.Duration(slowest.Load()).Round(time.Millisecond), r)
}

// dialEcho connects to the stream on port and checks that msg comes back.
func dialEcho(port int, msg string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		return nil, err
	}
	if got, err := testenv.TryRoundTrip(c, msg); err != nil || got != msg {
		c.Close()
		return nil, fmt.Errorf("echo %q, %v", got, err)
	}
	return c, nil
}
