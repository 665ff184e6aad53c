package streams_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// apiStream is a stream as the API would create it.
func apiStream(id int64, listenPort, upstreamPort int) spec.Stream {
	return spec.Stream{ID: id, Name: fmt.Sprintf("api-%d", id), Protocol: "tcp", ListenAddress: "127.0.0.1",
		ListenPort: listenPort, UpstreamHost: "127.0.0.1", UpstreamPort: upstreamPort, Enabled: true, LogConnections: true}
}

// refused reports whether nothing listens on 127.0.0.1:port for TCP.
func refused(port int) bool {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

func TestLiveCreateUpdateDisableDelete(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	cfgPort, p1, p2 := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, cfgPort, up.Port, nil)))
	ctx := context.Background()

	// Config streams are read-only.
	if _, err := streams.UpdateHost(ctx, 1, apiStream(1, cfgPort, up.Port)); !errors.Is(err, spec.ErrReadOnly) {
		t.Fatalf("updating a config stream: %v, want ErrReadOnly", err)
	}
	if err := streams.DeleteHost(ctx, 1); !errors.Is(err, spec.ErrReadOnly) {
		t.Fatalf("deleting a config stream: %v, want ErrReadOnly", err)
	}

	// Create: id 0 takes the next one, and it relays at once.
	hs, err := streams.CreateHost(ctx, apiStream(0, p1, up.Port))
	if err != nil {
		t.Fatal(err)
	}
	if hs.ID != 2 || hs.Source != "api" || !hs.Status.Listening || hs.CreatedAt == nil {
		t.Fatalf("created: %+v", hs)
	}
	before := dial(t, p1)
	if got := roundTrip(t, before, "first"); got != "first" {
		t.Fatalf("through the created stream: %q", got)
	}

	// An update that keeps the socket: open connections go on, new ones get
	// the new settings (here a blacklist that refuses them).
	s := apiStream(2, p1, up.Port)
	s.Name = "renamed"
	s.BlacklistCIDRs = []string{"127.0.0.1"}
	if hs, err = streams.UpdateHost(ctx, 2, s); err != nil || hs.Name != "renamed" {
		t.Fatalf("update in place: %+v, %v", hs, err)
	}
	if got := roundTrip(t, before, "still"); got != "still" {
		t.Fatalf("the open connection after the update: %q", got)
	}
	expectClosed(t, dial(t, p1), 2*time.Second)
	inst.waitLog(2, "acl_denied", func(e logEntry) bool { return e.DisconnectReason == "acl_denied" })

	// A new port: the old one closes, the new one listens; the open
	// connection still goes on.
	s.ListenPort, s.BlacklistCIDRs = p2, nil
	if _, err = streams.UpdateHost(ctx, 2, s); err != nil {
		t.Fatal(err)
	}
	if !refused(p1) {
		t.Fatalf("old port %d still listens after moving the stream", p1)
	}
	if got := roundTrip(t, dial(t, p2), "moved"); got != "moved" {
		t.Fatalf("on the new port: %q", got)
	}
	if got := roundTrip(t, before, "again"); got != "again" {
		t.Fatalf("the open connection after the move: %q", got)
	}

	// Disable: the port closes and so do open connections.
	s.Enabled = false
	if hs, err = streams.UpdateHost(ctx, 2, s); err != nil || hs.Status.Listening {
		t.Fatalf("disable: %+v, %v", hs, err)
	}
	expectClosed(t, before, 2*time.Second)
	inst.waitLog(2, "stream_disabled", func(e logEntry) bool { return e.DisconnectReason == "stream_disabled" })
	if !refused(p2) {
		t.Fatal("a disabled stream still listens")
	}

	// Enable again, connect, delete: closed with stream_removed.
	s.Enabled = true
	if _, err = streams.UpdateHost(ctx, 2, s); err != nil {
		t.Fatal(err)
	}
	c := dial(t, p2)
	if got := roundTrip(t, c, "back"); got != "back" {
		t.Fatalf("re-enabled: %q", got)
	}
	if err := streams.DeleteHost(ctx, 2); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c, 2*time.Second)
	inst.waitLog(2, "stream_removed", func(e logEntry) bool { return e.DisconnectReason == "stream_removed" })
	if _, err := streams.Running().HostStatus(2); !errors.Is(err, spec.ErrNotFound) {
		t.Fatalf("deleted stream: %v", err)
	}
	if err := streams.DeleteHost(ctx, 2); !errors.Is(err, spec.ErrNotFound) {
		t.Fatalf("deleting twice: %v", err)
	}
	// The deleted stream's id is not given out again.
	if hs, err := streams.CreateHost(ctx, apiStream(0, p2, up.Port)); err != nil || hs.ID != 3 {
		t.Fatalf("a create after deleting stream 2: %+v, %v; want id 3", hs, err)
	}
	// The config stream was never touched.
	if got := roundTrip(t, dial(t, cfgPort), "config"); got != "config" {
		t.Fatalf("config stream: %q", got)
	}
}

// A create or update that cannot be applied leaves storage, listeners and
// connections as they were.
// Disabling a stream closes a connection accepted before its listener
// closed but not yet admitted (here, waiting for its PROXY header): it is
// not relayed once its header comes, and ends as stream_disabled.
// Deleting one ends the wait (as proxy_header_missing): it is not
// relayed either.
func TestTurnedOffStreamClosesAConnectionOnItsWayIn(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, hosts())
	ctx := context.Background()
	for _, tc := range []struct {
		what string
		off  func(id int64, s spec.Stream) error
	}{
		{"disabled", func(id int64, s spec.Stream) error {
			s.Enabled = false
			_, err := streams.UpdateHost(ctx, id, s)
			return err
		}},
		{"deleted", func(id int64, _ spec.Stream) error { return streams.DeleteHost(ctx, id) }},
	} {
		p := freePort(t)
		s := apiStream(0, p, up.Port)
		s.AcceptProxyProtocol, s.TrustedProxyCIDRs, s.ProxyHeaderTimeoutSeconds = "required", []string{"127.0.0.1"}, 10
		hs, err := streams.CreateHost(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		c := dial(t, p)
		time.Sleep(100 * time.Millisecond) // the stream's goroutine for c waits for its header
		if err := tc.off(hs.ID, s); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("PROXY TCP4 192.0.2.1 127.0.0.1 5000 80\r\nping")); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 16)); err == nil || n > 0 {
			t.Fatalf("%s: the connection on its way in was relayed (%d bytes back, %v)", tc.what, n, err)
		}
		if tc.what == "disabled" {
			inst.waitLog(hs.ID, "stream_disabled", func(e logEntry) bool { return e.DisconnectReason == "stream_disabled" })
		}
	}
}

func TestLiveRejectedChangesNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	cfgPort, p1 := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, cfgPort, up.Port, nil)))
	ctx := context.Background()
	if _, err := streams.CreateHost(ctx, apiStream(5, p1, up.Port)); err != nil {
		t.Fatal(err)
	}
	open := dial(t, p1)
	roundTrip(t, open, "x")

	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port

	var fe *spec.FieldError
	// A port another program holds.
	if _, err := streams.CreateHost(ctx, apiStream(6, heldPort, up.Port)); !errors.As(err, &fe) || fe.Field != "listen_port" || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("create on a held port: %v", err)
	}
	// The config stream's port, and its id.
	if _, err := streams.CreateHost(ctx, apiStream(6, cfgPort, up.Port)); !errors.As(err, &fe) || !strings.Contains(err.Error(), "overlaps stream 1") {
		t.Fatalf("create on the config stream's port: %v", err)
	}
	if _, err := streams.CreateHost(ctx, apiStream(1, freePort(t), up.Port)); !errors.Is(err, spec.ErrConflict) {
		t.Fatalf("create with the config stream's id: %v", err)
	}
	// Moving stream 5 onto the held port.
	bad := apiStream(5, heldPort, up.Port)
	bad.Name = "should not stick"
	if _, err := streams.UpdateHost(ctx, 5, bad); !errors.As(err, &fe) {
		t.Fatalf("update onto a held port: %v", err)
	}
	// Invalid settings.
	bad = apiStream(5, p1, 0)
	if _, err := streams.UpdateHost(ctx, 5, bad); !errors.As(err, &fe) || fe.Field != "upstream_port" {
		t.Fatalf("update with upstream_port 0: %v", err)
	}

	hs, err := streams.Running().HostStatus(5)
	if err != nil || hs.Name != "api-5" || hs.ListenPort != p1 || !hs.Status.Listening {
		t.Fatalf("stream 5 after rejected updates: %+v, %v", hs, err)
	}
	if _, err := streams.Running().HostStatus(6); !errors.Is(err, spec.ErrNotFound) {
		t.Fatalf("a rejected create left stream 6: %v", err)
	}
	if got := roundTrip(t, open, "untouched"); got != "untouched" {
		t.Fatalf("the open connection after rejected changes: %q", got)
	}
	// What is stored is what was created.
	db, err := storage.Open(inst.dbFile)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	stored, err := db.ListHosts(ctx)
	if err != nil || len(stored) != 1 || stored[0].ID != 5 || stored[0].Name != "api-5" || stored[0].ListenPort != p1 {
		t.Fatalf("stored hosts: %+v, %v", stored, err)
	}
}

// Streams created through the API come back after a restart and survive a
// reload of the config.
func TestStoredStreamsComeBack(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	udpUp := newUDPUpstream(t, "127.0.0.1:0", udpEcho)
	cfgPort, p1, p2, other := freePort(t), freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, cfgPort, up.Port, nil)))
	ctx := context.Background()
	s := apiStream(7, p1, up.Port)
	s.MaxConnections = 3
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	u := apiStream(8, p2, udpUp.Port)
	u.Protocol = "udp"
	if _, err := streams.CreateHost(ctx, u); err != nil {
		t.Fatal(err)
	}

	// A reload that changes the config keeps the stored streams.
	if err := inst.load(hosts(host(1, cfgPort, up.Port, nil), host(2, other, up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		hs, err := streams.Running().HostStatus(7)
		if err != nil || hs.Source != "api" || hs.MaxConnections != 3 || !hs.Status.Listening {
			t.Fatalf("%s: stream 7 %+v, %v", when, hs, err)
		}
		if got := roundTrip(t, dial(t, p1), when); got != when {
			t.Fatalf("%s: through stream 7: %q", when, got)
		}
		if got := udpRoundTrip(t, udpDial(t, "", "127.0.0.1", p2), when, 2*time.Second); got != when {
			t.Fatalf("%s: through UDP stream 8: %q", when, got)
		}
	}
	check("after a reload")

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if !refused(p1) {
		t.Fatal("stream 7 still listens after Caddy stopped")
	}
	if err := inst.load(hosts(host(1, cfgPort, up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	check("after a restart")
	list := streams.Running().HostStatuses()
	if len(list) != 3 || list[0].Source != "config" || list[1].ID != 7 || list[2].ID != 8 {
		t.Fatalf("hosts after the restart: %+v", list)
	}

	// A config that takes a stored stream's id is refused, and nothing
	// changes.
	err := inst.load(hosts(host(1, cfgPort, up.Port, nil), host(7, other, up.Port, nil)))
	if err == nil || !strings.Contains(err.Error(), "stored through the API") {
		t.Fatalf("a config colliding with a stored stream: %v", err)
	}
	check("after a refused config")
}

// A HostStatus read back from JSON keeps its source, times and status.
func TestHostStatusJSONRoundTrip(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Millisecond)
	in := spec.HostStatus{Stream: &spec.Stream{ID: 3, Name: "db", ListenPort: 5432, UpstreamHost: "h", UpstreamPort: 1, Enabled: false},
		Source: "api", CreatedAt: jsontime.Ptr(now), UpdatedAt: jsontime.Ptr(now), Status: spec.Status{ID: 3, Listening: true, ActiveConnections: 2}}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out spec.HostStatus
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if out.Source != "api" || out.Enabled || out.Name != "db" || out.CreatedAt == nil || !out.CreatedAt.Equal(now) || out.Status.ActiveConnections != 2 || !out.Status.Listening {
		t.Fatalf("round trip of %s gave %+v / %+v", b, out, *out.Stream)
	}
}

// A reload that changes storage settings of the open database says they
// apply after a restart, instead of ignoring them in silence.
func TestStorageSettingsChangeIsReported(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, nil)))
	cfg := hosts(host(1, port, up.Port, nil))
	cfg["storage"] = map[string]any{"path": inst.dbFile, "log_retention": 5}
	if err := inst.load(cfg); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "the warning about storage settings", func() bool {
		b, _ := os.ReadFile(inst.logFile)
		return strings.Contains(string(b), "apply after Caddy restarts") && strings.Contains(string(b), `"log_retention_configured":5`)
	})
}

// Moving a stream from one address to an overlapping one on the same port
// (127.0.0.1 to 0.0.0.0) is not mistaken for a port another program holds.
func TestMoveToWildcardSamePort(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	ctx := context.Background()
	s := apiStream(5, port, up.Port)
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	s.ListenAddress = "0.0.0.0"
	if _, err := streams.UpdateHost(ctx, 5, s); err != nil {
		t.Fatalf("moving to 0.0.0.0 on the same port: %v", err)
	}
	if got := roundTrip(t, dial(t, port), "moved"); got != "moved" {
		t.Fatalf("after the move: %q", got)
	}
}
