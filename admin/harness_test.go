package admin_test

import (
	"bufio"
	"bytes"
	"context"
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
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	_ "github.com/aegis-proxy/caddy-aegis/admin"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	_ "github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// The tests run Caddy in this process, one config at a time, with the
// admin endpoint on a free loopback port, logs in a file and the streams'
// storage in the test's temporary directory, and talk to it over HTTP.

// instance is a running Caddy config.
type instance struct {
	t         *testing.T
	adminPort int
	logFile   string
	dbFile    string
	client    *http.Client
}

// lastPort is the last test port handed out. Test ports come from below
// the kernel's ephemeral range (32768-60999 by default), so that an
// outgoing connection never takes one between the moment a test picks it
// and the moment it is bound, and none is handed out twice in a run. The
// start depends on the process id, so that test processes of other
// packages running at the same time rarely meet.
var lastPort atomic.Int32

func init() { lastPort.Store(int32(20000 + (os.Getpid()*7)%1200*10)) }

// freePort returns a port that is free for TCP and UDP on 127.0.0.1 and
// ::1 and that no other test of this run was given.
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

// startCaddy runs a config whose streams app is app, with the other apps
// in extra (may be nil), and stops Caddy when the test ends.
func startCaddy(t *testing.T, app map[string]any, extra map[string]any) *instance {
	t.Helper()
	inst := newInstance(t)
	if err := inst.load(app, extra); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	return inst
}

// newInstance prepares an instance that nothing runs yet; Caddy is
// stopped when the test ends.
func newInstance(t *testing.T) *instance {
	dir := t.TempDir()
	inst := &instance{
		t:         t,
		adminPort: freePort(t),
		logFile:   filepath.Join(dir, "caddy.log"),
		dbFile:    filepath.Join(dir, "streams.db"),
		client:    &http.Client{Timeout: 15 * time.Second},
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
		inst.client.CloseIdleConnections()
	})
	return inst
}

// load replaces the running config, as `caddy reload` does. Unless app
// says otherwise, storage is the instance's database file. A nil app
// leaves the streams app out.
func (inst *instance) load(app map[string]any, extra map[string]any) error {
	apps := maps.Clone(extra)
	if apps == nil {
		apps = map[string]any{}
	}
	if app != nil {
		if _, ok := app["storage"]; !ok {
			app = maps.Clone(app)
			app["storage"] = map[string]any{"path": inst.dbFile}
		}
		apps["streams"] = app
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": inst.adminAddr()},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":  "DEBUG",
			"writer": map[string]any{"output": "file", "filename": inst.logFile},
		}}},
		"apps": apps,
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		inst.t.Fatal(err)
	}
	return caddy.Load(b, true)
}

func (inst *instance) adminAddr() string { return fmt.Sprintf("127.0.0.1:%d", inst.adminPort) }

// response is an HTTP response, read.
type response struct {
	method, url string
	code        int
	header      http.Header
	body        []byte
}

func (r response) String() string {
	return fmt.Sprintf("%s %s: %d %s", r.method, r.url, r.code, bytes.TrimSpace(r.body))
}

// hdr is a request header.
type hdr struct{ key, value string }

// ctJSON is the Content-Type of a JSON body.
var ctJSON = hdr{"Content-Type", "application/json"}

// call sends a request to the admin endpoint. body is sent as it is if it
// is a string or []byte, as JSON otherwise, and not at all if nil; a JSON
// body gets Content-Type: application/json unless headers set one.
func (inst *instance) call(method, path string, body any, headers ...hdr) response {
	inst.t.Helper()
	return doRequest(inst.t, inst.client, method, "http://"+inst.adminAddr()+path, body, headers...)
}

// try is call for other goroutines than the test's: a request that fails
// gives a response with code 0 and the error as its body.
func (inst *instance) try(method, path string, body any, headers ...hdr) response {
	r, err := send(inst.client, method, "http://"+inst.adminAddr()+path, body, headers...)
	if err != nil {
		r.body = []byte(err.Error())
	}
	return r
}

func doRequest(t testing.TB, client *http.Client, method, url string, body any, headers ...hdr) response {
	t.Helper()
	r, err := send(client, method, url, body, headers...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func send(client *http.Client, method, url string, body any, headers ...hdr) (response, error) {
	r := response{method: method, url: url}
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return r, err
		}
		rd = bytes.NewReader(j)
		headers = append([]hdr{ctJSON}, headers...)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return r, err
	}
	for _, h := range headers {
		if h.value == "" {
			req.Header.Del(h.key)
		} else {
			req.Header.Set(h.key, h.value)
		}
	}
	resp, err := client.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	r.code, r.header = resp.StatusCode, resp.Header
	r.body, err = io.ReadAll(resp.Body)
	if err != nil {
		return r, fmt.Errorf("%s %s: reading the response: %v", method, url, err)
	}
	return r, nil
}

// want fails the test unless the response has the status code.
func (r response) want(t testing.TB, code int) response {
	t.Helper()
	if r.code != code {
		t.Fatalf("%s, want %d", r, code)
	}
	return r
}

// decode decodes the JSON body into v.
func (r response) decode(t testing.TB, v any) {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s: Content-Type %q, want application/json", r, ct)
	}
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("%s: decoding: %v", r, err)
	}
}

// obj is a JSON object.
type obj = map[string]any

func (r response) obj(t testing.TB) obj {
	t.Helper()
	var o obj
	r.decode(t, &o)
	return o
}

func (r response) list(t testing.TB) []obj {
	t.Helper()
	var l []obj
	r.decode(t, &l)
	return l
}

// errBody is the API's error response.
type errBody struct {
	Error  string `json:"error"`
	Field  string `json:"field"`
	Value  any    `json:"value"`
	Errors []struct {
		Field   string `json:"field"`
		Value   any    `json:"value"`
		Message string `json:"message"`
	} `json:"errors"`
}

// apiErr checks that the response is an error with the status code and a
// JSON error body, and returns the body.
func (r response) apiErr(t testing.TB, code int) errBody {
	t.Helper()
	r.want(t, code)
	var e errBody
	r.decode(t, &e)
	if e.Error == "" {
		t.Fatalf("%s: no error message", r)
	}
	return e
}

// norm is v as compact JSON, to compare JSON values of any Go type.
func norm(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	var x any
	if json.Unmarshal(b, &x) == nil {
		b, _ = json.Marshal(x)
	}
	return string(b)
}

// id reads a stream object's id.
func id(o obj) int64 {
	f, _ := o["id"].(float64)
	return int64(f)
}

// stream is a stream host as the API takes it: TCP from 127.0.0.1:port to
// 127.0.0.1:upstreamPort, connection log on; extra settings are merged in.
func stream(id int64, port, upstreamPort int, extra obj) obj {
	s := obj{
		"name":            fmt.Sprintf("s-%d", port),
		"protocol":        "tcp",
		"listen_address":  "127.0.0.1",
		"listen_port":     port,
		"upstream_host":   "127.0.0.1",
		"upstream_port":   upstreamPort,
		"log_connections": true,
	}
	if id != 0 {
		s["id"] = id
	}
	for k, v := range extra {
		if v == nil {
			delete(s, k)
		} else {
			s[k] = v
		}
	}
	return s
}

// streamsApp is a streams app config with the given config hosts.
func streamsApp(hosts ...obj) map[string]any {
	if hosts == nil {
		hosts = []obj{}
	}
	return map[string]any{"hosts": hosts, "grace_period": "300ms"}
}

// create POSTs s and returns the created host.
func (inst *instance) create(s obj) obj {
	inst.t.Helper()
	return inst.call("POST", "/api/v1/streams", s).want(inst.t, http.StatusCreated).obj(inst.t)
}

// ---- TCP and UDP peers ------------------------------------------------------

// server is a TCP server on 127.0.0.1 that runs serve for each connection;
// it and its connections are closed when the test ends.
type server struct {
	Port  int
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
}

func newServer(t *testing.T, serve func(net.Conn)) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{Port: ln.Addr().(*net.TCPAddr).Port, ln: ln}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Go(func() {
				defer c.Close()
				serve(c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func echo(c net.Conn) { _, _ = io.Copy(c, c) }

// upper echoes in upper case.
func upper(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(bytes.ToUpper(buf[:n])); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// udpEchoServer echoes datagrams on 127.0.0.1 until the test ends.
func udpEchoServer(t *testing.T) int {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			_, _ = pc.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return pc.LocalAddr().(*net.UDPAddr).Port
}

// dial connects to 127.0.0.1:port.
func dial(t *testing.T, port int) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and returns as many bytes as it reads back.
func roundTrip(t *testing.T, c net.Conn, msg string) string {
	t.Helper()
	got, err := tryRoundTrip(c, msg)
	if err != nil {
		t.Fatalf("round trip of %q: %v", msg, err)
	}
	return got
}

func tryRoundTrip(c net.Conn, msg string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return string(buf), nil
}

// expectClosed fails unless the peer closes c (EOF or reset) within the
// time given, without sending anything.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 16))
	var ne net.Error
	if n != 0 || err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("want the proxy to close the connection within %s, got n=%d err=%v", within, n, err)
	}
}

// refused reports whether nothing listens for TCP on 127.0.0.1:port.
func refused(t *testing.T, port int) bool {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// udpDial returns a UDP socket connected to 127.0.0.1:port.
func udpDial(t *testing.T, port int) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// udpRoundTrip sends msg and returns the reply, or "" if none came within
// the time given.
func udpRoundTrip(t *testing.T, c *net.UDPConn, msg string, within time.Duration) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("udp write: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// ---- logs, storage, polling -------------------------------------------------

// logLine is one connection-log line of Caddy's log.
type logLine struct {
	Msg              string `json:"msg"`
	Stream           string `json:"stream"`
	StreamID         int64  `json:"stream_id"`
	Action           string `json:"action"`
	DisconnectReason string `json:"disconnect_reason"`
}

// connLogLines returns the connection-log lines Caddy has written.
func (inst *instance) connLogLines() []logLine {
	inst.t.Helper()
	f, err := os.Open(inst.logFile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		inst.t.Fatal(err)
	}
	defer f.Close()
	var out []logLine
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l logLine
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "connection" && l.Action != "" {
			out = append(out, l)
		}
	}
	return out
}

// waitLogLine waits for a connection-log line of stream id with the
// disconnect reason.
func (inst *instance) waitLogLine(id int64, reason string) {
	inst.t.Helper()
	eventually(inst.t, fmt.Sprintf("a log line of stream %d with disconnect_reason %s", id, reason), func() bool {
		return slices.ContainsFunc(inst.connLogLines(), func(l logLine) bool {
			return l.StreamID == id && l.DisconnectReason == reason
		})
	})
}

// storedHosts reads the stored hosts from the database file, through a
// connection of its own.
func (inst *instance) storedHosts() []storage.Host {
	inst.t.Helper()
	db, err := storage.Open(inst.dbFile)
	if err != nil {
		inst.t.Fatal(err)
	}
	defer db.Close()
	hosts, err := db.ListHosts(context.Background())
	if err != nil {
		inst.t.Fatal(err)
	}
	return hosts
}

// eventually polls cond for up to 10 seconds.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10s for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ownCode matches a stack frame of this project's non-test code.
var ownCode = regexp.MustCompile(`caddy-aegis/(modules/(streamstate|l4aegis[a-z]+|streams|udpnat)\.|admin\.)`)

// checkNoLeaks fails the test if a goroutine running this project's code
// is still alive once the test is over and Caddy has stopped.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		// Runs after the cleanups registered later (Caddy's stop, peers).
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
