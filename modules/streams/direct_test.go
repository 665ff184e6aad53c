//go:build linux

package streams_test

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// A plain stream's connections are served by the event loop: 500 open
// ones hold no goroutine of the proxy, are listed and counted, keep
// running across a reload, one is closed by the API (admin_closed), and
// removing the stream ends the rest (stream_removed) with no goroutine or
// descriptor left.
func TestPlainStreamOnTheEventLoop(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const n = 500
	up := newUpstream(t, echo)
	port := freePort(t)
	cfg := hosts(host(1, port, up.Port, nil))
	inst := startCaddy(t, cfg)
	before := runtime.NumGoroutine()
	conns, want := openEchoed(t, port, n)
	// At once, not after a park: the upstream's handlers are a goroutine
	// per connection; the proxy adds none.
	if grew := runtime.NumGoroutine() - before; grew > n+10 {
		t.Fatalf("%d connections: %d more goroutines, want at most %d (the upstream's and the loop's)", n, grew, n+10)
	}
	if l := l4aegisproxy.LoopConns(); l != n {
		t.Fatalf("the event loops hold %d connections, want %d", l, n)
	}
	if active, err := streams.Running().ActiveConnections(1); err != nil || len(active) != n {
		t.Fatalf("active connections: %d, %v; want %d", len(active), err, n)
	}
	inst.waitStats(1, "the bytes counted", func(s spec.Status) bool {
		return s.BytesSent == want && s.BytesReceived == want && s.ActiveConnections == n
	})

	// A reload that keeps the stream keeps its connections on the loop.
	if err := inst.load(cfg); err != nil {
		t.Fatal(err)
	}
	for i, c := range conns {
		if got := roundTrip(t, c, "after the reload"); got != "after the reload" {
			t.Fatalf("connection %d after the reload: %q", i, got)
		}
	}
	if c := dial(t, port); roundTrip(t, c, "new") != "new" {
		t.Fatal("a new connection after the reload")
	}

	active, _ := streams.Running().ActiveConnections(1)
	if err := streams.Running().CloseConnection(1, active[0].ID); err != nil {
		t.Fatal(err)
	}
	inst.waitLog(1, "admin_closed", func(e logEntry) bool { return e.DisconnectReason == "admin_closed" })

	if err := inst.load(hosts()); err != nil {
		t.Fatal(err)
	}
	for _, c := range conns {
		expectClosed(t, c, 3*time.Second)
	}
	inst.waitLog(1, "stream_removed", func(e logEntry) bool { return e.DisconnectReason == "stream_removed" })
	if !testenv.Within(3*time.Second, func() bool { return l4aegisproxy.LoopConns() == 0 }) {
		t.Fatalf("the loops still hold %d connections", l4aegisproxy.LoopConns())
	}
}

// An API edit that gives a stream a setting the loop does not serve (a
// rate limit) leaves its open connections on the loop, and new ones take
// the handler chain; an edit back puts new ones on the loop again.
func TestEditChoosesThePathOfNewConnections(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	startCaddy(t, hosts())
	ctx := context.Background()
	s := apiStream(0, port, up.Port)
	hs, err := streams.CreateHost(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	s.ID = hs.ID
	a := dial(t, port)
	if roundTrip(t, a, "a") != "a" || l4aegisproxy.LoopConns() != 1 {
		t.Fatalf("a plain stream's connection: %d on the loop, want 1", l4aegisproxy.LoopConns())
	}

	s.UploadRateBytes = 1 << 30
	if _, err := streams.UpdateHost(ctx, s.ID, s); err != nil {
		t.Fatal(err)
	}
	// The accept loop waited on the loop's path: this one is handed over.
	for i := range 3 {
		b := dial(t, port)
		if got := roundTrip(t, b, "b"); got != "b" {
			t.Fatalf("new connection %d after the edit: %q", i, got)
		}
	}
	if got := roundTrip(t, a, "a again"); got != "a again" || l4aegisproxy.LoopConns() != 1 {
		t.Fatalf("the open connection after the edit: %q, %d on the loop; want it there alone", got, l4aegisproxy.LoopConns())
	}

	s.UploadRateBytes = 0
	if _, err := streams.UpdateHost(ctx, s.ID, s); err != nil {
		t.Fatal(err)
	}
	// The first one may be taken by the chain's accept, which was waiting.
	for i := 0; l4aegisproxy.LoopConns() < 2; i++ {
		if i == 3 {
			t.Fatalf("3 connections after the edit back: %d on the loop, want a new one there", l4aegisproxy.LoopConns())
		}
		c := dial(t, port)
		if got := roundTrip(t, c, "c"); got != "c" {
			t.Fatalf("new connection after the edit back: %q", got)
		}
	}
	if err := streams.DeleteHost(ctx, s.ID); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, a, 3*time.Second)
}
