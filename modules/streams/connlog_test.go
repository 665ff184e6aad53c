package streams_test

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// connLine is a connection-log line with the fields this file checks.
type connLine struct {
	Logger            string  `json:"logger"`
	Msg               string  `json:"msg"`
	StreamID          int64   `json:"stream_id"`
	Protocol          string  `json:"protocol"`
	Action            string  `json:"action"`
	DisconnectReason  string  `json:"disconnect_reason"`
	DatagramsSent     *uint64 `json:"datagrams_sent"`
	DatagramsReceived *uint64 `json:"datagrams_received"`
}

// TestConnectionLogLinesOneLoggerEachKeyOnce runs real TCP and UDP
// connections, allowed and blocked, through running streams, with Caddy's
// logs set up as the README says to give the connection log a file of its
// own: every connection-log line comes from the logger streams.connections
// and goes to that file only, and no line of either file has a key twice.
func TestConnectionLogLinesOneLoggerEachKeyOnce(t *testing.T) {
	checkNoLeaks(t)
	tcpUp := newUpstream(t, echo)
	udpUp := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	pTCP, pUDP, pDenied, pUnresolved := freePort(t), freePort(t), freePort(t), freePort(t)
	c := testenv.New(t)
	connFile := filepath.Join(filepath.Dir(c.LogFile), "connections.log")
	c.Logs = map[string]any{
		"default": map[string]any{
			"level":   "DEBUG",
			"writer":  map[string]any{"output": "file", "filename": c.LogFile},
			"exclude": []string{"streams.connections"},
		},
		"connections": map[string]any{
			"writer":  map[string]any{"output": "file", "filename": connFile},
			"include": []string{"streams.connections"},
		},
	}
	inst := &testCaddy{t: t, caddy: c, admin: c.AdminAddr, logFile: connFile, dbFile: c.DBFile}
	if err := inst.load(hosts(
		host(1, pTCP, tcpUp.Port, nil),
		udpHost(2, pUDP, udpUp.Port, map[string]any{"idle_timeout_seconds": 1}),
		host(3, pDenied, tcpUp.Port, map[string]any{"protocol": "tcp+udp", "whitelist_cidrs": []string{"192.0.2.0/24"}}),
		// Its relay warns that the name does not resolve.
		udpHost(4, pUnresolved, udpUp.Port, map[string]any{"upstream_host": "nothing-here.invalid"}),
	)); err != nil {
		t.Fatal(err)
	}

	tc := dial(t, pTCP)
	if got := roundTrip(t, tc, "tcp"); got != "tcp" {
		t.Fatalf("through the TCP stream: %q", got)
	}
	tc.Close()
	u := udpDial(t, "", "127.0.0.1", pUDP)
	for _, msg := range []string{"one", "two"} {
		if got := udpRoundTrip(t, u, msg, 2*time.Second); got != msg {
			t.Fatalf("through the UDP stream: %q", got)
		}
	}
	expectClosed(t, dial(t, pDenied), 2*time.Second)
	// From another source: a refused source is logged once a minute, TCP
	// and UDP together.
	if got := udpRoundTrip(t, udpDial(t, "127.0.0.2", "127.0.0.1", pDenied), "denied", 100*time.Millisecond); got != "" {
		t.Fatalf("a source outside the whitelist got a UDP reply: %q", got)
	}

	want := []struct {
		stream   int64
		protocol string
		action   string
	}{{1, "tcp", "allowed"}, {2, "udp", "allowed"}, {3, "tcp", "blocked"}, {3, "udp", "blocked"}}
	var lines []connLine
	ok := testenv.Within(10*time.Second, func() bool {
		lines = testenv.LogLines(t, inst.logFile, func(l connLine) bool { return l.Msg == "connection" && l.Action != "" })
		for _, w := range want {
			if !slices.ContainsFunc(lines, func(l connLine) bool {
				return l.StreamID == w.stream && l.Protocol == w.protocol && l.Action == w.action
			}) {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("want connection-log lines %+v; got %+v", want, lines)
	}
	for _, l := range lines {
		if l.Logger != "streams.connections" {
			t.Errorf("connection-log line of stream %d (%s, %s) from logger %q, want streams.connections", l.StreamID, l.Protocol, l.Action, l.Logger)
		}
		if l.StreamID == 2 && (l.DatagramsSent == nil || *l.DatagramsSent != 2 || l.DatagramsReceived == nil || *l.DatagramsReceived != 2) {
			t.Errorf("UDP line without its datagram counts (2 each way): %+v", l)
		}
	}

	// The rest of Caddy's log has none of them.
	if other := testenv.LogLines(t, c.LogFile, func(l connLine) bool { return l.Msg == "connection" }); len(other) > 0 {
		t.Errorf("connection-log lines in the log that excludes streams.connections: %+v", other)
	}

	if !testenv.Within(10*time.Second, func() bool {
		return len(testenv.LogLines(t, c.LogFile, func(l connLine) bool { return strings.HasPrefix(l.Msg, "resolving UDP upstream") })) > 0
	}) {
		t.Error("no warning that stream 4's upstream does not resolve")
	}

	// Every line of both files, connection lines and all the others.
	if n := testenv.CheckKeysOnce(t, connFile); n < len(want) {
		t.Fatalf("read %d lines of the connection log file", n)
	}
	if n := testenv.CheckKeysOnce(t, c.LogFile); n == 0 {
		t.Fatal("Caddy's log is empty")
	}
}
