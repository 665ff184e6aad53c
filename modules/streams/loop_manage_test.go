package streams_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// echoRounds runs rounds of echo on c (rounds < 0: until one fails): each
// round writes a random number of random bytes, 1 to maxSize, reads them
// back and checks them, then pauses as pause says. It returns the bytes
// echoed (each way) by the rounds that completed.
func echoRounds(c net.Conn, seed uint64, rounds, maxSize int, pause func(*rand.Rand) time.Duration) (int64, error) {
	rng := rand.New(rand.NewPCG(seed, 7))
	var moved int64
	for i := 0; rounds < 0 || i < rounds; i++ {
		n := 1 + rng.IntN(maxSize)
		if err := echoAll(c, randomBytes(rng.Uint64(), n), rng.Uint64()); err != nil {
			return moved, fmt.Errorf("round %d: %v", i, err)
		}
		moved += int64(n)
		if pause != nil {
			time.Sleep(pause(rng))
		}
	}
	return moved, nil
}

// findConn returns the open connection of stream id from the client c.
func findConn(t *testing.T, id int64, c net.Conn) (spec.ActiveConn, bool) {
	t.Helper()
	list, err := streams.Running().ActiveConnections(id)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range list {
		if a.Source == c.LocalAddr().String() {
			return a, true
		}
	}
	return spec.ActiveConn{}, false
}

// The live list of open connections shows a connection whose bytes move
// with bytes that grow between two listings, and a quiet one with its
// exact bytes; the API closes each (admin_closed), the moving one in the
// middle of a transfer: its client and upstream see the end, a second
// close finds nothing, and the stats and the log agree to the byte.
func TestLoopLiveListAndClose(t *testing.T) {
	checkNoLeaksOrFDs(t)
	echoUp := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, echoUp.Port, nil)))

	busy, quiet := dial(t, port), dial(t, port)
	if got := roundTrip(t, quiet, "quiet"); got != "quiet" {
		t.Fatalf("round trip: %q", got)
	}
	type result struct {
		moved int64
		err   error
	}
	busyDone := make(chan result, 1)
	go func() {
		moved, err := echoRounds(busy, 1, -1, 64<<10, nil)
		busyDone <- result{moved, err}
	}()

	first, ok := findConn(t, 1, busy)
	if !ok {
		t.Fatal("the busy connection is not in the live list")
	}
	var later spec.ActiveConn
	if !testenv.Within(5*time.Second, func() bool {
		later, ok = findConn(t, 1, busy)
		return ok && later.BytesSent > first.BytesSent && later.BytesReceived > first.BytesReceived
	}) {
		t.Fatalf("the busy connection's bytes did not grow in the live list within 5s: %+v, then %+v", first, later)
	}
	time.Sleep(quietPause)
	q, ok := findConn(t, 1, quiet)
	if !ok || q.BytesSent != 5 || q.BytesReceived != 5 || q.Protocol != "tcp" || q.SourceIP != "127.0.0.1" ||
		q.Upstream != fmt.Sprintf("127.0.0.1:%d", echoUp.Port) {
		t.Fatalf("the quiet connection in the live list: %+v, %v", q, ok)
	}

	if err := streams.Running().CloseConnection(1, later.ID); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-busyDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the busy connection still echoes 5s after the API closed it")
	}
	t.Logf("the busy connection echoed %d KiB before the close: %v", r.moved>>10, r.err)
	if err := streams.Running().CloseConnection(1, later.ID); !errors.Is(err, spec.ErrNotFound) {
		t.Errorf("closing it again: %v, want not found", err)
	}
	if err := streams.Running().CloseConnection(1, q.ID); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, quiet, 5*time.Second)

	// The quiet one's bytes are exact; the busy one's are at least those
	// of the rounds it completed (a round may have been under way).
	entries := inst.waitLogs(1, 2, 10*time.Second)
	var sent, received uint64
	quietSeen := false
	for _, e := range entries {
		quietOne := e.BytesSent == 5 && e.BytesReceived == 5 && !quietSeen
		quietSeen = quietSeen || quietOne
		if e.DisconnectReason != "admin_closed" || !quietOne && (e.BytesSent < uint64(r.moved) || e.BytesReceived < uint64(r.moved)) {
			t.Errorf("log entry %+v: want admin_closed, and 5 bytes each way or at least the %d echoed", e, r.moved)
		}
		sent += e.BytesSent
		received += e.BytesReceived
	}
	if !quietSeen {
		t.Errorf("no log entry of the quiet connection (5 bytes each way): %+v", entries)
	}
	inst.expectTotals(1, 2, sent, received)
}

// API edits and config reloads while connections move bytes (in rounds of
// random sizes with random pauses, some longer than a quiet connection
// stays active) change nothing for them: every byte arrives, none is
// refused or cut, and the metrics (which, unlike the stats, count across
// reloads) and the log are exact.
func TestLoopEditsKeepTransfersMoving(t *testing.T) {
	checkNoLeaksOrFDs(t)
	echoUp := newUpstream(t, echo)
	pCfg := freePort(t)
	cfg := func(i int) map[string]any {
		return hosts(host(1, pCfg, echoUp.Port, map[string]any{
			"notes": fmt.Sprintf("reload %d", i), "idle_timeout_seconds": 30 * (i % 2), "max_connections": 100 * (i % 2)}))
	}
	inst := startCaddy(t, cfg(0))
	api := apiStream(2, freePort(t), echoUp.Port)
	if _, err := streams.CreateHost(context.Background(), api); err != nil {
		t.Fatal(err)
	}

	const perStream, rounds = 4, 10
	var wg sync.WaitGroup
	errs := make(chan error, 2*perStream)
	var moved [3]atomic.Int64
	for _, s := range []struct {
		id   int64
		port int
	}{{1, pCfg}, {2, api.ListenPort}} {
		for i := range perStream {
			c := dial(t, s.port)
			wg.Go(func() {
				defer c.Close()
				n, err := echoRounds(c, uint64(10*s.id)+uint64(i), rounds, 256<<10, func(rng *rand.Rand) time.Duration {
					return time.Duration(rng.IntN(500)) * time.Millisecond
				})
				moved[s.id].Add(n)
				if err != nil {
					errs <- fmt.Errorf("stream %d, connection %d: %v", s.id, i, err)
				}
			})
		}
	}
	edits := 0
	for done := false; !done; edits++ {
		time.Sleep(200 * time.Millisecond)
		if err := inst.load(cfg(edits + 1)); err != nil {
			t.Fatalf("reload %d: %v", edits+1, err)
		}
		api.Name, api.Notes = fmt.Sprintf("edit-%d", edits), fmt.Sprintf("edit %d", edits)
		api.IdleTimeoutSeconds, api.MaxConnections = 30*(edits%2), 100*(edits%2)
		if _, err := streams.UpdateHost(context.Background(), 2, api); err != nil {
			t.Fatalf("edit %d: %v", edits, err)
		}
		st := inst.stats()
		done = len(errs) > 0 || st[1].ActiveConnections+st[2].ActiveConnections == 0
		if edits > 100 {
			t.Fatal("the transfers still run after 100 edits")
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d reloads and %d API edits while the transfers ran", edits, edits)
	for id := int64(1); id <= 2; id++ {
		m := uint64(moved[id].Load())
		// The stats count since the last reload: the metrics since the
		// stream started.
		inst.waitStats(id, "no open connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
		sc, ids := inst.scrape(), fmt.Sprint(id)
		if n, up, down := sc.value("aegis_stream_connections_total", "id", ids),
			sc.value("aegis_stream_bytes_total", "id", ids, "direction", "client_to_upstream"),
			sc.value("aegis_stream_bytes_total", "id", ids, "direction", "upstream_to_client"); n != perStream || up != float64(m) || down != float64(m) {
			t.Errorf("stream %d: metrics say %v connections, %v bytes up, %v down; want %d, %d, %d", id, n, up, down, perStream, m, m)
		}
		entries := inst.waitLogs(id, perStream, 10*time.Second)
		var sent, received uint64
		for _, e := range entries {
			if e.DisconnectReason != "client_close" {
				t.Errorf("stream %d: log entry %+v, want client_close", id, e)
			}
			sent += e.BytesSent
			received += e.BytesReceived
		}
		if sent != m || received != m {
			t.Errorf("stream %d: the log has %d bytes sent and %d received, want %d each", id, sent, received, m)
		}
	}
}

// Stop gives open connections the grace period: a transfer that ends
// within it completes, byte for byte, and is logged client_close; a quiet
// connection and a busy one still open at its end are closed then, not
// before, and logged (stream_removed: the process does not exit here);
// the port stops listening at once.
func TestLoopStopGracePeriod(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const grace = 1500 * time.Millisecond
	echoUp := newUpstream(t, echo)
	port := freePort(t)
	app := hosts(host(1, port, echoUp.Port, nil))
	app["grace_period"] = grace.String()
	inst := startCaddy(t, app)

	finishing, quiet, busy := dial(t, port), dial(t, port), dial(t, port)
	for _, c := range []net.Conn{finishing, quiet, busy} {
		if got := roundTrip(t, c, "hello"); got != "hello" {
			t.Fatalf("round trip: %q", got)
		}
	}
	time.Sleep(quietPause)
	start := make(chan struct{})
	type result struct {
		moved int64
		err   error
		after time.Duration
	}
	finished, busyDone, quietDone := make(chan result, 1), make(chan result, 1), make(chan result, 1)
	var stopAt time.Time
	go func() {
		<-start
		// About half a second of rounds, then the client's end.
		n, err := echoRounds(finishing, 3, 8, 64<<10, func(*rand.Rand) time.Duration { return 60 * time.Millisecond })
		finishing.Close()
		finished <- result{n, err, time.Since(stopAt)}
	}()
	go func() {
		<-start
		n, err := echoRounds(busy, 4, -1, 16<<10, nil)
		busyDone <- result{n, err, time.Since(stopAt)}
	}()
	go func() {
		<-start
		_ = quiet.SetReadDeadline(time.Now().Add(grace + 5*time.Second))
		_, err := quiet.Read(make([]byte, 1))
		quietDone <- result{0, err, time.Since(stopAt)}
	}()

	stopAt = time.Now()
	close(start)
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	stopTook := time.Since(stopAt)
	if !refusedAt(t, port) {
		t.Error("the port still listens after Stop")
	}
	f, b, q := <-finished, <-busyDone, <-quietDone
	t.Logf("Stop took %s; the finishing transfer ended after %s, the busy one was cut after %s, the quiet one after %s",
		stopTook.Round(time.Millisecond), f.after.Round(time.Millisecond), b.after.Round(time.Millisecond), q.after.Round(time.Millisecond))
	if f.err != nil {
		t.Errorf("a transfer that ends within the grace period: %v", f.err)
	}
	for what, r := range map[string]result{"busy": b, "quiet": q} {
		if r.err == nil || isTimeout(r.err) {
			t.Errorf("the %s connection: %v, want it closed at the end of the grace period", what, r.err)
		}
		if r.after < grace-100*time.Millisecond || r.after > grace+2*time.Second {
			t.Errorf("the %s connection was closed %s after Stop began, want at the end of the %s grace period", what, r.after, grace)
		}
	}
	entries := inst.waitLogs(1, 3, 10*time.Second)
	got := reasons(entries)
	if got["client_close"] != 1 || got["stream_removed"] != 2 {
		t.Errorf("reasons %v, want client_close for the finished transfer and stream_removed for the two cut", got)
	}
	for _, e := range entries {
		if e.DisconnectReason == "client_close" && (e.BytesSent != 5+uint64(f.moved) || e.BytesReceived != 5+uint64(f.moved)) {
			t.Errorf("the finished transfer: log entry %+v, want %d bytes each way", e, 5+f.moved)
		}
		if e.DisconnectReason == "stream_removed" && e.BytesSent == 5 && e.BytesReceived != 5 {
			t.Errorf("the quiet connection: log entry %+v, want 5 bytes each way", e)
		}
	}
}
