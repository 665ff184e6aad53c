package admin_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// ctMergePatch is the Content-Type of a JSON merge patch.
var ctMergePatch = hdr{"Content-Type", "application/merge-patch+json"}

// TestPatch: PATCH changes the settings a JSON merge patch names and keeps
// the others; null takes a setting back to its default; unknown fields,
// bad values and a removed required setting are 400s that change nothing;
// If-Match works as with PUT.
func TestPatch(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, port, other := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, nil)), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"name": "patched", "notes": "keep me", "max_connections": 5,
		"whitelist_cidrs": []string{"127.0.0.0/8"}})))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	patch := func(body any, headers ...hdr) response {
		t.Helper()
		if _, ok := body.(string); ok && len(headers) == 0 {
			headers = []hdr{ctMergePatch}
		}
		return inst.call("PATCH", path, body, headers...)
	}
	// settings is the stream as GET shows it, without the fields that
	// change with every write.
	settings := func() string {
		t.Helper()
		o := inst.call("GET", path, nil).want(t, http.StatusOK).obj(t)
		for _, k := range []string{"status", "updated_at", "version"} {
			delete(o, k)
		}
		return norm(o)
	}

	// {"enabled": false} disables the stream and keeps every other
	// setting; the answer is the stream with its ETag.
	before := settings()
	r := patch(`{"enabled": false}`).want(t, http.StatusOK)
	got := r.obj(t)
	if got["enabled"] != false || got["notes"] != "keep me" || norm(got["max_connections"]) != "5" || norm(got["listen_port"]) != norm(port) ||
		norm(got["whitelist_cidrs"]) != `["127.0.0.0/8"]` || got["name"] != "patched" {
		t.Fatalf("after PATCH enabled false: %s", r)
	}
	if tag, _ := inst.etagOf(path); r.header.Get("ETag") != tag {
		t.Fatalf("PATCH answered ETag %q, GET %q", r.header.Get("ETag"), tag)
	}
	if !refused(t, port) {
		t.Fatalf("port %d listens after PATCH enabled false", port)
	}
	// application/json is taken too.
	patch(`{"enabled": true}`, ctJSON).want(t, http.StatusOK)
	if got := settings(); got != before {
		t.Fatalf("disable then enable did not give the settings back:\nbefore %s\nafter  %s", before, got)
	}
	if got := roundTrip(t, dial(t, port), "on"); got != "on" {
		t.Fatalf("through the stream after enabling it again: %q", got)
	}

	// null removes a setting: it takes its default. A list is replaced
	// as a whole.
	got = patch(`{"notes": null, "max_connections": null, "whitelist_cidrs": ["10.0.0.0/8", "127.0.0.1"]}`).want(t, http.StatusOK).obj(t)
	if _, ok := got["notes"]; ok {
		t.Fatalf("notes after null: %v", got["notes"])
	}
	if _, ok := got["max_connections"]; ok || norm(got["whitelist_cidrs"]) != `["10.0.0.0/8","127.0.0.1"]` {
		t.Fatalf("after the patch: %v", got)
	}
	// enabled: null is its default, true.
	patch(`{"enabled": false}`).want(t, http.StatusOK)
	if got := patch(`{"enabled": null}`).want(t, http.StatusOK).obj(t); got["enabled"] != true {
		t.Fatalf("enabled after null: %v", got["enabled"])
	}
	// What GET answered, read-only fields and all, is a patch that
	// changes nothing.
	back := inst.call("GET", path, nil).want(t, http.StatusOK).obj(t)
	before = settings()
	inst.call("PATCH", path, back, ctMergePatch).want(t, http.StatusOK)
	if got := settings(); got != before {
		t.Fatalf("patching with what GET answered changed the settings:\nbefore %s\nafter  %s", before, got)
	}

	// Refused patches change nothing: not the list, not the database, not
	// the listener.
	listBefore := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).body
	rowBefore := inst.storedHosts()
	tag, _ := inst.etagOf(path)
	for _, tc := range []struct {
		name     string
		body     string
		headers  []hdr
		code     int
		field    string
		contains string
		errs     int
	}{
		{name: "unknown fields", body: `{"enabld": false, "bogus": 1}`, field: "enabld", contains: `unknown fields "enabld" (did you mean enabled?), "bogus"`, errs: 2},
		{name: "a repeated field", body: `{"name": "a", "name": "b"}`, field: "name", contains: "twice"},
		{name: "a required setting removed", body: `{"listen_port": null, "enabled": false}`, field: "listen_port", contains: "listen_port: required"},
		{name: "every required setting removed", body: `{"listen_port": null, "upstream_host": null, "upstream_port": null}`, field: "listen_port", contains: "upstream_port: required", errs: 3},
		{name: "a bad value", body: `{"listen_port": 70000}`, field: "listen_port", contains: "1-65535"},
		{name: "a value of the wrong type", body: `{"listen_port": "80"}`, field: "listen_port", contains: "must be an integer"},
		{name: "an object for a list", body: `{"whitelist_cidrs": {"a": 1}}`, field: "whitelist_cidrs", contains: "must be a list"},
		{name: "another id", body: `{"id": 99}`, field: "id", contains: "cannot change"},
		{name: "the config stream's port", body: fmt.Sprintf(`{"listen_port": %d, "listen_address": "127.0.0.1"}`, cfgPort), field: "listen_port", contains: "overlaps"},
		{name: "not an object", body: `[{"enabled": false}]`, contains: "JSON object"},
		{name: "null", body: `null`, contains: "JSON object"},
		{name: "not JSON", body: `{"enabled": fals}`, contains: "not valid JSON"},
		{name: "empty", body: ``, contains: "empty"},
		{name: "a JSON patch", body: `[{"op": "replace", "path": "/enabled", "value": false}]`, headers: []hdr{{"Content-Type", "application/json-patch+json"}},
			code: http.StatusUnsupportedMediaType, contains: "application/merge-patch+json"},
		{name: "no content type", body: `{"enabled": false}`, headers: []hdr{{"Content-Type", ""}}, code: http.StatusUnsupportedMediaType},
		{name: "a stale If-Match", body: `{"enabled": false}`, headers: []hdr{ctMergePatch, {"If-Match", `"1"`}}, code: http.StatusPreconditionFailed, contains: "changed by someone else"},
		{name: "a foreign origin", body: `{"enabled": false}`, headers: []hdr{ctMergePatch, {"Origin", "http://evil.example"}}, code: http.StatusForbidden},
	} {
		code := tc.code
		if code == 0 {
			code = http.StatusBadRequest
		}
		r := patch(tc.body, tc.headers...)
		e := r.apiErr(t, code)
		if !strings.Contains(e.Error, tc.contains) || e.Field != tc.field {
			t.Errorf("%s: %s, want field %q and a message containing %q", tc.name, r, tc.field, tc.contains)
		}
		if tc.errs > 0 && len(e.Errors) != tc.errs {
			t.Errorf("%s: %d errors, want %d: %s", tc.name, len(e.Errors), tc.errs, r)
		}
		if code == http.StatusUnsupportedMediaType && r.header.Get("Accept-Patch") != "application/merge-patch+json, application/json" {
			t.Errorf("%s: Accept-Patch %q", tc.name, r.header.Get("Accept-Patch"))
		}
	}
	if listAfter := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).body; string(listAfter) != string(listBefore) {
		t.Errorf("the refused patches changed the list:\nbefore %s\nafter  %s", listBefore, listAfter)
	}
	if rowAfter := inst.storedHosts(); norm(rowAfter) != norm(rowBefore) {
		t.Errorf("the refused patches changed the database:\nbefore %s\nafter  %s", norm(rowBefore), norm(rowAfter))
	}
	if got := roundTrip(t, dial(t, port), "kept"); got != "kept" {
		t.Fatalf("through the stream after the refused patches: %q", got)
	}
	if !refused(t, other) {
		t.Fatalf("port %d listens", other)
	}

	// The current ETag lets a patch through.
	r = patch(fmt.Sprintf(`{"listen_port": %d}`, other), ctMergePatch, hdr{"If-Match", tag}).want(t, http.StatusOK)
	if r.header.Get("ETag") == tag {
		t.Fatalf("the ETag did not change: %s", tag)
	}
	if got := roundTrip(t, dial(t, other), "moved"); got != "moved" || !refused(t, port) {
		t.Fatalf("after moving the stream by PATCH: %q", got)
	}

	// Config streams are read-only; unknown streams are 404.
	inst.call("PATCH", "/api/v1/streams/1", `{"enabled": false}`, ctMergePatch).apiErr(t, http.StatusConflict)
	inst.call("PATCH", "/api/v1/streams/999", `{"enabled": false}`, ctMergePatch).apiErr(t, http.StatusNotFound)
	// OPTIONS names PATCH and the patch types.
	r = inst.call("OPTIONS", path, nil).want(t, http.StatusNoContent)
	if r.header.Get("Allow") != "GET, HEAD, PUT, PATCH, DELETE, OPTIONS" || r.header.Get("Accept-Patch") != "application/merge-patch+json, application/json" {
		t.Fatalf("OPTIONS: Allow %q, Accept-Patch %q", r.header.Get("Allow"), r.header.Get("Accept-Patch"))
	}
}

// TestPutMissingSettings: a PUT is a whole stream; one that leaves out a
// required setting says so, for each, and points to PATCH.
func TestPutMissingSettings(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"name": "whole"})))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	rowBefore := inst.storedHosts()

	e := inst.call("PUT", path, obj{"enabled": false}).apiErr(t, http.StatusBadRequest)
	if len(e.Errors) != 3 || e.Field != "listen_port" || e.Value != nil {
		t.Fatalf("PUT {enabled: false}: %+v", e)
	}
	for i, f := range []string{"listen_port", "upstream_host", "upstream_port"} {
		want := fmt.Sprintf(`stream %d ("whole"): %s: missing (PUT replaces the whole stream; send every setting, or use PATCH)`, sid, f)
		if p := e.Errors[i]; p.Field != f || p.Value != nil || p.Message != want {
			t.Errorf("errors[%d] = %+v, want %s", i, p, want)
		}
	}
	// One left out: only that one.
	e = inst.call("PUT", path, stream(0, port, up.Port, obj{"upstream_port": nil})).apiErr(t, http.StatusBadRequest)
	if len(e.Errors) != 1 || e.Field != "upstream_port" || !strings.Contains(e.Error, "missing") {
		t.Fatalf("PUT without upstream_port: %+v", e)
	}
	if rowAfter := inst.storedHosts(); norm(rowAfter) != norm(rowBefore) {
		t.Fatalf("the refused PUTs changed the database")
	}
	if got := roundTrip(t, dial(t, port), "whole"); got != "whole" {
		t.Fatalf("through the stream after the refused PUTs: %q", got)
	}
}
