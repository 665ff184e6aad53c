package admin_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/storage"
)

// TestTextLimits: name is at most 200 characters and notes 10,000,
// counted as characters, not bytes. A longer one is a 400 that names the
// field, the length and the limit, and changes nothing; the Caddy config
// is held to the same limits. A stream stored before the limits runs on.
func TestTextLimits(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port, oldPort, cfgPort := freePort(t), freePort(t), freePort(t)
	inst := newInstance(t)

	// A stream stored before the limits existed, with long notes.
	db, err := storage.Open(inst.dbFile)
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 20000)
	if _, err := db.CreateHost(context.Background(), storage.Host{ID: 7, Name: "old", ListenAddress: "127.0.0.1", ListenPort: oldPort,
		UpstreamHost: "127.0.0.1", UpstreamPort: up.Port, Enabled: true, Notes: long}, nil); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := inst.load(streamsApp(), nil); err != nil {
		t.Fatalf("starting with a stored stream over the limits: %v", err)
	}
	if got := roundTrip(t, dial(t, oldPort), "old"); got != "old" {
		t.Fatalf("through the stream stored before the limits: %q", got)
	}

	// At the limits, in characters of two bytes each: accepted.
	name, notes := strings.Repeat("ü", 200), strings.Repeat("é", 10000)
	created := inst.create(stream(0, port, up.Port, obj{"name": name, "notes": notes}))
	if created["name"] != name || created["notes"] != notes {
		t.Fatalf("name and notes at the limits came back changed")
	}
	path := fmt.Sprintf("/api/v1/streams/%d", id(created))
	rowBefore := inst.storedHosts()

	for _, tc := range []struct {
		name, method, path string
		body               any
		field, message     string
	}{
		{"name over the limit", "POST", "/api/v1/streams", stream(0, freePort(t), up.Port, obj{"name": name + "ü"}),
			"name", "name: 201 characters, more than the limit of 200; shorten it"},
		{"notes over the limit", "POST", "/api/v1/streams", stream(0, freePort(t), up.Port, obj{"notes": notes + "é"}),
			"notes", "notes: 10001 characters, more than the limit of 10000; shorten it"},
		{"notes over the limit by PUT", "PUT", path, stream(0, port, up.Port, obj{"notes": notes + "."}),
			"notes", "notes: 10001 characters"},
		{"name over the limit by PATCH", "PATCH", path, `{"name": "` + strings.Repeat("n", 900) + `"}`,
			"name", "name: 900 characters, more than the limit of 200"},
		{"a change to a stream stored over the limits", "PATCH", "/api/v1/streams/7", `{"enabled": false}`,
			"notes", `stream 7 ("old"): notes: 20000 characters, more than the limit of 10000; shorten it`},
	} {
		var headers []hdr
		if tc.method == "PATCH" {
			headers = []hdr{ctMergePatch}
		}
		r := inst.call(tc.method, tc.path, tc.body, headers...)
		e := r.apiErr(t, http.StatusBadRequest)
		if e.Field != tc.field || e.Value != nil || len(e.Errors) != 1 || !strings.Contains(e.Error, tc.message) {
			t.Errorf("%s: %s, want a 400 on %s saying %q", tc.name, r, tc.field, tc.message)
		}
		if len(e.Error) > 400 {
			t.Errorf("%s: a message of %d bytes: %.200s…", tc.name, len(e.Error), e.Error)
		}
	}
	if rowAfter := inst.storedHosts(); norm(rowAfter) != norm(rowBefore) {
		t.Errorf("the refused writes changed the database")
	}
	// Shortening the notes of the old stream lets the change through.
	inst.call("PATCH", "/api/v1/streams/7", `{"enabled": false, "notes": "short"}`, ctMergePatch).want(t, http.StatusOK)

	// The Caddy config: the same limit, the same words.
	err = inst.load(streamsApp(stream(1, cfgPort, up.Port, obj{"notes": long})), nil)
	if err == nil || !strings.Contains(err.Error(), "notes: 20000 characters, more than the limit of 10000") {
		t.Fatalf("a config stream with long notes: %v", err)
	}
}
