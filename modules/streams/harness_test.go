package streams_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"

	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
)

// testCaddy is a Caddy config loaded in this test process with the admin
// endpoint on a free loopback port and logs written to a file.
type testCaddy struct {
	t       *testing.T
	caddy   *testenv.Caddy
	admin   string
	logFile string
	dbFile  string
}

// The helpers these tests share with those of other packages.
var (
	freePort     = testenv.FreePort
	checkNoLeaks = testenv.CheckNoLeaks
)

// startCaddy loads a config with the given streams app config and stops
// Caddy when the test ends.
func startCaddy(t *testing.T, app map[string]any) *testCaddy {
	t.Helper()
	c := testenv.New(t)
	inst := &testCaddy{t: t, caddy: c, admin: c.AdminAddr, logFile: c.LogFile, dbFile: c.DBFile}
	if err := inst.load(app); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	return inst
}

// load replaces the running config, as `caddy reload` does. Unless the app
// config says otherwise, storage is the test's own database file.
func (inst *testCaddy) load(app map[string]any) error {
	return inst.caddy.Load(map[string]any{"streams": app})
}

// statsJSON is what GET /api/v1/streams/stats answers (package admin
// serves it; these tests do not import admin): the running app's Statuses
// as JSON, [] when no app runs.
func statsJSON(t testing.TB) []byte {
	t.Helper()
	stats := []spec.Status{}
	if app := streams.Running(); app != nil {
		stats = app.Statuses()
	}
	b, err := json.Marshal(stats)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// stats reads the stats as the API returns them, by stream id.
func (inst *testCaddy) stats() map[int64]spec.Status {
	inst.t.Helper()
	var list []spec.Status
	if err := json.Unmarshal(statsJSON(inst.t), &list); err != nil {
		inst.t.Fatal(err)
	}
	out := make(map[int64]spec.Status, len(list))
	for _, s := range list {
		out[s.ID] = s
	}
	return out
}

// waitStats polls the stats of stream id until cond holds.
func (inst *testCaddy) waitStats(id int64, what string, cond func(spec.Status) bool) spec.Status {
	inst.t.Helper()
	var st spec.Status
	if !testenv.Within(10*time.Second, func() bool { st = inst.stats()[id]; return cond(st) }) {
		inst.t.Fatalf("stream %d: waited 10s for %s; stats: %+v", id, what, st)
	}
	return st
}

// logEntry is one connection-log line.
type logEntry struct {
	Logger           string `json:"logger"`
	Msg              string `json:"msg"`
	Stream           string `json:"stream"`
	StreamID         int64  `json:"stream_id"`
	SourceIP         string `json:"source_ip"`
	BytesSent        uint64 `json:"bytes_sent"`
	BytesReceived    uint64 `json:"bytes_received"`
	DurationMS       int64  `json:"duration_ms"`
	Action           string `json:"action"`
	DisconnectReason string `json:"disconnect_reason"`
}

// connLogs returns the connection-log entries written so far.
func (inst *testCaddy) connLogs() []logEntry {
	inst.t.Helper()
	return testenv.LogLines(inst.t, inst.logFile, func(e logEntry) bool { return e.Msg == "connection" && e.Action != "" })
}

// waitLog waits for a connection-log entry of stream id that matches.
func (inst *testCaddy) waitLog(id int64, what string, match func(logEntry) bool) logEntry {
	inst.t.Helper()
	var found logEntry
	ok := testenv.Within(10*time.Second, func() bool {
		for _, e := range inst.connLogs() {
			if e.StreamID == id && match(e) {
				found = e
				return true
			}
		}
		return false
	})
	if !ok {
		inst.t.Fatalf("stream %d: no connection log entry with %s; entries: %+v", id, what, inst.connLogs())
	}
	return found
}

// host returns a stream host config with the given id, listen port and
// upstream on 127.0.0.1; extra settings are merged in.
func host(id int64, listenPort, upstreamPort int, extra map[string]any) map[string]any {
	h := map[string]any{
		"id":              id,
		"name":            fmt.Sprintf("test-%d", id),
		"protocol":        "tcp",
		"listen_address":  "127.0.0.1",
		"listen_port":     listenPort,
		"upstream_host":   "127.0.0.1",
		"upstream_port":   upstreamPort,
		"log_connections": true,
	}
	for k, v := range extra {
		h[k] = v
	}
	return h
}

func hosts(h ...map[string]any) map[string]any {
	return map[string]any{"hosts": h, "grace_period": "300ms"}
}

// newUpstream runs serve for each connection to a loopback TCP server that
// is closed with the test.
func newUpstream(t *testing.T, serve func(net.Conn)) *loopback.Server {
	t.Helper()
	return loopback.Serve(t, "127.0.0.1:0", serve)
}

func echo(c net.Conn) { _, _ = io.Copy(c, c) }

// Socket helpers shared with other packages' tests.
var (
	dial         = testenv.Dial
	roundTrip    = testenv.RoundTrip
	expectClosed = testenv.ExpectClosed
	isTimeout    = testenv.IsTimeout
	refusedAt    = testenv.Refused
	udpDial      = testenv.DialUDP
	udpRoundTrip = testenv.UDPRoundTrip
	udpRead      = testenv.UDPRead
)

// openEchoed opens n connections to port on 127.0.0.1, each with one
// message ("hello i") echoed, and returns them with the bytes that moved
// each way.
func openEchoed(t *testing.T, port, n int) ([]net.Conn, uint64) {
	t.Helper()
	conns := make([]net.Conn, n)
	var bytes uint64
	for i := range conns {
		conns[i] = dial(t, port)
		msg := fmt.Sprintf("hello %d", i)
		if got := roundTrip(t, conns[i], msg); got != msg {
			t.Fatalf("connection %d: echoed %q, want %q", i, got, msg)
		}
		bytes += uint64(len(msg))
	}
	return conns, bytes
}

// dialFrom connects to port on 127.0.0.1 from the loopback address src,
// closed when the test ends.
func dialFrom(t *testing.T, src string, port int) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
