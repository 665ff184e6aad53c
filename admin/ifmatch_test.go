package admin_test

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// strongETag is a strong entity tag: a quoted string, no W/.
var strongETag = regexp.MustCompile(`^"[0-9A-Za-z]+"$`)

// etagOf GETs stream path and returns its ETag, checking that it is strong
// and matches the version in the body.
func (inst *instance) etagOf(path string) (string, obj) {
	inst.t.Helper()
	r := inst.call("GET", path, nil).want(inst.t, http.StatusOK)
	tag := r.header.Get("ETag")
	o := r.obj(inst.t)
	if !strongETag.MatchString(tag) || tag != fmt.Sprintf("%q", o["version"]) {
		inst.t.Fatalf("GET %s: ETag %q, version %v: want a strong ETag that is the version in quotes", path, tag, o["version"])
	}
	return tag, o
}

// TestIfMatch checks the ETag of a stream and PUT and DELETE with
// If-Match: a stale one changes nothing (412), the current one or * goes
// through, and without the header writes work as they always did.
func TestIfMatch(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, p1, p2 := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, obj{"name": "cfg"})), nil)
	created := inst.call("POST", "/api/v1/streams", stream(0, p1, up.Port, obj{"name": "v1"})).want(t, http.StatusCreated)
	sid := id(created.obj(t))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	tag1, _ := inst.etagOf(path)
	if created.header.Get("ETag") != tag1 {
		t.Fatalf("POST answered ETag %q, GET %q", created.header.Get("ETag"), tag1)
	}
	if r := inst.call("HEAD", path, nil); r.header.Get("ETag") != tag1 {
		t.Fatalf("HEAD: ETag %q, want %q", r.header.Get("ETag"), tag1)
	}
	// The list carries each stream's version.
	for _, s := range inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).list(t) {
		if want, _ := inst.etagOf(fmt.Sprintf("/api/v1/streams/%d", id(s))); fmt.Sprintf("%q", s["version"]) != want {
			t.Fatalf("list: stream %d has version %v, GET has ETag %s", id(s), s["version"], want)
		}
	}

	// The current ETag: the update goes through, and the ETag changes.
	r := inst.call("PUT", path, stream(0, p1, up.Port, obj{"name": "v2"}), hdr{"If-Match", tag1}).want(t, http.StatusOK)
	tag2, got := inst.etagOf(path)
	if tag2 == tag1 || r.header.Get("ETag") != tag2 || got["name"] != "v2" {
		t.Fatalf("after PUT with the current ETag: ETag %q (was %q, PUT answered %q), name %v", tag2, tag1, r.header.Get("ETag"), got["name"])
	}
	// Sending back what GET answered, version included, is a write all
	// the same: a new ETag.
	r = inst.call("PUT", path, got, hdr{"If-Match", tag2}).want(t, http.StatusOK)
	if tag, _ := inst.etagOf(path); tag == tag2 || r.header.Get("ETag") != tag {
		t.Fatalf("an update to the same settings: ETag %s (was %s, PUT answered %s)", tag, tag2, r.header.Get("ETag"))
	} else {
		tag2 = tag
	}

	// A stale ETag: 412, and nothing changed: not the API's view, not the
	// database row, not the listener (the stale write would move it to p2
	// and disable it).
	rowBefore := inst.storedHosts()
	stale := inst.call("PUT", path, stream(0, p2, up.Port, obj{"name": "lost", "enabled": false}), hdr{"If-Match", tag1})
	e := stale.apiErr(t, http.StatusPreconditionFailed)
	if want := fmt.Sprintf("stream %d was changed by someone else since you loaded it", sid); !strings.Contains(e.Error, want) {
		t.Fatalf("412 message %q does not say %q", e.Error, want)
	}
	if tag, got := inst.etagOf(path); tag != tag2 || got["name"] != "v2" || got["enabled"] != true {
		t.Fatalf("after the stale PUT: ETag %s (want %s), %v", tag, tag2, got)
	}
	if after := inst.storedHosts(); norm(after) != norm(rowBefore) {
		t.Fatalf("the stale PUT changed the database:\nbefore %s\nafter  %s", norm(rowBefore), norm(after))
	}
	if got := roundTrip(t, dial(t, p1), "still"); got != "still" {
		t.Fatalf("through the stream after the stale PUT: %q", got)
	}
	if !refused(t, p2) {
		t.Fatalf("port %d of the stale PUT listens", p2)
	}

	// If-Match forms: a list with the current tag matches; * matches; a
	// weak tag never does (If-Match compares strongly); a value that is no
	// entity tag is a 400 that says what to send.
	for i, tc := range []struct {
		ifMatch string
		code    int
	}{
		{`"nope", ` + tag2, http.StatusOK},
		{"*", http.StatusOK},
		{"W/" + tag2, http.StatusPreconditionFailed},
		{strings.Trim(tag2, `"`), http.StatusBadRequest},
		{`"unclosed`, http.StatusBadRequest},
	} {
		r := inst.call("PUT", path, stream(0, p1, up.Port, obj{"name": fmt.Sprintf("form-%d", i)}), hdr{"If-Match", tc.ifMatch})
		if r.code != tc.code {
			t.Fatalf("If-Match %s: %s, want %d", tc.ifMatch, r, tc.code)
		}
		if r.code == http.StatusBadRequest && !strings.Contains(r.apiErr(t, 400).Error, "If-Match") {
			t.Fatalf("If-Match %s: %s does not name the header", tc.ifMatch, r)
		}
		if strings.HasPrefix(tc.ifMatch, "W/") && !strings.Contains(r.apiErr(t, 412).Error, "a weak entity tag (W/...) never matches") {
			t.Fatalf("If-Match %s: %s does not say that weak tags never match", tc.ifMatch, r)
		}
		if r.code == http.StatusOK {
			tag2 = r.header.Get("ETag")
		}
	}

	// Without If-Match, a write goes through whatever the version.
	inst.call("PUT", path, stream(0, p1, up.Port, obj{"name": "v3"})).want(t, http.StatusOK)
	tag3, _ := inst.etagOf(path)
	// A reload reads the stream back from storage: the same settings, the
	// same ETag.
	if err := inst.load(streamsApp(stream(1, cfgPort, up.Port, obj{"name": "cfg"})), nil); err != nil {
		t.Fatal(err)
	}
	if tag, _ := inst.etagOf(path); tag != tag3 {
		t.Fatalf("after a reload: ETag %s, want %s as before", tag, tag3)
	}

	// The config stream has an ETag too, and stays read-only.
	cfgTag, _ := inst.etagOf("/api/v1/streams/1")
	inst.call("PUT", "/api/v1/streams/1", stream(0, cfgPort, up.Port, nil), hdr{"If-Match", cfgTag}).apiErr(t, http.StatusConflict)
	// A stream that does not exist is 404, If-Match or not.
	inst.call("DELETE", "/api/v1/streams/99", nil, hdr{"If-Match", "*"}).apiErr(t, http.StatusNotFound)

	// DELETE with a stale ETag: 412, and the stream goes on.
	inst.call("DELETE", path, nil, hdr{"If-Match", tag2}).apiErr(t, http.StatusPreconditionFailed)
	inst.call("GET", path, nil).want(t, http.StatusOK)
	if got := roundTrip(t, dial(t, p1), "alive"); got != "alive" {
		t.Fatalf("through the stream after the stale DELETE: %q", got)
	}
	if len(inst.storedHosts()) != 1 {
		t.Fatalf("the stale DELETE deleted the row")
	}
	// With the current one it is deleted.
	inst.call("DELETE", path, nil, hdr{"If-Match", tag3}).want(t, http.StatusNoContent)
	inst.call("GET", path, nil).apiErr(t, http.StatusNotFound)
	if !refused(t, p1) {
		t.Fatalf("port %d still listens after the DELETE", p1)
	}
}

// TestIfMatchConcurrent sends two PUTs with the same If-Match at once,
// 20 times: each time exactly one goes through and the other gets 412,
// and the stream ends with the winner's settings.
func TestIfMatchConcurrent(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"name": "race"})))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	for round := range 20 {
		tag, _ := inst.etagOf(path)
		var rs [2]response
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range rs {
			wg.Go(func() {
				<-start
				rs[i] = inst.try("PUT", path, stream(0, port, up.Port, obj{"name": fmt.Sprintf("r%d-%d", round, i)}), hdr{"If-Match", tag})
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, r := range rs {
			switch r.code {
			case http.StatusOK:
				if winner >= 0 {
					t.Fatalf("round %d: both PUTs with If-Match %s went through: %s; %s", round, tag, rs[0], rs[1])
				}
				winner = i
			case http.StatusPreconditionFailed:
			default:
				t.Fatalf("round %d: %s, want 200 or 412", round, r)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: neither PUT went through: %s; %s", round, rs[0], rs[1])
		}
		if _, got := inst.etagOf(path); got["name"] != fmt.Sprintf("r%d-%d", round, winner) {
			t.Fatalf("round %d: name %v, want the winner's r%d-%d", round, got["name"], round, winner)
		}
	}
	if got := roundTrip(t, dial(t, port), "after"); got != "after" {
		t.Fatalf("through the stream after the races: %q", got)
	}
}

// TestVersionsNeverComeBack: a stream's ETag changes on every accepted
// write and never returns to an earlier value, so a write based on a
// version from before disable → enable is refused (412) and changes
// nothing; and after a restart, and for a stream created again under a
// deleted one's id, no version handed out before comes back.
func TestVersionsNeverComeBack(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port, other := freePort(t), freePort(t)
	app := streamsApp()
	inst := startCaddy(t, app, nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"name": "toggled"})))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	seen := map[string]bool{}
	fresh := func(what, tag string) {
		t.Helper()
		if seen[tag] {
			t.Fatalf("%s: ETag %s was handed out before", what, tag)
		}
		seen[tag] = true
	}
	before, settings := inst.etagOf(path)
	fresh("create", before)

	// Disable, then enable: the settings are as before, the ETag is not.
	settings["enabled"] = false
	fresh("disable", inst.call("PUT", path, settings).want(t, http.StatusOK).header.Get("ETag"))
	settings["enabled"] = true
	fresh("enable", inst.call("PUT", path, settings).want(t, http.StatusOK).header.Get("ETag"))
	current, _ := inst.etagOf(path)

	// Writes based on the version from before both: 412, nothing changed.
	rowBefore := inst.storedHosts()
	listBefore := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).body
	for _, w := range []struct {
		method string
		body   any
		ct     hdr
	}{
		{"PUT", stream(0, other, up.Port, obj{"name": "lost"}), ctJSON},
		{"PATCH", `{"listen_port": ` + fmt.Sprint(other) + `}`, ctMergePatch},
		{"DELETE", nil, hdr{}},
	} {
		inst.call(w.method, path, w.body, w.ct, hdr{"If-Match", before}).apiErr(t, http.StatusPreconditionFailed)
	}
	if after := inst.storedHosts(); norm(after) != norm(rowBefore) {
		t.Fatalf("the stale writes changed the database:\nbefore %s\nafter  %s", norm(rowBefore), norm(after))
	}
	if listAfter := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).body; string(listAfter) != string(listBefore) {
		t.Fatalf("the stale writes changed the list:\nbefore %s\nafter  %s", listBefore, listAfter)
	}
	if got := roundTrip(t, dial(t, port), "kept"); got != "kept" {
		t.Fatalf("through the stream after the stale writes: %q", got)
	}
	if !refused(t, other) {
		t.Fatalf("port %d of the stale PUT listens", other)
	}

	// A restart keeps the current ETag, and the next write gets one never
	// seen before.
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := inst.load(app, nil); err != nil {
		t.Fatalf("starting again: %v", err)
	}
	if tag, _ := inst.etagOf(path); tag != current {
		t.Fatalf("after a restart: ETag %s, want %s as before", tag, current)
	}
	fresh("a write after the restart", inst.call("PUT", path, settings, hdr{"If-Match", current}).want(t, http.StatusOK).header.Get("ETag"))

	// Deleted and created again under the same id: a new ETag too.
	inst.call("DELETE", path, nil).want(t, http.StatusNoContent)
	again := inst.call("POST", "/api/v1/streams", stream(sid, port, up.Port, obj{"name": "toggled"})).want(t, http.StatusCreated)
	fresh("created again under the same id", again.header.Get("ETag"))
	for tag := range seen {
		if tag != again.header.Get("ETag") {
			inst.call("PUT", path, settings, hdr{"If-Match", tag}).apiErr(t, http.StatusPreconditionFailed)
		}
	}
}

// Behind Caddy's encode handler a compressed answer's ETag gets the
// encoding as a suffix ("2-gzip"): sent back in If-Match it still names
// the stream's version, and an old version still does not match.
func TestIfMatchBehindEncode(t *testing.T) {
	up := newServer(t, echo)
	inst := newInstance(t)
	site := freePort(t)
	if err := inst.caddy.LoadCaddyfile(inst.caddyfile(`http://127.0.0.1:%d {
	encode gzip
	streams_admin
}
`, site)); err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", site)
	// Long enough for encode to compress it.
	notes := strings.Repeat("padding ", 40)
	sid := id(doRequest(t, inst.client, "POST", base+"/api/v1/streams", stream(0, freePort(t), up.Port, obj{"notes": notes})).want(t, 201).obj(t))
	p := fmt.Sprintf("%s/api/v1/streams/%d", base, sid)
	tag := doRequest(t, inst.client, "GET", p, nil, hdr{"Accept-Encoding", "gzip"}).want(t, 200).header.Get("ETag")
	if !strings.HasSuffix(tag, `-gzip"`) {
		t.Fatalf("ETag %q: want a compressed answer's, ending in -gzip", tag)
	}
	doRequest(t, inst.client, "PATCH", p, `{"notes":"x"}`, ctMergePatch, hdr{"If-Match", tag}).want(t, 200)
	doRequest(t, inst.client, "PATCH", p, `{"notes":"y"}`, ctMergePatch, hdr{"If-Match", tag}).want(t, 412)
}
