package streams_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/internal/loopback"

	_ "github.com/aegis-proxy/caddy-aegis/admin"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// instance is a Caddy config loaded in this test process with the admin
// endpoint on a free loopback port and logs written to a file.
type instance struct {
	t       *testing.T
	admin   string
	logFile string
	dbFile  string
}

// lastPort is the last test port handed out. Test ports come from below
// the kernel's ephemeral range (32768-60999 by default), so that an
// outgoing connection never takes one between the moment a test picks it
// and the moment the test binds it, and no port is handed out twice in a
// run. The start depends on the process id so that test processes running
// side by side rarely meet.
var lastPort atomic.Int32

func init() { lastPort.Store(int32(20000 + os.Getpid()%1200*10)) }

// freePort returns a port that is free on 127.0.0.1 and ::1 and that no
// other test of this run was given.
func freePort(t *testing.T) int {
	t.Helper()
	for {
		p := int(lastPort.Add(1))
		if p >= 32768 {
			t.Fatal("ran out of test ports below the ephemeral range")
		}
		if portFree(p) {
			return p
		}
	}
}

func portFree(p int) bool {
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, strconv.Itoa(p))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		ln.Close()
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		pc.Close()
	}
	return true
}

// startCaddy loads a config with the given streams app config (and
// optional extra apps) and stops Caddy when the test ends.
func startCaddy(t *testing.T, app map[string]any) *instance {
	t.Helper()
	inst := &instance{
		t:       t,
		admin:   fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		logFile: filepath.Join(t.TempDir(), "caddy.log"),
		dbFile:  filepath.Join(t.TempDir(), "streams.db"),
	}
	if err := inst.load(app); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return inst
}

// load replaces the running config, as `caddy reload` does. Unless the app
// config says otherwise, storage is the test's own database file.
func (inst *instance) load(app map[string]any) error {
	if _, ok := app["storage"]; !ok {
		app = maps.Clone(app)
		app["storage"] = map[string]any{"path": inst.dbFile}
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": inst.admin},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":  "DEBUG",
			"writer": map[string]any{"output": "file", "filename": inst.logFile},
		}}},
		"apps": map[string]any{"streams": app},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		inst.t.Fatal(err)
	}
	return caddy.Load(b, true)
}

// stats reads /api/v1/streams/stats over HTTP.
func (inst *instance) stats() map[int64]streams.Status {
	inst.t.Helper()
	resp, err := http.Get("http://" + inst.admin + "/api/v1/streams/stats")
	if err != nil {
		inst.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		inst.t.Fatalf("GET stats: %s", resp.Status)
	}
	var list []streams.Status
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		inst.t.Fatal(err)
	}
	out := make(map[int64]streams.Status, len(list))
	for _, s := range list {
		out[s.ID] = s
	}
	return out
}

// waitStats polls the stats of stream id until cond holds.
func (inst *instance) waitStats(id int64, what string, cond func(streams.Status) bool) streams.Status {
	inst.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := inst.stats()[id]
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			inst.t.Fatalf("stream %d: waited 10s for %s; stats: %+v", id, what, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
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
func (inst *instance) connLogs() []logEntry {
	inst.t.Helper()
	f, err := os.Open(inst.logFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		inst.t.Fatal(err)
	}
	defer f.Close()
	var out []logEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e logEntry
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Msg == "connection" && e.Action != "" {
			out = append(out, e)
		}
	}
	return out
}

// waitLog waits for a connection-log entry of stream id that matches.
func (inst *instance) waitLog(id int64, what string, match func(logEntry) bool) logEntry {
	inst.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, e := range inst.connLogs() {
			if e.StreamID == id && match(e) {
				return e
			}
		}
		if time.Now().After(deadline) {
			inst.t.Fatalf("stream %d: no connection log entry with %s; entries: %+v", id, what, inst.connLogs())
		}
		time.Sleep(20 * time.Millisecond)
	}
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

// dial connects to the stream on 127.0.0.1:port.
func dial(t *testing.T, port int) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and reads the same number of bytes back.
func roundTrip(t *testing.T, c net.Conn, msg string) string {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(buf)
}

// expectClosed asserts that the peer closes c without sending anything.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 16))
	if n != 0 || err == nil || isTimeout(err) {
		t.Fatalf("want the proxy to close the connection within %s, got n=%d err=%v", within, n, err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// ownCode matches a stack frame of this project's non-test code.
var ownCode = regexp.MustCompile(`caddy-aegis/(modules/(streamstate|l4aegis[a-z]+|streams|udpnat)\.|admin\.|storage\.)`)

// checkNoLeaks fails the test if any goroutine running this project's code
// is still alive once the test is over and Caddy has stopped.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		// Runs after the Cleanups registered later (Caddy's stop, upstreams).
		deadline := time.Now().Add(5 * time.Second)
		for {
			leaked := ownGoroutines()
			if leaked == "" {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("goroutines still running after the test:\n%s", leaked)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// ownGoroutines returns the stacks of goroutines that run this project's
// code, other than the caller's.
func ownGoroutines() string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i > 0 && ownCode.MatchString(g) {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
