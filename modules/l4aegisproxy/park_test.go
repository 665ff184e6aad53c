//go:build linux

package l4aegisproxy_test

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// startDetachChain serves guard → proxy as the streams app does: the
// chain may return before the connection ends (streamstate.DetachVar),
// and then the relay closes it and calls the DetachVar's func. Its
// cleanup closes what is open and fails the test if a connection is not
// ended within 5 s.
func startDetachChain(t *testing.T, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) *chain {
	t.Helper()
	h := provisionChain(t, guard, proxy)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var live sync.WaitGroup
	live.Add(1) // the accept loop
	go func() {
		defer live.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			live.Add(1)
			go func() {
				cx := layer4.WrapConnection(c, nil, zap.NewNop())
				cx.SetVar(streamstate.DetachVar, live.Done)
				_ = h.Handle(cx)
				if ss, _ := cx.GetVar(streamstate.SessionVar).(*streamstate.Session); ss != nil && ss.Detached() {
					return
				}
				c.Close()
				live.Done()
			}()
		}
	}()
	ch := &chain{guard: guard, proxy: proxy, addr: ln.Addr().String()}
	ch.endAtCleanup(t, &live, ln)
	return ch
}

// endAtCleanup makes t's cleanup close the listeners, then every open
// connection of ch, and fail the test if live (the accept loop and the
// connections) has not ended 5 s later.
func (ch *chain) endAtCleanup(t testing.TB, live *sync.WaitGroup, listeners ...io.Closer) {
	t.Cleanup(func() {
		for _, l := range listeners {
			l.Close()
		}
		ch.state().CloseAll(streamstate.ReasonShutdown)
		done := make(chan struct{})
		go func() { live.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("connections not ended 5s after they were closed")
		}
	})
}

// relayGoroutines counts the goroutines that run a relay.
func relayGoroutines() int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "l4aegisproxy.(*relay)") {
			n++
		}
	}
	return n
}

func roundTrip(t *testing.T, c net.Conn, msg []byte) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo: got %q, want %q", got, msg)
	}
}

const testParkDelay = 150 * time.Millisecond

// Quiet connections are parked: their relays hold no goroutine. Each
// resumes at its next byte, echoes byte-exact both ways, parks again, and
// the counters are exact throughout.
func TestParkFreesGoroutinesAndResumes(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	const n = 60
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startDetachChain(t, &l4aegisguard.Handler{IdleTimeout: caddy.Duration(time.Minute)}, &l4aegisproxy.Handler{Upstream: u.Addr})
	conns := make([]net.Conn, n)
	var want int
	for i := range conns {
		conns[i] = dial(t, ch.addr)
		msg := fmt.Appendf(nil, "hello %d", i)
		roundTrip(t, conns[i], msg)
		want += len(msg)
	}
	waitFor(t, fmt.Sprintf("%d connections parked", n), func() bool { return l4aegisproxy.Parked() == n })
	if g := relayGoroutines(); g > n/10 {
		t.Fatalf("%d goroutines run relays with %d connections parked, want at most %d", g, n, n/10)
	}
	st := ch.state()
	if tot := st.SinceReload(); st.Active.Load() != n || tot.BytesSent != uint64(want) || tot.BytesReceived != uint64(want) {
		t.Fatalf("parked: %d active, bytes %d/%d, want %d and %d each way", st.Active.Load(), tot.BytesSent, tot.BytesReceived, n, want)
	}
	// Every one resumes: a second message, larger than a step, each way.
	for i, c := range conns {
		msg := bytes.Repeat(fmt.Appendf(nil, "again %d;", i), 4000)
		roundTrip(t, c, msg)
		want += len(msg)
	}
	waitFor(t, "the connections parked again", func() bool { return l4aegisproxy.Parked() == n })
	if tot := st.SinceReload(); tot.BytesSent != uint64(want) || tot.BytesReceived != uint64(want) {
		t.Fatalf("after resuming: bytes %d/%d, want %d each way", tot.BytesSent, tot.BytesReceived, want)
	}
	for _, c := range conns {
		c.Close()
	}
	waitFor(t, "the connections to end", func() bool { return st.Active.Load() == 0 && l4aegisproxy.Parked() == 0 })
}

// The idle timeout of a parked connection ends it when it would have
// without the park, with reason idle_timeout and a log entry.
func TestParkedIdleTimeout(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	const idle = 700 * time.Millisecond
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startDetachChain(t, &l4aegisguard.Handler{IdleTimeout: caddy.Duration(idle), LogConnections: true}, &l4aegisproxy.Handler{Upstream: u.Addr})
	logged := make(chan streamstate.LogRecord, 1)
	ch.state().SetLogSink(func(r streamstate.LogRecord) bool { logged <- r; return true })
	c := dial(t, ch.addr)
	roundTrip(t, c, []byte("x"))
	last := time.Now() // the last byte moved before this
	waitFor(t, "the connection parked", func() bool { return l4aegisproxy.Parked() == 1 })
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("parked idle connection: read %d, %v; want EOF", n, err)
	}
	if took := time.Since(last); took < idle-50*time.Millisecond || took > idle+300*time.Millisecond {
		t.Fatalf("parked connection closed %s after its last byte, want about %s", took, idle)
	}
	select {
	case r := <-logged:
		if r.Reason != streamstate.ReasonIdleTimeout || r.BytesSent != 1 || r.BytesReceived != 1 {
			t.Fatalf("log entry: reason %q, bytes %d/%d; want idle_timeout, 1/1", r.Reason, r.BytesSent, r.BytesReceived)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no log entry for the parked connection's end")
	}
	if ch.state().Active.Load() != 0 || l4aegisproxy.Parked() != 0 {
		t.Fatalf("after the idle timeout: %d active, %d parked", ch.state().Active.Load(), l4aegisproxy.Parked())
	}
}

// Closing a parked connection's session (the API, a stream's stop) ends
// it at once: closing a socket in an epoll set wakes nothing by itself.
func TestParkedSessionClose(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	upEnd := make(chan struct{})
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) { echo(c); close(upEnd) })
	ch := startDetachChain(t, &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	roundTrip(t, c, []byte("x"))
	waitFor(t, "the connection parked", func() bool { return l4aegisproxy.Parked() == 1 })
	ss := ch.session(t)
	start := time.Now()
	ss.Close(streamstate.ReasonAdminClosed)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("closed parked connection: read %d, %v; want EOF", n, err)
	}
	select {
	case <-upEnd:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream saw no end")
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("closing a parked connection took %s", took)
	}
	waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
	if ss.Reason() != streamstate.ReasonAdminClosed || l4aegisproxy.Parked() != 0 {
		t.Fatalf("reason %q, %d parked; want admin_closed, 0", ss.Reason(), l4aegisproxy.Parked())
	}
}

// A Close that comes as a connection is first parked (its sockets in the
// parker, the handlers not yet told) ends it: it is not left parked with
// closed sockets, holding its slot until the stream stops.
func TestSessionClosedAsItParks(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	var once atomic.Bool
	t.Cleanup(l4aegisproxy.SetParkedHook(func(ss *streamstate.Session) {
		if !once.CompareAndSwap(false, true) {
			return
		}
		done := make(chan struct{})
		go func() { ss.Close(streamstate.ReasonAdminClosed); close(done) }()
		for !ss.Closed() {
			runtime.Gosched()
		}
		// A Close that found the Waker waits for the parker's lock, which
		// this holds: it goes on once the park is done.
		select {
		case <-done:
		case <-time.After(50 * time.Millisecond):
		}
	}))
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startDetachChain(t, &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	roundTrip(t, c, []byte("x"))
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("connection closed as it parked: read %d, %v; want EOF", n, err)
	}
	waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
	if n := l4aegisproxy.Parked(); n != 0 {
		t.Fatalf("%d connections parked after the close", n)
	}
}

// With half_close, a connection one side of which has ended parks with
// the other, and that side's bytes and end still arrive.
func TestParkHalfClose(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	reply := make(chan struct{})
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		got, _ := io.ReadAll(c) // to the client's end
		<-reply
		_, _ = c.Write(append([]byte("reply to "), got...))
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
	ch := startDetachChain(t, &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr, HalfClose: true})
	c := dial(t, ch.addr)
	if _, err := c.Write([]byte("question")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the half-closed connection parked", func() bool { return l4aegisproxy.Parked() == 1 })
	if g := relayGoroutines(); g != 0 {
		t.Fatalf("%d relay goroutines with the connection parked", g)
	}
	close(reply)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "reply to question" {
		t.Fatalf("client read %q, %v; want %q and EOF", got, err, "reply to question")
	}
	st := ch.state()
	waitFor(t, "the connection to end", func() bool { return st.Active.Load() == 0 })
	if tot := st.SinceReload(); tot.BytesSent != 8 || tot.BytesReceived != 17 {
		t.Fatalf("bytes %d/%d, want 8 and 17", tot.BytesSent, tot.BytesReceived)
	}
}

// A plain layer4 server closes the connection when the chain returns: the
// relay never parks there, and the connection keeps its goroutines.
func TestPlainLayer4NeverParks(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(testParkDelay)) // after the chain's cleanup
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startChain(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	roundTrip(t, c, []byte("x"))
	time.Sleep(4 * testParkDelay)
	if p, g := l4aegisproxy.Parked(), relayGoroutines(); p != 0 || g != 2 {
		t.Fatalf("plain layer4, quiet for %s: %d parked, %d relay goroutines; want 0 and 2", 4*testParkDelay, p, g)
	}
	roundTrip(t, c, []byte("still relayed"))
}

func echo(c net.Conn) { _, _ = io.Copy(c, c) }

// Connections move between parked and relaying at random while others
// do, with messages of random sizes: every byte arrives and is counted.
// Then every session is closed at a random moment, parked or relaying or
// in between: each ends, and nothing is left parked or running.
func TestParkUnderLoad(t *testing.T) {
	t.Cleanup(l4aegisproxy.SetParkDelay(50 * time.Millisecond)) // after the chain's cleanup
	const n, rounds = 40, 6
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startDetachChain(t, &l4aegisguard.Handler{IdleTimeout: caddy.Duration(time.Minute)}, &l4aegisproxy.Handler{Upstream: u.Addr})
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = dial(t, ch.addr)
	}
	var moved, mostParked atomic.Int64
	stopSampling := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(5 * time.Millisecond):
				mostParked.Store(max(mostParked.Load(), int64(l4aegisproxy.Parked())))
			}
		}
	}()
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			for r := range rounds {
				time.Sleep(time.Duration(rng.IntN(150)) * time.Millisecond) // parks about half the time
				msg := bytes.Repeat([]byte{byte(i), byte(r)}, 1+rng.IntN(40000))
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := c.Write(msg); err != nil {
					t.Errorf("connection %d round %d: %v", i, r, err)
					return
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					t.Errorf("connection %d round %d: %v, intact %v", i, r, err, bytes.Equal(got, msg))
					return
				}
				moved.Add(int64(len(msg)))
			}
		})
	}
	wg.Wait()
	close(stopSampling)
	if mostParked.Load() < n/4 {
		t.Fatalf("at most %d of %d connections parked at once", mostParked.Load(), n)
	}
	st := ch.state()
	// A relay counts a write once it returns, which can be just after the
	// client has read the bytes.
	waitFor(t, fmt.Sprintf("%d bytes counted each way", moved.Load()), func() bool {
		tot := st.SinceReload()
		return tot.BytesSent == uint64(moved.Load()) && tot.BytesReceived == uint64(moved.Load())
	})

	// Each client goes on sending while its session is closed at a random
	// moment.
	var sessions []*streamstate.Session
	st.Sessions(func(ss *streamstate.Session) bool { sessions = append(sessions, ss); return true })
	for i, c := range conns {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 2))
			for {
				time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := c.Write([]byte("ping")); err != nil {
					return
				}
				if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
					return
				}
			}
		})
	}
	for _, ss := range sessions {
		wg.Go(func() {
			time.Sleep(time.Duration(rand.N(300)) * time.Millisecond)
			ss.Close(streamstate.ReasonAdminClosed)
		})
	}
	wg.Wait()
	waitFor(t, "every connection to end", func() bool {
		return st.Active.Load() == 0 && l4aegisproxy.Parked() == 0 && relayGoroutines() == 0
	})
	for _, ss := range sessions {
		if ss.Reason() != streamstate.ReasonAdminClosed {
			t.Errorf("session %d: reason %q, want admin_closed", ss.ID, ss.Reason())
		}
	}
}

// A relay that may park (the streams app's) moves a message each way
// without allocating, as the plain one does
// (TestRelayStepsDoNotAllocate).
func TestDetachedRelayStepsDoNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates; `make test` runs this without it")
	}
	u := newUpstream(t, "127.0.0.1:0", echo)
	ch := startDetachChain(t, &l4aegisguard.Handler{IdleTimeout: caddy.Duration(time.Minute)}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	msg, buf := make([]byte, 64), make([]byte, 64)
	roundTrip := func() {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	}
	for range 50 {
		roundTrip() // warm up the pools
	}
	if allocs := testing.AllocsPerRun(500, roundTrip); allocs > 0.05 {
		t.Fatalf("%.2f allocations per round trip through a relay that may park, want 0", allocs)
	}
}
