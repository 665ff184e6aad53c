package admin_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// TestWriteWarnings: the answers of POST, PUT and PATCH carry the
// warnings about the stream's settings that Caddy logs, as an array that
// is empty when there are none; GET answers as before.
func TestWriteWarnings(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port, udpPort := freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	warnings := func(r response) []string {
		t.Helper()
		var body struct {
			Warnings *[]string `json:"warnings"`
			ID       int64     `json:"id"`
			Status   obj       `json:"status"`
			Version  string    `json:"version"`
		}
		r.decode(t, &body)
		if body.Warnings == nil || body.ID == 0 || body.Status == nil || body.Version == "" {
			t.Fatalf("%s: want the stream with a warnings array", r)
		}
		return *body.Warnings
	}
	has := func(what string, got []string, want ...string) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: warnings %q, want %d containing %q", what, got, len(want), want)
		}
		for i, w := range want {
			if !strings.Contains(got[i], w) {
				t.Fatalf("%s: warning %q, want it to contain %q", what, got[i], w)
			}
		}
	}

	// None: an empty array.
	r := inst.call("POST", "/api/v1/streams", stream(0, port, up.Port, nil)).want(t, http.StatusCreated)
	has("a plain stream", warnings(r))
	path := fmt.Sprintf("/api/v1/streams/%d", id(r.obj(t)))

	// Health checks on a UDP stream.
	r = inst.call("POST", "/api/v1/streams", stream(0, udpPort, up.Port, obj{"protocol": "udp", "health_check_enabled": true})).want(t, http.StatusCreated)
	has("udp with health checks", warnings(r), "health_check_enabled: health checks are TCP dials")

	// A privileged, well-known port, on a disabled stream (which binds
	// nothing): PUT and PATCH warn too.
	r = inst.call("PUT", path, stream(0, 22, up.Port, obj{"enabled": false})).want(t, http.StatusOK)
	has("PUT onto port 22", warnings(r), "listen_port 22: a privileged port", "listen_port 22: the well-known port of SSH")
	r = inst.call("PATCH", path, `{"listen_port": 6379}`, ctMergePatch).want(t, http.StatusOK)
	has("PATCH onto port 6379", warnings(r), "listen_port 6379: the well-known port of Redis")
	r = inst.call("PATCH", path, fmt.Sprintf(`{"listen_port": %d, "enabled": true}`, port), ctMergePatch).want(t, http.StatusOK)
	has("PATCH back", warnings(r))

	// What a write answered, warnings and all, can be sent back.
	back := inst.call("PUT", path, stream(0, 22, up.Port, obj{"enabled": false})).want(t, http.StatusOK).obj(t)
	back["listen_port"] = port
	inst.call("PUT", path, back).want(t, http.StatusOK)
	back["notes"] = "sent back"
	inst.call("PATCH", path, back, ctMergePatch).want(t, http.StatusOK)

	// GET is the stream alone.
	if got := inst.call("GET", path, nil).want(t, http.StatusOK).obj(t); got["warnings"] != nil {
		t.Fatalf("GET has warnings: %v", got)
	}
}
