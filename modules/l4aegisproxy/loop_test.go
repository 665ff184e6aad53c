//go:build linux

package l4aegisproxy_test

import (
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// startLoop serves guard → proxy on the event loop as the streams app
// does for a plain stream: accept4 on the listener's socket, then
// Direct.Serve. Its cleanup closes what is open and fails the test if a
// connection is not ended within 5 s.
func startLoop(t testing.TB, listen string, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) *chain {
	t.Helper()
	provisionChain(t, guard, proxy)
	d := l4aegisproxy.NewDirect(guard.Policy(), guard.State(), proxy)
	if d == nil {
		t.Fatal("NewDirect: nil for a plain stream")
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	acc, err := l4aegisproxy.NewAccepter(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	var live sync.WaitGroup
	live.Add(1) // the accept loop
	go func() {
		defer live.Done()
		_ = acc.Run(func(got []l4aegisproxy.Accepted) bool {
			for _, a := range got {
				live.Add(1)
				d.Serve(acc, a, live.Done)
			}
			return true
		})
	}()
	addr := ln.Addr().String()
	if a := ln.Addr().(*net.TCPAddr); a.IP.IsUnspecified() {
		addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(a.Port))
	}
	ch := &chain{guard: guard, proxy: proxy, addr: addr}
	ch.endAtCleanup(t, &live, ln, acc)
	return ch
}

// Short connections as the bench makes them: connect, 32 bytes each way,
// close; eight at a time.
func TestLoopShortConnections(t *testing.T) {
	up := newUpstream(t, "127.0.0.1:0", echo)
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{StreamID: 0, LogConnections: true}, &l4aegisproxy.Handler{Upstream: up.Addr})
	const workers, each = 8, 300
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			msg, got := make([]byte, 32), make([]byte, 32)
			for range each {
				c, err := net.DialTimeout("tcp", ch.addr, 5*time.Second)
				if err != nil {
					t.Error(err)
					return
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write(msg); err != nil {
					t.Error(err)
				}
				if _, err := io.ReadFull(c, got); err != nil {
					t.Error(err)
					c.Close()
					return
				}
				c.Close()
			}
		})
	}
	wg.Wait()
	waitFor(t, "every connection ended", func() bool { return ch.state().Active.Load() == 0 })
	if n := ch.state().Total.Load(); n != workers*each {
		t.Errorf("Total %d, want %d", n, workers*each)
	}
}

// logSink collects the stream's connection-log records.
func logSink(ch *chain) <-chan streamstate.LogRecord {
	logged := make(chan streamstate.LogRecord, 1000)
	ch.state().SetLogSink(func(r streamstate.LogRecord) bool { logged <- r; return true })
	return logged
}

// nextLog waits for the next connection-log record.
func nextLog(t *testing.T, logged <-chan streamstate.LogRecord) streamstate.LogRecord {
	t.Helper()
	select {
	case r := <-logged:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("no connection-log record within 5s")
	}
	return streamstate.LogRecord{}
}

// wantEOF fails unless c's next read ends it (EOF or a reset) within 5 s.
func wantEOF(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if n > 0 || err == nil || os.IsTimeout(err) {
		t.Fatalf("read %d bytes, %v: want the connection closed", n, err)
	}
}

// Bytes move intact both ways at once through the loop, the bulk of them
// spliced (they never reach user space), and are counted exactly.
func TestLoopTransferBothWays(t *testing.T) {
	const up, down = 24 << 20, 16 << 20
	rchar, _ := transfer(t, startLoop, &l4aegisguard.Handler{}, up, down)
	if rchar >= 0 {
		t.Logf("rchar grew by %d for %d relayed bytes", rchar, up+down)
		if rchar > (up+down)*5/4 {
			t.Fatalf("the loop read %d bytes in user space for %d relayed: want splice(2) for bulk transfers", rchar-(up+down), up+down)
		}
	}
}

// The counters move as the bytes do, not when the connection ends.
func TestLoopCountersDuringTransfer(t *testing.T) {
	hold := make(chan struct{})
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.CopyN(io.Discard, c, 1<<20); err != nil {
			return
		}
		_, _ = c.Write(make([]byte, 300<<10))
		<-hold
	})
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, c, 300<<10); err != nil {
		t.Fatal(err)
	}
	ss := ch.session(t)
	waitFor(t, "the counters of the open connection", func() bool {
		return ss.Sent() == 1<<20 && ss.Received() == 300<<10
	})
	if tot := ch.state().SinceReload(); tot.BytesSent != 1<<20 || tot.BytesReceived != 300<<10 {
		t.Fatalf("stream counters while open: %+v", tot)
	}
	close(hold)
	wantEOF(t, c)
}

// With half-close, the client's end reaches the upstream, whose answer
// still reaches the client; then the connection ends as client_close.
func TestLoopHalfClose(t *testing.T) {
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if err != nil {
			return
		}
		_, _ = c.Write(append([]byte("got "), b...))
	})
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{Upstream: u.Addr, HalfClose: true})
	logged := logSink(ch)
	c := dial(t, ch.addr)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("question")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "got question" {
		t.Fatalf("read %q, %v: want the answer after the half-close, then the end", b, err)
	}
	r := nextLog(t, logged)
	if r.Reason != streamstate.ReasonClientClose || r.BytesSent != 8 || r.BytesReceived != 12 || r.Upstream != u.Addr {
		t.Fatalf("log: %+v, want client_close, 8 bytes sent, 12 received, upstream %s", r, u.Addr)
	}
}

// Without half-close, either side's end ends both, after what was read is
// written.
func TestLoopEndWithoutHalfClose(t *testing.T) {
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = c.Write([]byte("bye"))
	})
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{Upstream: u.Addr})
	logged := logSink(ch)
	c := dial(t, ch.addr)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v: want the upstream's bytes, then the end", b, err)
	}
	if r := nextLog(t, logged); r.Reason != streamstate.ReasonUpstreamClose || r.BytesReceived != 3 {
		t.Fatalf("log: %+v, want upstream_close with 3 bytes received", r)
	}
}

// The idle timeout ends a quiet connection, and one whose client stopped
// reading while the upstream still writes (no byte moves either way).
func TestLoopIdleTimeout(t *testing.T) {
	const idle = 400 * time.Millisecond
	for _, mode := range []byte{'S', 'F'} {
		t.Run(string(mode), func(t *testing.T) {
			stop := make(chan struct{})
			defer close(stop)
			floodErr := make(chan error, 1)
			u := idleUpstream(t, stop, floodErr)
			ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{IdleTimeout: caddy.Duration(idle), LogConnections: true},
				&l4aegisproxy.Handler{Upstream: u.Addr})
			logged := logSink(ch)
			c := dial(t, ch.addr)
			start := time.Now()
			if _, err := c.Write([]byte{mode}); err != nil {
				t.Fatal(err)
			}
			if mode == 'F' {
				select {
				case err := <-floodErr:
					if err == nil {
						t.Fatal("the upstream wrote 256 MiB to a client that reads nothing")
					}
				case <-time.After(5 * time.Second):
					t.Fatal("upstream still writing to a client that stopped reading after 5s")
				}
			}
			r := nextLog(t, logged)
			took := time.Since(start)
			if r.Reason != streamstate.ReasonIdleTimeout || took < idle || took > idle+2*time.Second {
				t.Fatalf("ended as %q after %s, want idle_timeout after %s", r.Reason, took, idle)
			}
			if mode == 'S' {
				wantEOF(t, c)
			}
		})
	}
}

// Session.Close (the API's close) ends a connection the loop holds at once.
func TestLoopSessionClose(t *testing.T) {
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{Upstream: u.Addr})
	logged := logSink(ch)
	c := dial(t, ch.addr)
	roundTrip(t, c, []byte("hello"))
	ch.session(t).Close(streamstate.ReasonAdminClosed)
	wantEOF(t, c)
	if r := nextLog(t, logged); r.Reason != streamstate.ReasonAdminClosed || r.BytesSent != 5 || r.BytesReceived != 5 {
		t.Fatalf("log: %+v, want admin_closed with 5 bytes each way", r)
	}
	waitFor(t, "the slot back", func() bool { return ch.state().Active.Load() == 0 })
}

// refusedAddr is a loopback address where nothing listens.
func refusedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// An upstream that refuses ends the connection as dial_failed, as the
// chain does; with several upstreams the next one is tried and the failed
// one is marked down.
func TestLoopDialFailureAndFailover(t *testing.T) {
	t.Run("one", func(t *testing.T) {
		ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{Upstream: refusedAddr(t)})
		logged := logSink(ch)
		c := dial(t, ch.addr)
		wantEOF(t, c)
		if r := nextLog(t, logged); r.Reason != streamstate.ReasonDialFailed {
			t.Fatalf("log: %+v, want dial_failed", r)
		}
		if n := l4aegisproxy.ProxyState(ch.proxy).DialFailures.Load(); n != 1 {
			t.Fatalf("dial failures %d, want 1", n)
		}
	})
	t.Run("failover", func(t *testing.T) {
		good := newUpstream(t, "127.0.0.1:0", echo)
		bad := refusedAddr(t)
		ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{
			LoadBalancing: "first",
			Upstreams:     []l4aegisproxy.Upstream{{Address: bad}, {Address: good.Addr}},
		})
		logged := logSink(ch)
		c := dial(t, ch.addr)
		roundTrip(t, c, []byte("through the second"))
		c.Close()
		if r := nextLog(t, logged); r.Reason != streamstate.ReasonClientClose || r.Upstream != good.Addr {
			t.Fatalf("log: %+v, want client_close through %s", r, good.Addr)
		}
		badState := l4aegisproxy.ProxyState(ch.proxy).Upstream(bad)
		if badState.Up(time.Now().UnixNano()) || badState.DialFailures.Load() != 1 || !strings.Contains(badState.LastError(), "dial tcp "+bad+": connect: connection refused") {
			t.Fatalf("the refusing upstream: up %v, %d dial failures, last error %q: want skipped after its refusal",
				badState.Up(time.Now().UnixNano()), badState.DialFailures.Load(), badState.LastError())
		}
		// Skipped now: the next connection goes to the good one at once.
		c2 := dial(t, ch.addr)
		roundTrip(t, c2, []byte("again"))
	})
	t.Run("every one refuses", func(t *testing.T) {
		// Each refusal comes after its connect started: the second leaves
		// no upstream to try, and the connection ends as dial_failed.
		a, b := refusedAddr(t), refusedAddr(t)
		ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{
			LoadBalancing: "first",
			Upstreams:     []l4aegisproxy.Upstream{{Address: a}, {Address: b}},
		})
		logged := logSink(ch)
		for range 2 {
			c := dial(t, ch.addr)
			wantEOF(t, c)
			if r := nextLog(t, logged); r.Reason != streamstate.ReasonDialFailed {
				t.Fatalf("log: %+v, want dial_failed", r)
			}
		}
		st := l4aegisproxy.ProxyState(ch.proxy)
		if fa, fb := st.Upstream(a).DialFailures.Load(), st.Upstream(b).DialFailures.Load(); fa == 0 || fb == 0 {
			t.Fatalf("dial failures: %d at %s, %d at %s; want both tried", fa, a, fb, b)
		}
	})
}

// With proxy_protocol, the PROXY header goes first, naming the client and
// the address it connected to (a wildcard listen's included).
func TestLoopProxyHeader(t *testing.T) {
	checkProxyHeaders(t, startLoop, []proxyCase{
		{1, "127.0.0.1:0"}, {2, "127.0.0.1:0"}, {2, "[::1]:0"}, {1, "0.0.0.0:0"},
	})
}

// fdCount is the number of this process's open descriptors.
func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd here")
	}
	return len(ents)
}

// Connections on the loop hold no goroutine: 500 open add a few at most
// (the loops); once they end, the descriptors and goroutines are back.
func TestLoopHoldsNoGoroutinePerConnection(t *testing.T) {
	u := newUpstream(t, "127.0.0.1:0", echo)
	fds, gs := fdCount(t), runtime.NumGoroutine()
	const n = 500
	func() {
		ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
		conns := make([]net.Conn, n)
		for i := range conns {
			conns[i] = dial(t, ch.addr)
			roundTrip(t, conns[i], []byte{byte(i)})
		}
		// The upstream's test server runs a goroutine per connection.
		if grew := runtime.NumGoroutine() - gs - n; grew > 10 {
			t.Fatalf("%d connections on the loop added %d goroutines of the proxy, want a few at most", n, grew)
		}
		if l := l4aegisproxy.LoopConns(); l != n {
			t.Fatalf("the loops hold %d connections, want %d", l, n)
		}
		for _, c := range conns {
			c.Close()
		}
		waitFor(t, "every connection ended", func() bool { return ch.state().Active.Load() == 0 && l4aegisproxy.LoopConns() == 0 })
	}()
	waitFor(t, "descriptors back", func() bool { return fdCount(t) <= fds+2 }) // the test's listener and its accept4 duplicate
	waitFor(t, "goroutines back", func() bool { return runtime.NumGoroutine() <= gs+3 })
}

// FuzzLoopRelay runs a script of writes and half-closes from both ends of
// a connection on the loop (with half_close) and checks the properties of
// the relay: each end receives exactly the bytes the other sent, in
// order, then the other's end; the connection ends once both ended, and
// the log counts exactly what moved. Each script byte is one step: its low
// two bits choose client write, upstream write, client half-close or
// upstream half-close, the rest the size of a write (up to 1 MiB, so
// that bulk writes take the loop's splice and the socket buffers fill).
func FuzzLoopRelay(f *testing.F) {
	ends := make(chan net.Conn, 1)
	u := newUpstream(f, "127.0.0.1:0", func(c net.Conn) {
		done := make(chan struct{})
		ends <- onClose{c.(*net.TCPConn), done}
		<-done // the script's end closes it
	})
	ch := startLoop(f, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true}, &l4aegisproxy.Handler{Upstream: u.Addr, HalfClose: true})
	logged := logSink(ch)
	f.Add([]byte{0x10, 0x11, 0x02, 0x03})
	f.Add([]byte{0xfc, 0xfd, 0x00, 0x01, 0x03, 0x04, 0x02})
	f.Fuzz(func(t *testing.T, script []byte) {
		if len(script) > 64 {
			script = script[:64]
		}
		client, err := net.DialTimeout("tcp", ch.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		var upc net.Conn
		select {
		case upc = <-ends:
		case <-time.After(5 * time.Second):
			t.Fatal("no connection reached the upstream")
		}
		defer upc.Close()
		deadline := time.Now().Add(20 * time.Second)
		_ = client.SetDeadline(deadline)
		_ = upc.SetDeadline(deadline)
		type result struct {
			n    int64
			hash [32]byte
			err  error
		}
		recv := func(c net.Conn) chan result {
			r := make(chan result, 1)
			go func() {
				n, h, err := drain(c)
				r <- result{n, h, err}
			}()
			return r
		}
		atUp, atClient := recv(upc), recv(client)
		sides := [2]net.Conn{client, upc}
		var sent [2]int64
		hashes := [2]hash.Hash{sha256.New(), sha256.New()}
		var shut [2]bool
		for i, op := range script {
			side := int(op & 1)
			if op&2 != 0 {
				if !shut[side] {
					shut[side] = true
					_ = sides[side].(interface{ CloseWrite() error }).CloseWrite()
				}
				continue
			}
			if shut[side] {
				continue
			}
			n := int64(op>>2) * int64(op>>2) * 256 // 0 to about 1 MiB
			if _, err := stream(io.MultiWriter(sides[side], hashes[side]), n, uint64(i)); err != nil {
				t.Fatalf("step %d: writing %d bytes: %v", i, n, err)
			}
			sent[side] += n
		}
		for side := range 2 {
			if !shut[side] {
				_ = sides[side].(interface{ CloseWrite() error }).CloseWrite()
			}
		}
		gu, gc := <-atUp, <-atClient
		if gu.err != nil || gu.n != sent[0] || gu.hash != [32]byte(hashes[0].Sum(nil)) {
			t.Fatalf("the upstream received %d bytes (%v), want the client's %d intact, then its end", gu.n, gu.err, sent[0])
		}
		if gc.err != nil || gc.n != sent[1] || gc.hash != [32]byte(hashes[1].Sum(nil)) {
			t.Fatalf("the client received %d bytes (%v), want the upstream's %d intact, then its end", gc.n, gc.err, sent[1])
		}
		r := nextLog(t, logged)
		// The end the relay sees first: one side's end may wait behind
		// its bytes while the other's arrives.
		if r.BytesSent != uint64(sent[0]) || r.BytesReceived != uint64(sent[1]) ||
			r.Reason != streamstate.ReasonClientClose && r.Reason != streamstate.ReasonUpstreamClose {
			t.Fatalf("log: %d sent, %d received, %q; want %d, %d, client_close or upstream_close", r.BytesSent, r.BytesReceived, r.Reason, sent[0], sent[1])
		}
	})
}

// onClose is a connection that closes done when it is closed.
type onClose struct {
	*net.TCPConn
	done chan struct{}
}

func (c onClose) Close() error {
	select {
	case <-c.done:
	default:
		close(c.done)
	}
	return c.TCPConn.Close()
}

// Closing an Accepter ends Run with os.ErrClosed, which the streams app's
// accept loop takes as its end (not an error to log and retry); so does
// Run after Close.
func TestAccepterClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	acc, err := l4aegisproxy.NewAccepter(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	go func() {
		ended <- acc.Run(func([]l4aegisproxy.Accepted) bool { return true })
	}()
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	acc.Close()
	select {
	case err := <-ended:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Run after Close: %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run still waiting 5s after Close")
	}
	if err := acc.Run(func([]l4aegisproxy.Accepted) bool { return true }); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Run of a closed Accepter: %v, want os.ErrClosed", err)
	}
}

// Run returns nil once its serve says no more, leaving the connections
// still pending in the listener's queue; a later Run takes them.
func TestAccepterRunStops(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc, err := l4aegisproxy.NewAccepter(ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	var served []l4aegisproxy.Accepted
	take := func(got []l4aegisproxy.Accepted) bool {
		served = append(served, got...)
		return false
	}
	dial(t, ln.Addr().String())
	if err := acc.Run(take); err != nil || len(served) != 1 {
		t.Fatalf("Run: %v, %d connections; want nil after 1", err, len(served))
	}
	// Nothing pending: a second connection comes after Run began.
	ran := make(chan error, 1)
	go func() { ran <- acc.Run(take) }()
	time.Sleep(50 * time.Millisecond)
	dial(t, ln.Addr().String())
	select {
	case err := <-ran:
		if err != nil || len(served) != 2 {
			t.Fatalf("second Run: %v, %d connections; want nil after 2", err, len(served))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("second Run took no connection within 5s")
	}
	for _, a := range served {
		a.Close()
	}
}

// Accepted sockets inherit TCP_NODELAY (which NewAccepter sets on the
// listener) and SO_KEEPALIVE: the loop sets neither on each connection.
func TestAcceptedSocketOptions(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rc, _ := ln.SyscallConn()
	_ = rc.Control(func(fd uintptr) { _ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1) })
	acc, err := l4aegisproxy.NewAccepter(ln)
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	c := dial(t, ln.Addr().String())
	var got []l4aegisproxy.Accepted
	err = acc.Run(func(batch []l4aegisproxy.Accepted) bool {
		got = append(got, batch...)
		return false
	})
	if err != nil || len(got) != 1 {
		t.Fatalf("Run: %d connections, %v", len(got), err)
	}
	defer got[0].Close()
	fd := l4aegisproxy.AcceptedFD(got[0])
	if v, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
		t.Errorf("TCP_NODELAY on the accepted socket: %d, %v; want it on", v, err)
	}
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE); err != nil || v == 0 {
		t.Errorf("SO_KEEPALIVE on the accepted socket: %d, %v; want it on", v, err)
	}
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Errorf("accepted socket blocking: flags %#x, %v", fl, err)
	}
	_ = c
}

// max_connections holds on the loop: a connection over it is refused
// (closed, counted as blocked) and one may open again once a slot is free.
func TestLoopMaxConnections(t *testing.T) {
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{MaxConnections: 2}, &l4aegisproxy.Handler{Upstream: u.Addr})
	a, b := dial(t, ch.addr), dial(t, ch.addr)
	roundTrip(t, a, []byte("a"))
	roundTrip(t, b, []byte("b"))
	wantEOF(t, dial(t, ch.addr))
	if n := ch.state().BlockedBy(streamstate.BlockMaxConnections); n != 1 {
		t.Fatalf("blocked by max_connections: %d, want 1", n)
	}
	a.Close()
	waitFor(t, "a slot free", func() bool { return ch.state().Active.Load() == 1 })
	roundTrip(t, dial(t, ch.addr), []byte("c"))
}

// stalledListener is a loopback address whose listener never accepts and
// whose queue is full: a connect to it gets no answer.
func stalledListener(t *testing.T) string {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*unix.SockaddrInet4).Port))
	// Fill the queue: later SYNs are dropped.
	for range 3 {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr
}

// A connect that gets no answer ends at the connection timeout, as
// dial_failed, with the upstream marked failed ("i/o timeout").
func TestLoopConnectTimeout(t *testing.T) {
	addr := stalledListener(t)
	const timeout = 300 * time.Millisecond
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{LogConnections: true},
		&l4aegisproxy.Handler{Upstream: addr, DialTimeout: caddy.Duration(timeout)})
	logged := logSink(ch)
	start := time.Now()
	c := dial(t, ch.addr)
	r := nextLog(t, logged)
	took := time.Since(start)
	if r.Reason != streamstate.ReasonDialFailed || took < timeout || took > timeout+time.Second {
		t.Fatalf("ended as %q after %s, want dial_failed after %s", r.Reason, took, timeout)
	}
	wantEOF(t, c)
	up := l4aegisproxy.ProxyState(ch.proxy).Upstream(addr)
	if !strings.Contains(up.LastError(), "i/o timeout") {
		t.Fatalf("upstream's last error %q, want the dial's timeout", up.LastError())
	}
}

// TestLoopReleasesAYieldingPacer: a log pacer that finds bytes waiting on
// a connection of the event loop yields until the loop, having relayed
// them, says Served at the end of its turn; without Served it would wait
// for its bound (logpace's yieldWait, a millisecond). The upstream here
// only reads, so each write of the client wakes the loop once. With one P
// the loop cannot run before the pacer asks. Out of 20 tries, some must be
// released early: on a loaded machine one may still take the millisecond.
func TestLoopReleasesAYieldingPacer(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	got := make(chan []byte, 32)
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		for {
			b := make([]byte, 64)
			n, err := c.Read(b)
			if err != nil {
				return
			}
			got <- b[:n]
		}
	})
	ch := startLoop(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	relayed := func(want string) {
		t.Helper()
		select {
		case b := <-got:
			if string(b) != want {
				t.Fatalf("upstream read %q, want %q", b, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%q did not reach the upstream", want)
		}
	}
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	relayed("hello")

	const tries = 20
	released := testenv.YieldsReleased(t, tries, func() error {
		_, err := c.Write([]byte("x"))
		return err
	}, func() error {
		relayed("x")
		return nil
	})
	if released == 0 {
		t.Fatalf("none of %d yields to the loop with bytes waiting was released early: it does not say Served", tries)
	}
	t.Logf("%d of %d yields released", released, tries)
}
