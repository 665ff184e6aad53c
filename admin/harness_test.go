package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"

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
	caddy     *testenv.Caddy
	adminPort int
	logFile   string
	dbFile    string
	client    *http.Client
}

// The helpers these tests share with those of other packages.
var (
	freePort     = testenv.FreePort
	checkNoLeaks = testenv.CheckNoLeaks
	eventually   = testenv.Eventually
)

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
	t.Helper()
	client := &http.Client{Timeout: 15 * time.Second}
	t.Cleanup(client.CloseIdleConnections) // after Caddy's stop
	c := testenv.New(t)
	return &instance{t: t, caddy: c, adminPort: c.AdminPort, logFile: c.LogFile, dbFile: c.DBFile, client: client}
}

// load replaces the running config, as `caddy reload` does. Unless app
// says otherwise, storage is the instance's database file. A nil app
// leaves the streams app out.
func (inst *instance) load(app map[string]any, extra map[string]any) error {
	apps := maps.Clone(extra)
	if app != nil {
		if apps == nil {
			apps = map[string]any{}
		}
		apps["streams"] = app
	}
	return inst.caddy.Load(apps)
}

func (inst *instance) adminAddr() string { return inst.caddy.AdminAddr }

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

// newServer runs serve for each connection to a TCP server on 127.0.0.1;
// streamsNow is GET /api/v1/streams as it answers now, to compare with
// streamsUnchanged after requests that must change nothing.
func (inst *instance) streamsNow(t *testing.T) []byte {
	t.Helper()
	return inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).body
}

// streamsUnchanged fails the test if GET /api/v1/streams answers other
// than before; what names the requests that were refused.
func (inst *instance) streamsUnchanged(t *testing.T, before []byte, what string) {
	t.Helper()
	if after := inst.streamsNow(t); !bytes.Equal(before, after) {
		t.Errorf("streams changed %s:\nbefore %s\nafter  %s", what, before, after)
	}
}

// it and its connections are closed when the test ends.
func newServer(t *testing.T, serve func(net.Conn)) *loopback.Server {
	t.Helper()
	return loopback.Serve(t, "127.0.0.1:0", serve)
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
	return loopback.ServeUDP(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		_, _ = pc.WriteToUDPAddrPort(p, from)
	}).Port
}

// Socket helpers shared with other packages' tests.
var (
	dial         = testenv.Dial
	roundTrip    = testenv.RoundTrip
	tryRoundTrip = testenv.TryRoundTrip
	expectClosed = testenv.ExpectClosed
	refused      = testenv.Refused
	udpRoundTrip = testenv.UDPRoundTrip
)

// udpDial returns a UDP socket connected to 127.0.0.1:port.
func udpDial(t *testing.T, port int) *net.UDPConn {
	t.Helper()
	return testenv.DialUDP(t, "", "127.0.0.1", port)
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
	return testenv.LogLines(inst.t, inst.logFile, func(l logLine) bool { return l.Msg == "connection" && l.Action != "" })
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
func (inst *instance) storedHosts() []storage.Stored {
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

// caddyfile is a Caddyfile with inst's admin endpoint, log and storage and
// the streams_admin directive ordered, then the given sites: a format
// string for fmt.Sprintf with args.
func (inst *instance) caddyfile(sites string, args ...any) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	order streams_admin before respond
	log {
		output file %s
		level DEBUG
	}
	streams {
		storage sqlite %s
	}
}

`, inst.adminPort, inst.logFile, inst.dbFile) + fmt.Sprintf(sites, args...)
}
