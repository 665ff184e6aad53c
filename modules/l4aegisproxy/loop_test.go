package l4aegisproxy_test

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// startLoop serves guard → proxy on the event loop as the streams app
// does for a plain stream: accept4 on the listener's socket, then
// Direct.Serve. Its cleanup closes what is open and fails the test if a
// connection is not ended within 5 s.
func startLoop(t *testing.T, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) *chain {
	t.Helper()
	provisionChain(t, guard, proxy)
	d := l4aegisproxy.NewDirect(guard.Policy(), guard.State(), proxy)
	if d == nil {
		t.Fatal("NewDirect: nil for a plain stream")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
		for {
			got, err := acc.Accept()
			for _, a := range got {
				live.Add(1)
				d.Serve(acc, a, live.Done)
			}
			if err != nil {
				t.Logf("accept: %v", err)
				return
			}
		}
	}()
	ch := &chain{guard: guard, proxy: proxy, addr: ln.Addr().String()}
	t.Cleanup(func() {
		ln.Close()
		acc.Close()
		ch.state().CloseAll(streamstate.ReasonShutdown)
		done := make(chan struct{})
		go func() { live.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("connections not ended 5s after they were closed")
		}
	})
	return ch
}

// Short connections as the bench makes them: connect, 32 bytes each way,
// close; eight at a time.
func TestLoopShortConnections(t *testing.T) {
	up := newUpstream(t, "127.0.0.1:0", echo)
	ch := startLoop(t, &l4aegisguard.Handler{StreamID: 0, LogConnections: true}, &l4aegisproxy.Handler{Upstream: up.Addr})
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
