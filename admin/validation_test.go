package admin_test

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// TestRejectedWritesChangeNothing sends every kind of invalid create and
// update, checks each answer's status and JSON error shape, and then that
// nothing changed: the listed streams, the database, the listeners and an
// open connection.
func TestRejectedWritesChangeNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, apiPort, httpPort, fresh := freePort(t), freePort(t), freePort(t), freePort(t)

	// A port another program holds.
	held, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port

	// Caddy serves HTTP on httpPort, so its HTTP and HTTPS ports and that
	// server's port are Caddy's own.
	httpApp := obj{"http": obj{"servers": obj{"web": obj{
		"listen":          []string{fmt.Sprintf("127.0.0.1:%d", httpPort)},
		"automatic_https": obj{"disable": true},
		"routes":          []obj{{"handle": []obj{{"handler": "static_response", "body": "web"}}}},
	}}}}
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, obj{"name": "from-config"})), httpApp)
	inst.create(stream(2, apiPort, up.Port, obj{"name": "from-api"}))
	open := dial(t, apiPort)
	if got := roundTrip(t, open, "before"); got != "before" {
		t.Fatalf("open connection: %q", got)
	}

	// A relay counts a write's bytes just after the write, so the echo can
	// reach the client before its upload is counted: wait until both ways
	// show it, for a list that stays as it is.
	eventually(t, "the round trip counted both ways", func() bool {
		st := inst.call("GET", "/api/v1/streams/2", nil).want(t, 200).obj(t)["status"].(map[string]any)
		return st["bytes_sent"] == float64(6) && st["bytes_received"] == float64(6)
	})
	listBefore := inst.call("GET", "/api/v1/streams", nil).want(t, 200).body
	storedBefore := inst.storedHosts()
	if len(storedBefore) != 1 || storedBefore[0].ID != 2 {
		t.Fatalf("stored before: %+v", storedBefore)
	}

	// valid is a stream on a free port with one change.
	valid := func(extra obj) obj { return stream(0, fresh, up.Port, extra) }
	for _, tc := range []struct {
		name         string
		method, path string
		body         obj
		code         int
		field        string
		value        any // as JSON
		contains     string
		errs         int // len(errors), if > 1
	}{
		{name: "port 0", body: valid(obj{"listen_port": 0}), field: "listen_port", contains: "listen_port: required; must be 1-65535"},
		{name: "port too high", body: valid(obj{"listen_port": 70000}), field: "listen_port", value: 70000, contains: "1-65535"},
		{name: "port missing", body: valid(obj{"listen_port": nil}), field: "listen_port", contains: "listen_port: required"},
		{name: "upstream port missing", body: valid(obj{"upstream_port": nil}), field: "upstream_port", contains: "upstream_port: required"},
		{name: "upstream port", body: valid(obj{"upstream_port": -1}), field: "upstream_port", value: -1},
		{name: "protocol", body: valid(obj{"protocol": "sctp"}), field: "protocol", value: "sctp", contains: "tcp, udp or tcp+udp"},
		{name: "listen address", body: valid(obj{"listen_address": "localhost"}), field: "listen_address", value: "localhost"},
		{name: "listen address with port", body: valid(obj{"listen_address": "127.0.0.1:80"}), field: "listen_address", value: "127.0.0.1:80"},
		{name: "upstream host", body: valid(obj{"upstream_host": ""}), field: "upstream_host", contains: "upstream_host: required"},
		{name: "upstream host space", body: valid(obj{"upstream_host": "a b"}), field: "upstream_host", value: "a b"},
		{name: "whitelist", body: valid(obj{"whitelist_cidrs": []string{"10.0.0.0/8", "10.0.0.0/33"}}), field: "whitelist_cidrs", value: "10.0.0.0/33"},
		{name: "blacklist", body: valid(obj{"blacklist_cidrs": []string{"nope"}}), field: "blacklist_cidrs", value: "nope"},
		{name: "proxy v1 on udp", body: valid(obj{"protocol": "udp", "proxy_protocol_version": 1}), field: "proxy_protocol_version", value: 1, contains: "udp"},
		{name: "proxy v1 on tcp+udp", body: valid(obj{"protocol": "tcp+udp", "proxy_protocol_version": 1}), field: "proxy_protocol_version", value: 1},
		{name: "proxy v3", body: valid(obj{"proxy_protocol_version": 3}), field: "proxy_protocol_version", value: 3},
		{name: "ssl on udp", body: valid(obj{"protocol": "udp", "ssl_enabled": true, "ssl_cert_id": 1}), field: "ssl_enabled", value: true, contains: "tcp"},
		{name: "ssl without cert", body: valid(obj{"ssl_enabled": true}), field: "ssl_cert_id", value: 0},
		{name: "negative limits", body: valid(obj{"max_connections": -1, "idle_timeout_seconds": -5, "upload_rate_bytes": -2}),
			field: "max_connections", value: -1, errs: 3},
		{name: "per-ip limits", body: valid(obj{"max_connections_per_ip": -1, "connection_rate_per_ip": 2000000, "connection_rate_window_seconds": -1}),
			field: "max_connections_per_ip", value: -1, errs: 3},
		{name: "timeout too long", body: valid(obj{"connection_timeout_seconds": 400 * 24 * 3600}), field: "connection_timeout_seconds", value: 400 * 24 * 3600},
		{name: "negative id", body: valid(obj{"id": -3}), field: "id", value: -3},
		{name: "overlaps the config stream", body: valid(obj{"listen_port": cfgPort}), field: "listen_port", value: fmt.Sprintf("%d/tcp", cfgPort), contains: "from-config"},
		{name: "overlaps the API stream", body: valid(obj{"listen_port": apiPort, "listen_address": "0.0.0.0"}), field: "listen_port", value: fmt.Sprintf("%d/tcp", apiPort), contains: "from-api"},
		{name: "the admin port", body: valid(obj{"listen_port": inst.adminPort}), field: "listen_port", value: inst.adminPort},
		{name: "Caddy's HTTP server", body: valid(obj{"listen_port": httpPort}), field: "listen_port", value: httpPort, contains: "Caddy's HTTP server"},
		{name: "Caddy's HTTPS port", body: valid(obj{"listen_port": 443}), field: "listen_port", value: 443, contains: "HTTPS"},
		{name: "a port another program holds", body: valid(obj{"listen_port": heldPort}), field: "listen_port", value: heldPort, contains: "in use"},
		{name: "id of the config stream", body: valid(obj{"id": 1}), code: 409, field: "id", value: 1, contains: "config"},
		{name: "id of the API stream", body: valid(obj{"id": 2}), code: 409, field: "id", value: 2},
		{name: "unknown field", body: valid(obj{"listen": "127.0.0.1:5"}), field: "listen"},

		{name: "update: port 0", method: "PUT", path: "/api/v1/streams/2", body: stream(0, 0, up.Port, nil), field: "listen_port", contains: "required"},
		{name: "update: bad whitelist", method: "PUT", path: "/api/v1/streams/2", body: stream(0, apiPort, up.Port, obj{"whitelist_cidrs": []string{"x"}}), field: "whitelist_cidrs", value: "x"},
		{name: "update: udp with proxy v1", method: "PUT", path: "/api/v1/streams/2", body: stream(0, apiPort, up.Port, obj{"protocol": "udp", "proxy_protocol_version": 1}), field: "proxy_protocol_version", value: 1},
		{name: "update: onto the config stream's port", method: "PUT", path: "/api/v1/streams/2", body: stream(0, cfgPort, up.Port, nil), field: "listen_port", value: fmt.Sprintf("%d/tcp", cfgPort)},
		{name: "update: onto a held port", method: "PUT", path: "/api/v1/streams/2", body: stream(0, heldPort, up.Port, nil), field: "listen_port", value: heldPort, contains: "in use"},
		{name: "update: onto the admin port", method: "PUT", path: "/api/v1/streams/2", body: stream(0, inst.adminPort, up.Port, nil), field: "listen_port", value: inst.adminPort},
		{name: "update: another id", method: "PUT", path: "/api/v1/streams/2", body: stream(7, apiPort, up.Port, nil), field: "id", value: 7},
		{name: "update: unknown field", method: "PUT", path: "/api/v1/streams/2", body: stream(0, apiPort, up.Port, obj{"upstream": "x:1"}), field: "upstream"},
		{name: "update: a config stream", method: "PUT", path: "/api/v1/streams/1", body: stream(0, cfgPort, up.Port, obj{"name": "changed"}), code: 409, contains: "config"},
		{name: "delete: a config stream", method: "DELETE", path: "/api/v1/streams/1", code: 409, contains: "config"},
	} {
		method, path := tc.method, tc.path
		if method == "" {
			method, path = "POST", "/api/v1/streams"
		}
		code := tc.code
		if code == 0 {
			code = http.StatusBadRequest
		}
		var body any
		if tc.body != nil {
			body = tc.body
		}
		r := inst.call(method, path, body)
		if r.code != code {
			t.Errorf("%s: %s, want %d", tc.name, r, code)
			continue
		}
		var e errBody
		r.decode(t, &e)
		if e.Error == "" || !strings.Contains(e.Error, tc.contains) {
			t.Errorf("%s: error %q, want it to contain %q", tc.name, e.Error, tc.contains)
		}
		if e.Field != tc.field {
			t.Errorf("%s: field %q, want %q (%s)", tc.name, e.Field, tc.field, r)
		}
		if tc.value != nil && norm(e.Value) != norm(tc.value) {
			t.Errorf("%s: value %s, want %s (%s)", tc.name, norm(e.Value), norm(tc.value), r)
		}
		if tc.field != "" {
			if len(e.Errors) == 0 || e.Errors[0].Field != e.Field || norm(e.Errors[0].Value) != norm(e.Value) || e.Errors[0].Message == "" {
				t.Errorf("%s: errors %+v do not start with the top-level field", tc.name, e.Errors)
			}
		}
		if tc.errs > 0 && len(e.Errors) != tc.errs {
			t.Errorf("%s: %d errors, want %d: %s", tc.name, len(e.Errors), tc.errs, r)
		}
	}

	// Nothing changed: the list (settings, times, status and counters),
	// the database, the listeners and the open connection.
	if listAfter := inst.call("GET", "/api/v1/streams", nil).want(t, 200).body; !bytes.Equal(listAfter, listBefore) {
		t.Errorf("the stream list changed:\nbefore %s\nafter  %s", listBefore, listAfter)
	}
	if storedAfter := inst.storedHosts(); !reflect.DeepEqual(storedAfter, storedBefore) {
		t.Errorf("the database changed:\nbefore %+v\nafter  %+v", storedBefore, storedAfter)
	}
	if !refused(t, fresh) {
		t.Errorf("port %d of the refused creates listens", fresh)
	}
	if got := roundTrip(t, open, "after"); got != "after" {
		t.Errorf("the open connection after the refused writes: %q", got)
	}
	for _, p := range []int{cfgPort, apiPort} {
		if got := roundTrip(t, dial(t, p), "new"); got != "new" {
			t.Errorf("a new connection to port %d: %q", p, got)
		}
	}
	st := inst.call("GET", "/api/v1/streams/2", nil).want(t, 200).obj(t)["status"].(obj)
	if st["listening"] != true || st["active_connections"] != 2.0 {
		t.Errorf("status of the API stream: %v", st)
	}
}

// TestValidatePort checks listen settings without changing anything.
func TestValidatePort(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, apiPort, fresh := freePort(t), freePort(t), freePort(t)
	held, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, nil)), nil)
	inst.create(stream(2, apiPort, up.Port, nil))

	type result struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Field   string `json:"field"`
			Value   any    `json:"value"`
			Message string `json:"message"`
		} `json:"errors"`
		Warnings []string `json:"warnings"`
	}
	check := func(body obj) result {
		t.Helper()
		r := inst.call("POST", "/api/v1/streams/validate-port", body).want(t, http.StatusOK)
		var res result
		r.decode(t, &res)
		if res.Errors == nil || res.Warnings == nil {
			t.Fatalf("%s: errors and warnings must be arrays", r)
		}
		if res.Valid != (len(res.Errors) == 0) {
			t.Fatalf("%s: valid does not match errors", r)
		}
		return res
	}
	wantErr := func(what string, res result, field string, value any, contains string) {
		t.Helper()
		if res.Valid || len(res.Errors) == 0 || res.Errors[0].Field != field || norm(res.Errors[0].Value) != norm(value) ||
			!strings.Contains(res.Errors[0].Message, contains) {
			t.Errorf("%s: %+v, want an error on %s = %v containing %q", what, res, field, value, contains)
		}
	}

	if res := check(obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": fresh}); !res.Valid || len(res.Warnings) != 0 {
		t.Errorf("a free port: %+v", res)
	}
	if res := check(obj{"listen_port": fresh}); !res.Valid {
		t.Errorf("a free port, defaults: %+v", res)
	}
	wantErr("the config stream's port", check(obj{"listen_address": "127.0.0.1", "listen_port": cfgPort}), "listen_port", fmt.Sprintf("%d/tcp", cfgPort), "overlaps")
	wantErr("the API stream's port", check(obj{"listen_port": apiPort}), "listen_port", fmt.Sprintf("%d/tcp", apiPort), "overlaps")
	if res := check(obj{"listen_address": "127.0.0.1", "listen_port": apiPort, "id": 2}); !res.Valid {
		t.Errorf("the API stream's own port for itself: %+v", res)
	}
	if res := check(obj{"protocol": "udp", "listen_address": "127.0.0.1", "listen_port": apiPort}); !res.Valid {
		t.Errorf("udp on a tcp stream's port: %+v", res)
	}
	wantErr("a held port", check(obj{"listen_address": "127.0.0.1", "listen_port": heldPort}), "listen_port", heldPort, "in use")
	wantErr("the admin port", check(obj{"listen_address": "127.0.0.1", "listen_port": inst.adminPort}), "listen_port", inst.adminPort, "")
	wantErr("port 0", check(obj{"listen_port": 0}), "listen_port", nil, "the new stream: listen_port: required; must be 1-65535")
	wantErr("no port", check(obj{}), "listen_port", nil, "listen_port: required")
	wantErr("protocol", check(obj{"protocol": "icmp", "listen_port": fresh}), "protocol", "icmp", "tcp, udp or tcp+udp")
	wantErr("address", check(obj{"listen_address": "example.com", "listen_port": fresh}), "listen_address", "example.com", "hostnames")
	if res := check(obj{"listen_address": "127.0.0.1", "listen_port": 27017}); len(res.Warnings) == 0 || !strings.Contains(res.Warnings[0], "MongoDB") {
		t.Errorf("a well-known port: %+v", res)
	}
	if !refused(t, fresh) {
		t.Errorf("port %d listens after validate-port", fresh)
	}
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t); len(l) != 2 {
		t.Errorf("validate-port changed the list: %v", l)
	}
}

// TestErrorWording: the messages name what exists. A create without an id
// speaks of "the new stream", not of the id it would get; an empty
// listen_address is "every address"; an id conflict says what to do and
// lists the field in errors; every required setting left out is
// "required", without a value.
func TestErrorWording(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, wide := freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, obj{"name": "redis"})), nil)
	// A stream on every address of port wide.
	inst.create(stream(2, wide, up.Port, obj{"name": "wide", "listen_address": nil}))
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port

	for _, tc := range []struct {
		name     string
		body     obj
		code     int
		field    string
		value    any // as JSON: "null" for none
		message  string
		contains []string
	}{
		{name: "a bad port, no id", body: stream(0, 70000, up.Port, obj{"name": "db"}),
			field: "listen_port", value: "70000", message: `the new stream ("db"): listen_port 70000: must be 1-65535`},
		{name: "a bad port, no id, no name", body: stream(0, 70000, up.Port, obj{"name": nil}),
			field: "listen_port", value: "70000", message: `the new stream: listen_port 70000: must be 1-65535`},
		{name: "a bad port, with an id", body: stream(9, 70000, up.Port, obj{"name": "db"}),
			field: "listen_port", value: "70000", message: `stream 9 ("db"): listen_port 70000: must be 1-65535`},
		{name: "onto a stream on every address", body: stream(0, wide, up.Port, obj{"name": "narrow"}),
			field: "listen_port", value: fmt.Sprintf(`"%d/tcp"`, wide),
			message: fmt.Sprintf(`the new stream ("narrow"): listen_port %d/tcp overlaps stream 2 ("wide") on port %d of every address; use another port or address, or disable one of them`, wide, wide)},
		{name: "every address of a held port", body: stream(0, heldPort, up.Port, obj{"name": "all", "listen_address": nil}),
			field: "listen_port", value: fmt.Sprint(heldPort),
			contains: []string{fmt.Sprintf(`the new stream ("all"): listen_port %d (tcp) on every address: already in use`, heldPort)}},
		{name: "a held port", body: stream(0, heldPort, up.Port, obj{"name": "one"}),
			field: "listen_port", value: fmt.Sprint(heldPort),
			contains: []string{fmt.Sprintf(`the new stream ("one"): listen_port %d (tcp) on "127.0.0.1": already in use`, heldPort)}},
		{name: "required settings left out", body: obj{"name": "bare"},
			field: "listen_port", value: "null",
			message: `the new stream ("bare"): listen_port: required; must be 1-65535; ` +
				`upstream_host: required; must be a hostname or an IP address (e.g. db.internal, 10.0.0.5 or 2001:db8::5); ` +
				`upstream_port: required; must be 1-65535`},
		{name: "the id of a config stream", body: stream(1, freePort(t), up.Port, nil), code: http.StatusConflict,
			field: "id", value: "1",
			message: `conflict: id 1 is taken by stream 1 ("redis"), declared in the Caddy config; leave id out to get the next free id, or choose another`},
		{name: "the id of an API stream", body: stream(2, freePort(t), up.Port, nil), code: http.StatusConflict,
			field: "id", value: "2", contains: []string{`stream 2 ("wide"), created through the API`, "leave id out"}},
	} {
		code := tc.code
		if code == 0 {
			code = http.StatusBadRequest
		}
		r := inst.call("POST", "/api/v1/streams", tc.body)
		e := r.apiErr(t, code)
		if tc.message != "" && e.Error != tc.message {
			t.Errorf("%s: error\n%s\nwant\n%s", tc.name, e.Error, tc.message)
		}
		for _, c := range tc.contains {
			if !strings.Contains(e.Error, c) {
				t.Errorf("%s: error %q does not contain %q", tc.name, e.Error, c)
			}
		}
		if e.Field != tc.field || norm(e.Value) != tc.value || len(e.Errors) == 0 || e.Errors[0].Field != tc.field ||
			norm(e.Errors[0].Value) != tc.value || e.Errors[0].Message == "" {
			t.Errorf("%s: field %q value %s errors %+v, want %s = %s leading the errors", tc.name, e.Field, norm(e.Value), e.Errors, tc.field, tc.value)
		}
		if strings.Contains(e.Error, "stream 3") || strings.Contains(e.Error, `on ""`) {
			t.Errorf("%s: error %q names the id the stream would get or an empty address", tc.name, e.Error)
		}
	}
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).list(t); len(l) != 2 {
		t.Errorf("the refused creates changed the list: %v", l)
	}
}
