package admin_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// TestRoutes walks every route with good and bad methods, paths, headers
// and bodies, and checks the status codes and the JSON error shape.
func TestRoutes(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort := freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, nil)), nil)
	self := "http://" + inst.adminAddr()

	// Create, with a charset parameter on the content type: 201, the
	// stored host with its status, and a Location to GET it from.
	p2 := freePort(t)
	r := inst.call("POST", "/api/v1/streams", stream(0, p2, up.Port, nil), hdr{"Content-Type", "application/json; charset=utf-8"})
	created := r.want(t, http.StatusCreated).obj(t)
	if id(created) != 2 || created["source"] != "api" || created["created_at"] == nil || created["status"] == nil {
		t.Fatalf("created: %s", r)
	}
	if loc := r.header.Get("Location"); loc != "/api/v1/streams/2" {
		t.Fatalf("Location %q, want /api/v1/streams/2", loc)
	}
	got := inst.call("GET", "/api/v1/streams/2", nil).want(t, http.StatusOK).obj(t)
	if norm(got["listen_port"]) != norm(p2) || got["source"] != "api" {
		t.Fatalf("GET the Location: %v", got)
	}
	// HEAD is GET without a body.
	if r := inst.call("HEAD", "/api/v1/streams/2", nil); r.code != http.StatusOK || len(r.body) != 0 {
		t.Fatalf("HEAD: %s", r)
	}

	checkRoutes(t, inst.call, []routeCase{
		// Reads.
		{method: "GET", path: "/api/v1/streams", code: 200},
		{method: "GET", path: "/api/v1/streams/", code: 200},
		{method: "GET", path: "/api/v1/streams/stats", code: 200},
		{method: "GET", path: "/api/v1/streams/1", code: 200},
		{method: "GET", path: "/api/v1/streams/1/active", code: 200},
		{method: "GET", path: "/api/v1/streams/1/connections", code: 200},
		// Unknown streams, ids and paths.
		{method: "GET", path: "/api/v1/streams/999", code: 404, contains: "999"},
		{method: "PUT", path: "/api/v1/streams/999", body: stream(0, freePort(t), up.Port, nil), code: 404},
		{method: "PATCH", path: "/api/v1/streams/999", body: obj{"enabled": false}, code: 404},
		{method: "DELETE", path: "/api/v1/streams/999", code: 404},
		{method: "GET", path: "/api/v1/streams/999/active", code: 404},
		{method: "GET", path: "/api/v1/streams/999/connections", code: 404},
		{method: "DELETE", path: "/api/v1/streams/999/active/1", code: 404},
		{method: "DELETE", path: "/api/v1/streams/1/active/424242", code: 404},
		{method: "GET", path: "/api/v1/streams/abc", code: 404, contains: "positive integer"},
		{method: "GET", path: "/api/v1/streams/0", code: 404, contains: "positive integer"},
		{method: "GET", path: "/api/v1/streams/-1", code: 404, contains: "positive integer"},
		{method: "GET", path: "/api/v1/streams/+1", code: 404},
		{method: "GET", path: "/api/v1/streams/99999999999999999999", code: 404},
		{method: "GET", path: "/api/v1/streams/1/nope", code: 404},
		{method: "GET", path: "/api/v1/streams/1/", code: 404},
		{method: "GET", path: "/api/v1/streams/stats/1", code: 404},
		{method: "DELETE", path: "/api/v1/streams/1/active/x", code: 404, contains: "connection id"},
		{method: "DELETE", path: "/api/v1/streams/1/active/1/x", code: 404},
		// Wrong methods.
		{method: "PUT", path: "/api/v1/streams", code: 405, allow: "GET, HEAD, POST, OPTIONS"},
		{method: "DELETE", path: "/api/v1/streams", code: 405, allow: "GET, HEAD, POST, OPTIONS"},
		{method: "PATCH", path: "/api/v1/streams", code: 405, allow: "GET, HEAD, POST, OPTIONS"},
		{method: "POST", path: "/api/v1/streams/2", body: obj{}, code: 405, allow: "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"},
		{method: "OPTIONS", path: "/api/v1/streams/2", code: 204, allow: "GET, HEAD, PUT, PATCH, DELETE, OPTIONS"},
		{method: "PATCH", path: "/api/v1/streams/stats", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "POST", path: "/api/v1/streams/stats", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "PUT", path: "/api/v1/streams/stats", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "DELETE", path: "/api/v1/streams/stats", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "GET", path: "/api/v1/streams/validate-port", code: 405, allow: "POST, OPTIONS"},
		{method: "POST", path: "/api/v1/streams/1/active", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "GET", path: "/api/v1/streams/1/active/5", code: 405, allow: "DELETE, OPTIONS"},
		{method: "DELETE", path: "/api/v1/streams/1/connections", code: 405, allow: "GET, HEAD, OPTIONS"},
		{method: "OPTIONS", path: "/api/v1/streams", code: 204, allow: "GET, HEAD, POST, OPTIONS"},
		// Content type.
		{method: "POST", path: "/api/v1/streams", body: `{}`, code: 415, contains: "application/json"},
		{method: "POST", path: "/api/v1/streams", body: `{}`, headers: []hdr{{"Content-Type", "text/plain"}}, code: 415},
		{method: "POST", path: "/api/v1/streams", body: `listen_port=5`, headers: []hdr{{"Content-Type", "application/x-www-form-urlencoded"}}, code: 415},
		{method: "PUT", path: "/api/v1/streams/2", body: `{}`, headers: []hdr{{"Content-Type", "multipart/form-data; boundary=x"}}, code: 415},
		{method: "PUT", path: "/api/v1/streams/2", body: `{}`, headers: []hdr{{"Content-Type", "application/merge-patch+json"}}, code: 415, contains: "application/json"},
		{method: "PATCH", path: "/api/v1/streams/2", body: `{}`, headers: []hdr{{"Content-Type", "text/plain"}}, code: 415, contains: "merge-patch"},
		{method: "POST", path: "/api/v1/streams/validate-port", body: `{"listen_port": 5}`, code: 415},
		// Body size: 413.
		{method: "POST", path: "/api/v1/streams", body: `{"notes": "` + strings.Repeat("x", 2<<20) + `"}`, headers: []hdr{ctJSON}, code: 413},
		{method: "PUT", path: "/api/v1/streams/2", body: `{"notes": "` + strings.Repeat("x", 1<<20) + `"}`, headers: []hdr{ctJSON}, code: 413},
		// Origin: another site's page may not change anything (Caddy's
		// admin endpoint refuses a foreign Origin itself; the API refuses
		// Sec-Fetch-Site: cross-site without an Origin).
		{method: "POST", path: "/api/v1/streams", body: stream(0, freePort(t), up.Port, nil), headers: []hdr{{"Origin", "http://evil.example"}}, code: 403},
		{method: "DELETE", path: "/api/v1/streams/2", headers: []hdr{{"Origin", "http://evil.example"}}, code: 403},
		{method: "POST", path: "/api/v1/streams", body: stream(0, freePort(t), up.Port, nil), headers: []hdr{{"Sec-Fetch-Site", "cross-site"}}, code: 403, contains: "cross-site"},
		{method: "PUT", path: "/api/v1/streams/2", body: stream(0, p2, up.Port, nil), headers: []hdr{{"Sec-Fetch-Site", "same-site"}}, code: 403},
		{method: "DELETE", path: "/api/v1/streams/2", headers: []hdr{{"Sec-Fetch-Site", "cross-site"}}, code: 403},
		// A same-origin page may (a PUT that changes nothing).
		{method: "PUT", path: "/api/v1/streams/2", body: stream(0, p2, up.Port, nil), headers: []hdr{{"Origin", self}}, code: 200},
		{method: "PUT", path: "/api/v1/streams/2", body: stream(0, p2, up.Port, nil), headers: []hdr{{"Sec-Fetch-Site", "same-origin"}}, code: 200},
		// Malformed bodies.
		{method: "POST", path: "/api/v1/streams", body: ``, headers: []hdr{ctJSON}, code: 400, contains: "empty"},
		{method: "POST", path: "/api/v1/streams", body: `{"name": `, headers: []hdr{ctJSON}, code: 400, contains: "not valid JSON"},
		{method: "POST", path: "/api/v1/streams", body: `{"name": "x",}`, headers: []hdr{ctJSON}, code: 400, contains: "not valid JSON"},
		{method: "POST", path: "/api/v1/streams", body: `[{"name": "x"}]`, headers: []hdr{ctJSON}, code: 400, contains: "JSON object"},
		{method: "POST", path: "/api/v1/streams", body: `"x"`, headers: []hdr{ctJSON}, code: 400, contains: "JSON object"},
		{method: "POST", path: "/api/v1/streams", body: `{"name": "x"} trailing`, headers: []hdr{ctJSON}, code: 400, contains: "goes on after"},
		{method: "POST", path: "/api/v1/streams", body: `{"name": "x"}{"name": "y"}`, headers: []hdr{ctJSON}, code: 400, contains: "goes on after"},
		{method: "POST", path: "/api/v1/streams/validate-port", body: `{"listen_port": 5} 1`, headers: []hdr{ctJSON}, code: 400},
		{method: "POST", path: "/api/v1/streams/validate-port", body: ``, headers: []hdr{ctJSON}, code: 400},
	})

	// Unknown, misspelt and repeated fields are refused, naming them.
	base := stream(0, freePort(t), up.Port, nil)
	withExtra := func(extra obj) obj {
		s := stream(0, base["listen_port"].(int), up.Port, nil)
		for k, v := range extra {
			s[k] = v
		}
		return s
	}
	e := inst.call("POST", "/api/v1/streams", withExtra(obj{"bogus": 1})).apiErr(t, 400)
	if e.Field != "bogus" || norm(e.Value) != "1" || !strings.Contains(e.Error, `unknown field "bogus"`) {
		t.Errorf("unknown field: %+v", e)
	}
	e = inst.call("POST", "/api/v1/streams", withExtra(obj{"Listen_Port": 5, "zzz": true})).apiErr(t, 400)
	if e.Field != "Listen_Port" || len(e.Errors) != 2 || e.Errors[1].Field != "zzz" {
		t.Errorf("two unknown fields: %+v", e)
	}
	many := obj{}
	for i := range 50 {
		many[fmt.Sprintf("x%02d", i)] = i
	}
	e = inst.call("POST", "/api/v1/streams", withExtra(many)).apiErr(t, 400)
	if e.Field != "x00" || len(e.Errors) != 10 || len(e.Error) > 1000 {
		t.Errorf("50 unknown fields: %d listed, message of %d bytes", len(e.Errors), len(e.Error))
	}
	e = inst.call("PUT", "/api/v1/streams/2", withExtra(obj{"nested": obj{"a": 1}})).apiErr(t, 400)
	if e.Field != "nested" {
		t.Errorf("unknown field in PUT: %+v", e)
	}
	e = inst.call("POST", "/api/v1/streams", `{"name": "a", "name": "b"}`, ctJSON).apiErr(t, 400)
	if e.Field != "name" || !strings.Contains(e.Error, "twice") {
		t.Errorf("repeated field: %+v", e)
	}
	e = inst.call("POST", "/api/v1/streams/validate-port", obj{"listen_port": 5, "upstream_port": 1}).apiErr(t, 400)
	if e.Field != "upstream_port" {
		t.Errorf("unknown field in validate-port: %+v", e)
	}
	// Values of the wrong JSON type.
	for _, tc := range []struct {
		field string
		value any
	}{
		{"listen_port", "80"}, {"listen_port", 1.5}, {"listen_port", 1e30}, {"enabled", "yes"},
		{"whitelist_cidrs", "10.0.0.0/8"}, {"blacklist_cidrs", []any{1}}, {"name", 5}, {"id", "2"},
	} {
		e := inst.call("POST", "/api/v1/streams", withExtra(obj{tc.field: tc.value})).apiErr(t, 400)
		if e.Field != tc.field || norm(e.Value) != norm(tc.value) || !strings.Contains(e.Error, "must be") {
			t.Errorf("%s = %v: %+v", tc.field, tc.value, e)
		}
	}
	e = inst.call("POST", "/api/v1/streams/validate-port", obj{"listen_port": "80"}).apiErr(t, 400)
	if e.Field != "listen_port" || e.Value != "80" {
		t.Errorf("validate-port with a string port: %+v", e)
	}

	// What GET returns can be sent back as it is: the read-only fields
	// (source, status, created_at, updated_at) are ignored.
	back := inst.call("GET", "/api/v1/streams/2", nil).want(t, 200).obj(t)
	back["name"] = "sent-back"
	updated := inst.call("PUT", "/api/v1/streams/2", back).want(t, http.StatusOK).obj(t)
	if updated["name"] != "sent-back" || updated["created_at"] != back["created_at"] || updated["source"] != "api" {
		t.Fatalf("PUT of what GET returned: %v", updated)
	}
	// The id in a PUT body: absent or the path's; another is refused.
	noID := stream(0, p2, up.Port, obj{"name": "no-id"})
	if got := inst.call("PUT", "/api/v1/streams/2", noID).want(t, 200).obj(t); id(got) != 2 || got["name"] != "no-id" {
		t.Fatalf("PUT without an id: %v", got)
	}
	e = inst.call("PUT", "/api/v1/streams/2", stream(3, p2, up.Port, nil)).apiErr(t, 400)
	if e.Field != "id" || norm(e.Value) != "3" {
		t.Errorf("PUT with another id: %+v", e)
	}
	// PUT is a full replacement: a setting left out takes its default
	// (enabled: true, max_connections: 0).
	inst.call("PUT", "/api/v1/streams/2", stream(0, p2, up.Port, obj{"max_connections": 5})).want(t, 200)
	got = inst.call("PUT", "/api/v1/streams/2", stream(0, p2, up.Port, nil)).want(t, 200).obj(t)
	if got["enabled"] != true || got["max_connections"] != nil {
		t.Fatalf("PUT without enabled and max_connections: %v", got)
	}

	// DELETE needs no body and no content type.
	inst.call("DELETE", "/api/v1/streams/2", nil).want(t, http.StatusNoContent)
	inst.call("DELETE", "/api/v1/streams/2", nil).apiErr(t, http.StatusNotFound)
	if !refused(t, p2) {
		t.Fatalf("port %d still accepts connections after DELETE", p2)
	}
}

// TestNoStreamsApp: without a streams app, lists are empty and everything
// else answers 503.
func TestNoStreamsApp(t *testing.T) {
	checkNoLeaks(t)
	inst := newInstance(t)
	if err := inst.load(nil, nil); err != nil {
		t.Fatal(err)
	}
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t); len(l) != 0 {
		t.Fatalf("list: %v", l)
	}
	if l := inst.call("GET", "/api/v1/streams/stats", nil).want(t, 200).list(t); len(l) != 0 {
		t.Fatalf("stats: %v", l)
	}
	inst.call("POST", "/api/v1/streams", stream(0, freePort(t), 1, nil)).apiErr(t, 503)
	inst.call("GET", "/api/v1/streams/1", nil).apiErr(t, 503)
	inst.call("POST", "/api/v1/streams/validate-port", obj{"listen_port": 5000}).apiErr(t, 503)
}

// TestStorageOff: with storage off, the config's streams run and can be
// read, but the API cannot create any and has no connection log.
func TestStorageOff(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	p1 := freePort(t)
	app := streamsApp(stream(1, p1, up.Port, nil))
	app["storage"] = obj{"disabled": true}
	inst := startCaddy(t, app, nil)
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t); len(l) != 1 {
		t.Fatalf("list: %v", l)
	}
	p2 := freePort(t)
	e := inst.call("POST", "/api/v1/streams", stream(0, p2, up.Port, nil)).apiErr(t, 409)
	if !strings.Contains(e.Error, "storage") {
		t.Errorf("create without storage: %+v", e)
	}
	inst.call("GET", "/api/v1/streams/1/connections", nil).apiErr(t, 409)
	inst.call("PUT", "/api/v1/streams/1", stream(0, p1, up.Port, nil)).apiErr(t, 409)
	if !refused(t, p2) {
		t.Errorf("port %d listens after a refused create", p2)
	}
	c := dial(t, p1)
	if got := roundTrip(t, c, "ok"); got != "ok" {
		t.Fatalf("config stream: %q", got)
	}
}

// routeCase is one request and the answer it must get.
type routeCase struct {
	method, path string
	body         any
	headers      []hdr
	code         int
	allow        string // for 405 and OPTIONS
	contains     string // in the error message
}

// checkRoutes sends each case with call and checks the status, the Allow
// header and the error message.
func checkRoutes(t *testing.T, call func(method, path string, body any, headers ...hdr) response, cases []routeCase) {
	t.Helper()
	for _, tc := range cases {
		name := fmt.Sprintf("%s %s %v", tc.method, tc.path, tc.headers)
		if len(name) > 120 {
			name = name[:120]
		}
		r := call(tc.method, tc.path, tc.body, tc.headers...)
		if r.code != tc.code {
			t.Errorf("%s: got %s, want %d", name, r, tc.code)
			continue
		}
		if tc.allow != "" && r.header.Get("Allow") != tc.allow {
			t.Errorf("%s: Allow %q, want %q", name, r.header.Get("Allow"), tc.allow)
		}
		if tc.code >= 400 {
			var e errBody
			r.decode(t, &e)
			if e.Error == "" || !strings.Contains(e.Error, tc.contains) {
				t.Errorf("%s: error %q, want a message containing %q", name, e.Error, tc.contains)
			}
		}
	}
}
