package admin_test

import (
	"fmt"
	"maps"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// TestCreateUpdateDisableDelete drives one stream through its life over
// the API, checking the listener and an open connection at each step.
func TestCreateUpdateDisableDelete(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	up2 := newServer(t, upper)
	cfgPort, p1, p2 := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, obj{"name": "cfg"})), nil)

	// Create: it relays at once.
	hs := inst.create(stream(0, p1, up.Port, obj{"name": "life"}))
	sid := id(hs)
	if sid != 2 || hs["source"] != "api" || hs["status"].(obj)["listening"] != true {
		t.Fatalf("created: %v", hs)
	}
	c1 := dial(t, p1)
	if got := roundTrip(t, c1, "one"); got != "one" {
		t.Fatalf("through the new stream: %q", got)
	}
	path := fmt.Sprintf("/api/v1/streams/%d", sid)

	// The list has the config stream, read-only, and the new one.
	list := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t)
	if len(list) != 2 || list[0]["source"] != "config" || list[0]["created_at"] != nil || list[1]["source"] != "api" {
		t.Fatalf("list: %v", list)
	}

	// Update the upstream in place: new connections go to the new one, the
	// open connection stays with the old.
	got := inst.call("PUT", path, stream(0, p1, up2.Port, obj{"name": "life-2"})).want(t, http.StatusOK).obj(t)
	if got["name"] != "life-2" || norm(got["upstream_port"]) != norm(up2.Port) || got["updated_at"] == hs["updated_at"] {
		t.Fatalf("updated: %v", got)
	}
	if got := roundTrip(t, dial(t, p1), "two"); got != "TWO" {
		t.Fatalf("a new connection after the upstream change: %q, want TWO", got)
	}
	if got := roundTrip(t, c1, "one"); got != "one" {
		t.Fatalf("the open connection after the upstream change: %q", got)
	}

	// Move to another port: the old one closes, the new one listens.
	inst.call("PUT", path, stream(0, p2, up.Port, obj{"name": "life-3"})).want(t, http.StatusOK)
	if !refused(t, p1) {
		t.Fatalf("old port %d still listens", p1)
	}
	c2 := dial(t, p2)
	if got := roundTrip(t, c2, "three"); got != "three" {
		t.Fatalf("through the moved stream: %q", got)
	}

	// Disable: the port closes, the open connection is closed
	// (stream_disabled), the settings stay.
	got = inst.call("PUT", path, stream(0, p2, up.Port, obj{"name": "life-3", "enabled": false})).want(t, http.StatusOK).obj(t)
	if got["enabled"] != false || got["status"].(obj)["listening"] != false {
		t.Fatalf("disabled: %v", got)
	}
	expectClosed(t, c2, 5*time.Second)
	if !refused(t, p2) {
		t.Fatalf("disabled stream's port %d listens", p2)
	}
	inst.waitLogLine(sid, "stream_disabled")

	// Enable again.
	inst.call("PUT", path, stream(0, p2, up.Port, obj{"name": "life-3"})).want(t, http.StatusOK)
	c3 := dial(t, p2)
	if got := roundTrip(t, c3, "four"); got != "four" {
		t.Fatalf("through the enabled stream: %q", got)
	}

	// Delete: 204, the port closes, the open connection is closed
	// (stream_removed), and the stream is gone.
	inst.call("DELETE", path, nil).want(t, http.StatusNoContent)
	expectClosed(t, c3, 5*time.Second)
	if !refused(t, p2) {
		t.Fatalf("deleted stream's port %d listens", p2)
	}
	inst.waitLogLine(sid, "stream_removed")
	inst.call("GET", path, nil).apiErr(t, http.StatusNotFound)
	inst.call("DELETE", path, nil).apiErr(t, http.StatusNotFound)
	if list := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t); len(list) != 1 || id(list[0]) != 1 {
		t.Fatalf("list after delete: %v", list)
	}
	if hosts := inst.storedHosts(); len(hosts) != 0 {
		t.Fatalf("stored after delete: %+v", hosts)
	}
	// The config stream was never touched.
	if got := roundTrip(t, dial(t, cfgPort), "cfg"); got != "cfg" {
		t.Fatalf("config stream: %q", got)
	}
}

// TestUDPStreamCreate: a UDP stream created over the API relays at once,
// and deleting it stops it.
func TestUDPStreamCreate(t *testing.T) {
	checkNoLeaks(t)
	upPort := udpEchoServer(t)
	p := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	hs := inst.create(stream(0, p, upPort, obj{"protocol": "udp", "idle_timeout_seconds": 30}))
	if hs["protocol"] != "udp" || hs["status"].(obj)["listening"] != true {
		t.Fatalf("created: %v", hs)
	}
	c := udpDial(t, p)
	if got := udpRoundTrip(t, c, "ping", 5*time.Second); got != "ping" {
		t.Fatalf("through the UDP stream: %q", got)
	}
	// Changing its name keeps the NAT entry and the relay.
	inst.call("PUT", fmt.Sprintf("/api/v1/streams/%d", id(hs)), stream(0, p, upPort, obj{"protocol": "udp", "name": "dns"})).want(t, 200)
	if got := udpRoundTrip(t, c, "again", 5*time.Second); got != "again" {
		t.Fatalf("through the renamed UDP stream: %q", got)
	}
	inst.call("DELETE", fmt.Sprintf("/api/v1/streams/%d", id(hs)), nil).want(t, http.StatusNoContent)
	if got := udpRoundTrip(t, udpDial(t, p), "gone", 300*time.Millisecond); got != "" {
		t.Fatalf("a deleted UDP stream answered %q", got)
	}
}

// streamSettings is a host as GET shows it, without its status (and
// without the warnings of a write's answer).
func streamSettings(o obj) obj {
	out := maps.Clone(o)
	delete(out, "status")
	delete(out, "warnings")
	return out
}

// TestRestartAndReload: streams created over the API come back after Caddy
// stops and starts again with the same storage, and a reload of a changed
// config keeps them.
func TestRestartAndReload(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, p2, p3 := freePort(t), freePort(t), freePort(t)
	app := streamsApp(stream(1, cfgPort, up.Port, obj{"name": "cfg"}))
	inst := startCaddy(t, app, nil)
	created := inst.create(stream(0, p2, up.Port, obj{
		"name": "kept", "max_connections": 7, "max_connections_per_ip": 3, "connection_rate_per_ip": 20, "connection_rate_window_seconds": 10, "idle_timeout_seconds": 90, "whitelist_cidrs": []string{"127.0.0.0/8", "::1"},
		"proxy_protocol_version": 0, "notes": "survives restarts", "health_check_enabled": true, "health_check_interval_seconds": 60,
	}))
	path := fmt.Sprintf("/api/v1/streams/%d", id(created))
	want := streamSettings(created)

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if !refused(t, p2) {
		t.Fatalf("port %d listens after Caddy stopped", p2)
	}
	if err := inst.load(app, nil); err != nil {
		t.Fatalf("starting again: %v", err)
	}
	got := inst.call("GET", path, nil).want(t, 200).obj(t)
	if norm(streamSettings(got)) != norm(want) {
		t.Fatalf("after a restart:\n got %s\nwant %s", norm(streamSettings(got)), norm(want))
	}
	if got["status"].(obj)["listening"] != true {
		t.Fatalf("not listening after a restart: %v", got)
	}
	c := dial(t, p2)
	if got := roundTrip(t, c, "back"); got != "back" {
		t.Fatalf("through the restored stream: %q", got)
	}

	// A reload with a changed config: a renamed config stream and a new
	// one. The stored stream stays, and so does its open connection.
	changed := streamsApp(stream(1, cfgPort, up.Port, obj{"name": "cfg-renamed"}), stream(3, p3, up.Port, nil))
	if err := inst.load(changed, nil); err != nil {
		t.Fatalf("reload: %v", err)
	}
	list := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t)
	if len(list) != 3 || list[0]["name"] != "cfg-renamed" || id(list[1]) != 3 || norm(streamSettings(list[2])) != norm(want) {
		t.Fatalf("after the reload: %v", list)
	}
	if got := roundTrip(t, c, "still"); got != "still" {
		t.Fatalf("the open connection after the reload: %q", got)
	}
	if got := roundTrip(t, dial(t, p2), "new"); got != "new" {
		t.Fatalf("a new connection after the reload: %q", got)
	}
	// And it can still be changed.
	inst.call("PUT", path, stream(0, p2, up.Port, obj{"name": "changed-after-reload"})).want(t, 200)
	if hosts := inst.storedHosts(); len(hosts) != 1 || hosts[0].Name != "changed-after-reload" {
		t.Fatalf("stored: %+v", hosts)
	}
}
