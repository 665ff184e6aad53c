package streams_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/spec"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// ---- helpers of these tests ------------------------------------------------

// handedUpstream is an upstream whose accepted connections are handed to
// the test, which drives them itself; they are closed with the test.
func handedUpstream(t *testing.T) (*loopback.Server, <-chan net.Conn) {
	t.Helper()
	conns := make(chan net.Conn, 16)
	done := make(chan struct{})
	u := newUpstream(t, func(c net.Conn) {
		select {
		case conns <- c:
		case <-done:
			return
		}
		<-done
	})
	t.Cleanup(func() { close(done) }) // runs before the upstream's close
	return u, conns
}

func nextConn(t *testing.T, conns <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-conns:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream got no connection within 5s")
		return nil
	}
}

// arrivals records when bytes arrive at one end of a transfer.
type arrivals struct {
	total atomic.Int64
	mu    sync.Mutex
	at    []time.Time
	sum   []int64 // cumulative bytes at at[i]
}

// read reads c until it fails, recording each read; it gives up after limit.
func (a *arrivals) read(c net.Conn, limit time.Duration) {
	_ = c.SetReadDeadline(time.Now().Add(limit))
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			now := time.Now()
			tot := a.total.Add(int64(n))
			a.mu.Lock()
			a.at = append(a.at, now)
			a.sum = append(a.sum, tot)
			a.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// first is when the first bytes arrived.
func (a *arrivals) first() (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.at) == 0 {
		return time.Time{}, false
	}
	return a.at[0], true
}

// by returns the bytes that had arrived by time t.
func (a *arrivals) by(t time.Time) int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	i, _ := slices.BinarySearchFunc(a.at, t, func(x, t time.Time) int {
		if x.After(t) {
			return 1
		}
		return -1
	})
	if i == 0 {
		return 0
	}
	return a.sum[i-1]
}

// paceWrites keeps about window bytes in flight on c (sent, minus what the
// far end has received) until stop closes, so the proxy is never starved
// but little is left queued in socket buffers when the writer stops.
func paceWrites(c net.Conn, sent *atomic.Int64, recv *arrivals, window int64, stop <-chan struct{}) error {
	buf := bytes.Repeat([]byte("rate-limited "), 16<<10/13+1)[:16<<10]
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-stop:
			return nil
		default:
		}
		if sent.Load()-recv.total.Load() >= window {
			time.Sleep(2 * time.Millisecond)
			continue
		}
		_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Write(buf)
		sent.Add(int64(n))
		if err != nil {
			return err
		}
	}
	return errors.New("paced writer ran for 30s")
}

// apiGet fetches path from the admin endpoint and returns the status and body.
func (inst *testCaddy) apiGet(path string) (int, []byte) {
	inst.t.Helper()
	return inst.apiDo(http.MethodGet, path)
}

func (inst *testCaddy) apiDo(method, path string) (int, []byte) {
	inst.t.Helper()
	req, err := http.NewRequest(method, "http://"+inst.admin+path, nil)
	if err != nil {
		inst.t.Fatal(err)
	}
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	// Each config load replaces Caddy's admin server, which closes the
	// connections of the one before; a GET that meets that close (EOF) is
	// sent again on a new connection, up to 4 times.
	for try := 0; err != nil && method == http.MethodGet && errors.Is(err, io.EOF) && try < 4; try++ {
		time.Sleep(100 * time.Millisecond)
		client.CloseIdleConnections()
		resp, err = client.Do(req)
	}
	if err != nil {
		inst.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		inst.t.Fatal(err)
	}
	return resp.StatusCode, body
}

// rawStats returns the stats as the API returns them, as plain JSON
// objects by id.
func (inst *testCaddy) rawStats() map[int64]map[string]any {
	inst.t.Helper()
	body := statsJSON(inst.t)
	var list []map[string]any
	if err := json.Unmarshal(body, &list); err != nil {
		inst.t.Fatalf("stats are not a JSON array: %v: %s", err, body)
	}
	out := make(map[int64]map[string]any, len(list))
	for _, s := range list {
		id, _ := s["id"].(float64)
		out[int64(id)] = s
	}
	return out
}

func mustContainAll(t *testing.T, what string, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got no error, want one containing %q", what, parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("%s: error %q does not contain %q", what, err, p)
		}
	}
}

// ---- 1. rate limits -----------------------------------------------------------

// TestRateLimits measures upload_rate_bytes and download_rate_bytes at the
// receiving end, on two streams at once: over 10 s each stays within ±5% of
// its limit, and after 2 s idle a burst carries at most one second's worth
// (plus one relay read of 32 KiB).
func TestRateLimits(t *testing.T) {
	checkNoLeaks(t)
	const (
		rate   = 256 << 10
		window = 10 * time.Second
		slack  = 32 << 10 // one read of the relay's copy buffer
		burst  = 100 * time.Millisecond
	)
	up, conns := handedUpstream(t)
	pUp, pDown := freePort(t), freePort(t)
	startCaddy(t, hosts(
		host(1, pUp, up.Port, map[string]any{"upload_rate_bytes": rate}),
		host(2, pDown, up.Port, map[string]any{"download_rate_bytes": rate}),
	))

	type direction struct {
		name       string
		send, recv net.Conn
		got        arrivals
		sent       atomic.Int64
		done       chan struct{} // the reader has ended
	}
	cUp := dial(t, pUp)
	uUp := nextConn(t, conns)
	cDown := dial(t, pDown)
	uDown := nextConn(t, conns)
	dirs := []*direction{
		{name: "upload", send: cUp, recv: uUp, done: make(chan struct{})},
		{name: "download", send: uDown, recv: cDown, done: make(chan struct{})},
	}
	stop := make(chan struct{})
	var writers sync.WaitGroup
	for _, d := range dirs {
		go func() {
			defer close(d.done)
			d.got.read(d.recv, 25*time.Second)
		}()
		writers.Add(1)
		go func() {
			defer writers.Done()
			if err := paceWrites(d.send, &d.sent, &d.got, 96<<10, stop); err != nil {
				t.Errorf("%s: writing: %v", d.name, err)
			}
		}()
	}
	defer func() {
		for _, d := range dirs {
			d.send.Close()
			d.recv.Close()
			<-d.done
		}
	}()

	var t0 [2]time.Time
	deadline := time.Now().Add(5 * time.Second)
	for i, d := range dirs {
		for {
			if f, ok := d.got.first(); ok {
				t0[i] = f
				break
			}
			if time.Now().After(deadline) {
				close(stop)
				t.Fatalf("%s: no byte arrived within 5s", d.name)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	time.Sleep(time.Until(t0[0].Add(window + 100*time.Millisecond)))
	time.Sleep(time.Until(t0[1].Add(window + 100*time.Millisecond)))
	close(stop)
	writers.Wait()

	for i, d := range dirs {
		n := d.got.by(t0[i].Add(window)) - d.got.by(t0[i])
		measured := float64(n) / window.Seconds()
		t.Logf("%s: %d bytes in %s = %.0f B/s (limit %d)", d.name, n, window, measured, rate)
		if measured < rate*0.95 || measured > rate*1.05 {
			t.Errorf("%s: %.0f B/s over %s, want %d ±5%%", d.name, measured, window, rate)
		}
	}

	// Let what is in flight arrive, then leave both connections idle for 2s.
	for _, d := range dirs {
		for deadline := time.Now().Add(3 * time.Second); d.got.total.Load() < d.sent.Load(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d bytes arrived 3s after the writer stopped", d.name, d.got.total.Load(), d.sent.Load())
			}
		}
	}
	time.Sleep(2 * time.Second)

	var resumed [2]time.Time
	var before [2]int64
	for i, d := range dirs {
		before[i] = d.got.total.Load()
		resumed[i] = time.Now()
		go func() {
			_ = d.send.SetWriteDeadline(time.Now().Add(3 * time.Second))
			_, _ = d.send.Write(make([]byte, 4*rate)) // far more than any burst
		}()
	}
	time.Sleep(burst + 150*time.Millisecond)
	for i, d := range dirs {
		got := d.got.by(resumed[i].Add(burst)) - before[i]
		t.Logf("%s: %d bytes in the first %s after 2s idle", d.name, got, burst)
		if got > rate+slack {
			t.Errorf("%s: %d bytes arrived in the first %s after 2s idle: a burst may carry at most one second's worth (%d) plus one read (%d)",
				d.name, got, burst, rate, slack)
		}
		if got == 0 && d.got.total.Load() == before[i] {
			t.Errorf("%s: nothing arrived after resuming", d.name)
		}
	}
}

// ---- 2. PROXY protocol --------------------------------------------------------

// TestProxyProtocolHeaders sends PROXY v1 and v2 headers, over IPv4 and
// IPv6, to an upstream that reads them with go-proxyproto: the source is
// the client's own address and port, the destination the stream's listen
// address, and the payload after the header arrives intact.
func TestProxyProtocolHeaders(t *testing.T) {
	checkNoLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := &proxyproto.Listener{Listener: ln, ReadHeaderTimeout: 5 * time.Second}
	type result struct {
		hdr *proxyproto.Header
		err error
	}
	results := make(chan result, 8)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := pl.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				hdr := c.(*proxyproto.Conn).ProxyHeader()
				var err error
				if hdr == nil {
					_, err = c.Read(make([]byte, 1)) // says why there is no header
				}
				results <- result{hdr, err}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { pl.Close(); wg.Wait() })
	upPort := ln.Addr().(*net.TCPAddr).Port

	type tc struct {
		id      int64
		version int
		addr    string
		port    int
	}
	var cases []tc
	var hs []map[string]any
	for i, v := range []struct {
		version int
		addr    string
	}{{1, "127.0.0.1"}, {2, "127.0.0.1"}, {1, "::1"}, {2, "::1"}} {
		c := tc{int64(i + 1), v.version, v.addr, freePort(t)}
		cases = append(cases, c)
		hs = append(hs, host(c.id, c.port, upPort, map[string]any{"listen_address": c.addr, "proxy_protocol_version": c.version}))
	}
	startCaddy(t, hosts(hs...))

	payload := make([]byte, 256<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range payload {
		payload[i] = byte(rng.Uint32())
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("v%d %s", c.version, c.addr), func(t *testing.T) {
			conn, err := net.DialTimeout("tcp", net.JoinHostPort(c.addr, strconv.Itoa(c.port)), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			go func() { _, _ = conn.Write(payload) }()
			echoed := make([]byte, len(payload))
			if _, err := io.ReadFull(conn, echoed); err != nil {
				t.Fatalf("reading the echo: %v", err)
			}
			if !bytes.Equal(echoed, payload) {
				t.Fatal("the payload after the header did not arrive intact")
			}
			var r result
			select {
			case r = <-results:
			case <-time.After(5 * time.Second):
				t.Fatal("upstream reported no header")
			}
			if r.hdr == nil {
				t.Fatalf("go-proxyproto found no valid header (err %v)", r.err)
			}
			src, dst, ok := r.hdr.TCPAddrs()
			me := conn.LocalAddr().(*net.TCPAddr)
			if !ok || int(r.hdr.Version) != c.version {
				t.Fatalf("header %+v: want a v%d TCP header", r.hdr, c.version)
			}
			if !src.IP.Equal(me.IP) || src.Port != me.Port {
				t.Errorf("header source %v, want the client's address %v", src, me)
			}
			if want := net.ParseIP(c.addr); !dst.IP.Equal(want) || dst.Port != c.port {
				t.Errorf("header destination %v, want the stream's listen address %s", dst, net.JoinHostPort(c.addr, strconv.Itoa(c.port)))
			}
			wantFam := proxyproto.TCPv4
			if strings.Contains(c.addr, ":") {
				wantFam = proxyproto.TCPv6
			}
			if r.hdr.TransportProtocol != wantFam {
				t.Errorf("transport %v, want %v", r.hdr.TransportProtocol, wantFam)
			}
		})
	}
}

// ---- 3. health checks -------------------------------------------------------

// TestHealthChecks follows an upstream going down and coming back, and
// shows a stream without checks as not_checked with healthy null.
func TestHealthChecks(t *testing.T) {
	checkNoLeaks(t)
	// A port outside the ephemeral range, so no outgoing connection takes it
	// while the upstream is down and it can listen there again.
	up := loopback.Serve(t, fmt.Sprintf("127.0.0.1:%d", freePort(t)), echo)
	other := newUpstream(t, echo)
	p1, p2 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		host(1, p1, up.Port, map[string]any{"health_check_enabled": true, "health_check_interval_seconds": 1}),
		host(2, p2, other.Port, nil),
	))

	st := inst.waitStats(1, "healthy", func(s spec.Status) bool { return s.HealthStatus == "healthy" })
	if st.Healthy == nil || !*st.Healthy || st.LastHealthCheck == nil || st.LastHealthCheck.IsZero() || st.LastHealthError != "" {
		t.Fatalf("healthy upstream: %+v", st)
	}
	firstCheck := *st.LastHealthCheck

	up.Close(10 * time.Second)
	st = inst.waitStats(1, "unhealthy", func(s spec.Status) bool { return s.HealthStatus == "unhealthy" })
	if st.Healthy == nil || *st.Healthy || st.LastHealthError == "" || st.LastHealthCheck == nil || !st.LastHealthCheck.After(firstCheck.Time) {
		t.Fatalf("upstream down: %+v", st)
	}
	t.Logf("while down: last_health_error %q", st.LastHealthError)

	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", up.Port))
	if err != nil {
		t.Fatalf("listening again on the upstream's port: %v", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	st = inst.waitStats(1, "healthy again", func(s spec.Status) bool { return s.HealthStatus == "healthy" })
	if st.Healthy == nil || !*st.Healthy || st.LastHealthError != "" {
		t.Fatalf("upstream back: %+v", st)
	}

	raw := inst.rawStats()[2]
	if raw["health_status"] != "not_checked" || raw["healthy"] != nil || raw["last_health_check"] != nil || raw["last_health_error"] != "" {
		t.Fatalf("stream without health checks: %v", raw)
	}
	if v, present := raw["healthy"]; !present || v != nil {
		t.Fatalf("stream without health checks: healthy must be null, got %v (present %v)", v, present)
	}
}

// ---- 4. reload keeps an established connection ----------------------------

// TestReloadKeepsConnection changes a stream's name and notes and adds
// another: the open connection keeps relaying and stays counted. Then a
// reload removes the stream: its connection is closed after the grace
// period with disconnect_reason stream_removed.
func TestReloadKeepsConnection(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	p1, p2 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, p1, up.Port, nil)))

	old := dial(t, p1)
	if got := roundTrip(t, old, "before the reload"); got != "before the reload" {
		t.Fatalf("echo: %q", got)
	}
	if err := inst.load(hosts(
		host(1, p1, up.Port, map[string]any{"name": "renamed", "notes": "changed by the test"}),
		host(2, p2, up.Port, nil),
	)); err != nil {
		t.Fatalf("reload: %v", err)
	}
	if got := roundTrip(t, old, "after the reload"); got != "after the reload" {
		t.Fatalf("old connection after the reload: %q", got)
	}
	st := inst.waitStats(1, "the old connection counted", func(s spec.Status) bool { return s.ActiveConnections == 1 })
	if st.Name != "renamed" || !st.Listening {
		t.Fatalf("stream 1 after the reload: %+v", st)
	}
	fresh := dial(t, p1)
	if got := roundTrip(t, fresh, "new one"); got != "new one" {
		t.Fatalf("new connection after the reload: %q", got)
	}
	inst.waitStats(1, "old and new connections counted", func(s spec.Status) bool { return s.ActiveConnections == 2 })
	if got := roundTrip(t, dial(t, p2), "stream 2"); got != "stream 2" {
		t.Fatalf("added stream: %q", got)
	}
	fresh.Close()
	inst.waitStats(1, "only the old connection", func(s spec.Status) bool { return s.ActiveConnections == 1 })

	// Remove stream 1: the connection gets the grace period (300ms), then
	// is closed.
	start := time.Now()
	if err := inst.load(hosts(host(2, p2, up.Port, nil))); err != nil {
		t.Fatalf("reload without stream 1: %v", err)
	}
	expectClosed(t, old, 5*time.Second)
	if took := time.Since(start); took < 250*time.Millisecond {
		t.Fatalf("connection of a removed stream closed after %s, before the 300ms grace period", took)
	}
	inst.waitLog(1, "stream_removed", func(e logEntry) bool {
		return e.DisconnectReason == "stream_removed" && e.BytesSent == uint64(len("before the reloadafter the reload"))
	})
	if !refusedAt(t, p1) {
		t.Fatal("the removed stream's port still accepts connections")
	}
	if _, ok := inst.stats()[1]; ok {
		t.Fatal("the removed stream is still in the stats")
	}
}

// ---- 5. reload without refusing connections --------------------------------

// TestReloadRefusesNothing reloads ten times while clients connect and do
// a round trip each: no connection is refused. Resets of connections still
// queued in a closing SO_REUSEPORT socket are counted and logged (the
// kernel's net.ipv4.tcp_migrate_req=1 avoids them).
func TestReloadRefusesNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	cfg := func(i int) map[string]any {
		return hosts(host(1, port, up.Port, map[string]any{"notes": fmt.Sprintf("reload %d", i%2), "log_connections": false}))
	}
	inst := startCaddy(t, cfg(0))

	var attempts, refused, resets, other atomic.Int64
	var otherMu sync.Mutex
	var otherErrs []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := []byte(fmt.Sprintf("client %d", g))
			buf := make([]byte, len(msg))
			deadline := time.Now().Add(10 * time.Second)
			for i := 0; i < 100000 && time.Now().Before(deadline); i++ {
				select {
				case <-stop:
					return
				default:
				}
				attempts.Add(1)
				err := func() error {
					c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
					if err != nil {
						return err
					}
					defer c.Close()
					_ = c.SetDeadline(time.Now().Add(3 * time.Second))
					if _, err := c.Write(msg); err != nil {
						return err
					}
					if _, err := io.ReadFull(c, buf); err != nil {
						return err
					}
					if !bytes.Equal(buf, msg) {
						return fmt.Errorf("echo %q, want %q", buf, msg)
					}
					return nil
				}()
				switch {
				case err == nil:
				case errors.Is(err, syscall.ECONNREFUSED):
					refused.Add(1)
				case errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.EPIPE):
					resets.Add(1)
				default:
					other.Add(1)
					otherMu.Lock()
					otherErrs = append(otherErrs, err.Error())
					otherMu.Unlock()
				}
			}
		}()
	}

	start := time.Now()
	for i := 1; i <= 10; i++ {
		time.Sleep(250 * time.Millisecond)
		if err := inst.load(cfg(i)); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("reload %d: %v", i, err)
		}
	}
	time.Sleep(250 * time.Millisecond)
	close(stop)
	wg.Wait()

	n, bad := attempts.Load(), refused.Load()+resets.Load()+other.Load()
	t.Logf("%d connections in %s across 10 reloads: %d refused, %d reset or cut, %d other errors %q",
		n, time.Since(start).Round(time.Millisecond), refused.Load(), resets.Load(), other.Load(), otherErrs)
	if refused.Load() > 0 {
		t.Errorf("%d connections were refused during reloads", refused.Load())
	}
	if n < 100 {
		t.Errorf("only %d connection attempts: the clients were not running during the reloads", n)
	}
	if float64(bad) > 0.02*float64(n) {
		t.Errorf("%d of %d connections failed (more than 2%%)", bad, n)
	}
	st := inst.stats()[1]
	if !st.Listening {
		t.Errorf("not listening after the reloads: %+v", st)
	}
}

// ---- 6. a config that fails validation changes nothing ---------------------

// TestInvalidConfigChangesNothing loads configs that fail validation while
// a stream runs with an open connection: each load fails with an error
// naming the field and value, and the stream keeps serving with its stats.
func TestInvalidConfigChangesNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	p1, p2 := freePort(t), freePort(t)
	good := hosts(host(1, p1, up.Port, nil))
	inst := startCaddy(t, good)

	open := dial(t, p1)
	roundTrip(t, open, "first")
	c2 := dial(t, p1)
	roundTrip(t, c2, "second")
	c2.Close()
	before := inst.waitStats(1, "2 connections counted", func(s spec.Status) bool {
		return s.TotalConnections == 2 && s.ActiveConnections == 1
	})

	for _, bad := range []struct {
		name  string
		cfg   map[string]any
		parts []string
	}{
		{"bad CIDR", hosts(host(1, p1, up.Port, map[string]any{"whitelist_cidrs": []string{"10.0.0.0/8", "10.0.0.300/8"}})),
			[]string{"whitelist_cidrs", `"10.0.0.300/8"`}},
		{"duplicate port", hosts(host(1, p1, up.Port, nil), host(2, p1, up.Port, nil)),
			[]string{"listen_port", strconv.Itoa(p1)}},
		{"listen_port 0", hosts(host(1, p1, up.Port, nil), host(2, 0, up.Port, nil)),
			[]string{"stream 2", "listen_port: required"}},
		{"bad CIDR on a new stream", hosts(host(1, p1, up.Port, nil), host(2, p2, up.Port, map[string]any{"blacklist_cidrs": []string{"::1/129"}})),
			[]string{"stream 2", "blacklist_cidrs", `"::1/129"`}},
	} {
		err := inst.load(bad.cfg)
		mustContainAll(t, bad.name, err, bad.parts...)
		t.Logf("%s: %v", bad.name, err)

		if got := roundTrip(t, open, "still here"); got != "still here" {
			t.Fatalf("%s: open connection: %q", bad.name, got)
		}
		c := dial(t, p1)
		if got := roundTrip(t, c, "new"); got != "new" {
			t.Fatalf("%s: new connection: %q", bad.name, got)
		}
		c.Close()
		if !refusedAt(t, p2) {
			t.Fatalf("%s: the failed config left port %d listening", bad.name, p2)
		}
		st := inst.stats()[1]
		if st.ID != 1 || !st.Listening || st.TotalConnections <= before.TotalConnections || st.BytesSent < before.BytesSent || st.ActiveConnections < 1 {
			t.Fatalf("%s: stats after a failed load: %+v; before it: %+v; stats as JSON: %s", bad.name, st, before, statsJSON(t))
		}
		before = st
	}
}

// ---- 7. port already in use -------------------------------------------------

// TestPortInUse refuses a stream on a port that another listener holds,
// and one on the admin endpoint's port; the running stream is untouched
// and the failed config leaves nothing listening.
func TestPortInUse(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	held, err := net.Listen("tcp", "127.0.0.1:0") // no SO_REUSEPORT
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port
	p1, p3 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, p1, up.Port, nil)))
	open := dial(t, p1)
	roundTrip(t, open, "x")

	err = inst.load(hosts(host(1, p1, up.Port, nil), host(3, p3, up.Port, nil), host(2, heldPort, up.Port, nil)))
	mustContainAll(t, "port held by another listener", err, "stream 2", strconv.Itoa(heldPort), "in use")
	t.Logf("held port: %v", err)
	if !refusedAt(t, p3) {
		t.Fatalf("a config that failed to start left stream 3 listening on %d", p3)
	}

	_, adminPort, _ := net.SplitHostPort(inst.admin)
	ap, _ := strconv.Atoi(adminPort)
	err = inst.load(hosts(host(1, p1, up.Port, nil), host(4, ap, up.Port, nil)))
	mustContainAll(t, "admin endpoint's port", err, "stream 4", adminPort)
	if !strings.Contains(err.Error(), "admin") && !strings.Contains(err.Error(), "in use") {
		t.Fatalf("admin endpoint's port: error %q says neither that the admin endpoint holds it nor that it is in use", err)
	}
	t.Logf("admin port: %v", err)

	if got := roundTrip(t, open, "still"); got != "still" {
		t.Fatalf("open connection after the failed loads: %q", got)
	}
	if got := roundTrip(t, dial(t, p1), "new"); got != "new" {
		t.Fatalf("new connection after the failed loads: %q", got)
	}
	// The admin endpoint still answers, and shows the config that runs.
	if code, body := inst.apiGet("/config/"); code != http.StatusOK {
		t.Fatalf("admin endpoint after the failed loads: %d %s", code, body)
	}
	stats := inst.stats()
	if st := stats[1]; len(stats) != 1 || !st.Listening || st.TotalConnections != 2 || st.ActiveConnections != 2 {
		t.Fatalf("stats after the failed loads: want only the running stream 1 with its 2 open connections; stats as JSON: %s", statsJSON(t))
	}
}

// ---- 8. counters move during a long transfer -------------------------------

// TestCountersMoveDuringTransfer pushes 16 MiB each way through slow
// readers: while it runs, bytes_sent and bytes_received are seen strictly
// between 0 and the total, and at the end they equal it exactly.
func TestCountersMoveDuringTransfer(t *testing.T) {
	checkNoLeaks(t)
	const total = 16 << 20
	// slowRead reads 64 KiB, then sleeps 10 ms, until EOF (at most 30 s).
	slowRead := func(c net.Conn) int64 {
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 64<<10)
		var n int64
		for i := 0; i < 100000; i++ {
			m, err := io.ReadFull(c, buf)
			n += int64(m)
			if err != nil {
				return n
			}
			time.Sleep(10 * time.Millisecond)
		}
		return n
	}
	upGot := make(chan int64, 1)
	sink := newUpstream(t, func(c net.Conn) { upGot <- slowRead(c) })
	source := newUpstream(t, func(c net.Conn) {
		_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		_, _ = c.Write(make([]byte, total))
	})
	p1, p2 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, p1, sink.Port, nil), host(2, p2, source.Port, nil)))

	up := dial(t, p1).(*net.TCPConn)
	down := dial(t, p2)
	go func() {
		_ = up.SetWriteDeadline(time.Now().Add(30 * time.Second))
		_, _ = up.Write(make([]byte, total))
		_ = up.CloseWrite()
	}()
	downGot := make(chan int64, 1)
	go func() { downGot <- slowRead(down) }()

	var midSent, midRecv []uint64
	deadline := time.Now().Add(30 * time.Second)
	var gotUp, gotDown int64 = -1, -1
	for (gotUp < 0 || gotDown < 0) && time.Now().Before(deadline) {
		st := inst.stats()
		if s := st[1].BytesSent; s > 0 && s < total {
			midSent = append(midSent, s)
		}
		if r := st[2].BytesReceived; r > 0 && r < total {
			midRecv = append(midRecv, r)
		}
		select {
		case gotUp = <-upGot:
		case gotDown = <-downGot:
		case <-time.After(20 * time.Millisecond):
		}
	}
	if gotUp != total || gotDown != total {
		t.Fatalf("transfer: upstream got %d, client got %d, want %d each", gotUp, gotDown, total)
	}
	t.Logf("bytes_sent seen mid-transfer %d times (%d distinct), bytes_received %d times (%d distinct)",
		len(midSent), len(slices.Compact(midSent)), len(midRecv), len(slices.Compact(midRecv)))
	if len(midSent) == 0 {
		t.Error("bytes_sent never moved during the upload: want it strictly between 0 and the total at least once")
	}
	if len(midRecv) == 0 {
		t.Error("bytes_received never moved during the download: want it strictly between 0 and the total at least once")
	}
	down.Close()
	inst.waitStats(1, "bytes_sent = total", func(s spec.Status) bool { return s.BytesSent == total && s.ActiveConnections == 0 })
	inst.waitStats(2, "bytes_received = total", func(s spec.Status) bool { return s.BytesReceived == total && s.ActiveConnections == 0 })
	if st := inst.stats(); st[1].BytesSent != total || st[2].BytesReceived != total {
		t.Fatalf("at the end: bytes_sent %d, bytes_received %d, want %d", st[1].BytesSent, st[2].BytesReceived, total)
	}
}

// ---- 9. Stop closes what remains ----------------------------------------------

// TestStopClosesConnections stops Caddy with connections open on four
// streams (one of them mid-transfer under a rate limit): the proxy closes
// them all within a few seconds, the ports stop listening and no goroutine
// of ours is left. Each stream's connections get the grace period (300ms
// here), not one grace period per stream in turn.
func TestStopClosesConnections(t *testing.T) {
	checkNoLeaks(t)
	const grace = 300 * time.Millisecond
	up := newUpstream(t, echo)
	ports := []int{freePort(t), freePort(t), freePort(t), freePort(t)}
	startCaddy(t, hosts(
		host(1, ports[0], up.Port, nil),
		host(2, ports[1], up.Port, nil),
		host(3, ports[2], up.Port, nil),
		host(4, ports[3], up.Port, map[string]any{"upload_rate_bytes": 64 << 10}),
	))

	var conns []net.Conn
	for i, p := range ports {
		for j := 0; j < 2; j++ {
			c := dial(t, p)
			roundTrip(t, c, fmt.Sprintf("stream %d conn %d", i+1, j))
			conns = append(conns, c)
		}
	}
	limited := conns[len(conns)-1]
	go func() {
		// Mid-transfer: the rate limit keeps the relay waiting.
		_ = limited.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = limited.Write(make([]byte, 1<<20))
	}()
	time.Sleep(100 * time.Millisecond)

	// Each connection notes when the proxy closes it.
	closedAfter := make([]time.Duration, len(conns))
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.Copy(io.Discard, c)
			closedAfter[i] = time.Since(start)
			if err != nil && isTimeout(err) {
				closedAfter[i] = -1
			}
		}()
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	stopTook := time.Since(start)
	wg.Wait()
	t.Logf("caddy.Stop returned after %s; connections closed after %v", stopTook.Round(time.Millisecond), closedAfter)
	var last time.Duration
	for i, d := range closedAfter {
		if d < 0 {
			t.Fatalf("connection %d (stream %d) still open 5s after Stop", i, i/2+1)
		}
		last = max(last, d)
	}
	for _, p := range ports {
		if !refusedAt(t, p) {
			t.Fatalf("port %d still listens after Stop", p)
		}
	}
	if limit := grace + 600*time.Millisecond; last > limit || stopTook > limit {
		t.Errorf("with a %s grace period, the last connection was closed %s after Stop began and Stop took %s: want both within %s (the streams wait their grace periods one after another)",
			grace, last.Round(time.Millisecond), stopTook.Round(time.Millisecond), limit)
	}
	// startCaddy's cleanup stops Caddy again: that must be harmless.
}

// ---- 10. read-only API ----------------------------------------------------

// TestReadOnlyAPI reads the streams and their stats as GET /api/v1/streams
// and GET /api/v1/streams/stats return them (HostStatuses and Statuses as
// JSON) and lists a disabled stream that does not listen. (The HTTP routes,
// their methods and the writes are tested in admin/.)
func TestReadOnlyAPI(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	p1, p2 := freePort(t), freePort(t)
	// Stream 2 is disabled and sets every setting to something other than
	// its default, so every field of the spec shows.
	every := map[string]any{
		"id": 2, "name": "every-field", "protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": p2,
		"upstream_host": "db.internal", "upstream_port": 5432, "enabled": false, "max_connections": 10,
		"connection_timeout_seconds": 3, "idle_timeout_seconds": 60, "proxy_protocol_version": 2,
		"whitelist_cidrs": []any{"10.0.0.0/8", "::1"}, "blacklist_cidrs": []any{"10.0.0.5"},
		"ssl_enabled": true, "ssl_cert_id": 7, "upload_rate_bytes": 1000, "download_rate_bytes": 2000,
		"health_check_enabled": true, "health_check_interval_seconds": 15, "log_connections": true,
		"notes": "all settings",
	}
	first := host(1, p1, up.Port, map[string]any{"notes": "the live one"})
	inst := startCaddy(t, hosts(first, every))
	c := dial(t, p1)
	roundTrip(t, c, "hello")

	app := streams.Running()
	if app == nil {
		t.Fatal("no streams app runs")
	}
	body, err := json.Marshal(app.HostStatuses())
	if err != nil {
		t.Fatal(err)
	}
	var list []map[string]any
	if err := json.Unmarshal(body, &list); err != nil || len(list) != 2 {
		t.Fatalf("GET /api/v1/streams: want an array of 2 hosts, got %s (%v)", body, err)
	}
	norm := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	for i, want := range []map[string]any{first, every} {
		got := list[i]
		for k, v := range want {
			if norm(got[k]) != norm(v) {
				t.Errorf("host %d: %s = %s, want %s", i+1, k, norm(got[k]), norm(v))
			}
		}
		if got["source"] != "config" {
			t.Errorf("host %d: source %v, want \"config\"", i+1, got["source"])
		}
		status, ok := got["status"].(map[string]any)
		if !ok {
			t.Fatalf("host %d: no status object: %s", i+1, norm(got))
		}
		if status["listening"] != (i == 0) {
			t.Errorf("host %d: status.listening %v", i+1, status["listening"])
		}
	}
	specFields := []string{"name", "protocol", "listen_address", "listen_port", "upstream_host", "upstream_port",
		"enabled", "max_connections", "connection_timeout_seconds", "idle_timeout_seconds", "proxy_protocol_version",
		"whitelist_cidrs", "blacklist_cidrs", "ssl_enabled", "ssl_cert_id", "upload_rate_bytes", "download_rate_bytes",
		"health_check_enabled", "health_check_interval_seconds", "log_connections", "notes"}
	for _, f := range specFields {
		if _, ok := list[1][f]; !ok {
			t.Errorf("GET /api/v1/streams: host 2 has no %q", f)
		}
	}

	stats := inst.rawStats()
	if len(stats) != 2 {
		t.Fatalf("stats: want 2 streams, got %v", stats)
	}
	for _, id := range []int64{1, 2} {
		for _, k := range []string{"id", "name", "protocol", "listening", "healthy", "last_health_error", "last_health_check",
			"active_connections", "total_connections", "bytes_sent", "bytes_received"} {
			if _, ok := stats[id][k]; !ok {
				t.Errorf("stats of stream %d: no %q in %v", id, k, stats[id])
			}
		}
	}
	s1, s2 := stats[1], stats[2]
	if s1["listening"] != true || s1["active_connections"] != 1.0 || s1["total_connections"] != 1.0 ||
		s1["bytes_sent"] != 5.0 || s1["bytes_received"] != 5.0 || s1["name"] != "test-1" || s1["protocol"] != "tcp" {
		t.Errorf("stats of the live stream: %v", s1)
	}
	if s2["listening"] != false || s2["name"] != "every-field" || s2["healthy"] != nil {
		t.Errorf("stats of the disabled stream: %v", s2)
	}
	if !refusedAt(t, p2) {
		t.Errorf("the disabled stream's port %d accepts connections", p2)
	}
}
