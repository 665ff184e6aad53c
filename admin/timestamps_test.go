package admin_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// apiTimestamp is the one timestamp format of the API: RFC 3339, UTC,
// milliseconds.
var apiTimestamp = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$`)

// looksLikeTime is any string that starts as an RFC 3339 time does.
var looksLikeTime = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}T`)

// timestampKeys are the keys whose values are times.
var timestampKeys = []string{"created_at", "updated_at", "started_at", "ended_at", "last_health_check", "not_before", "not_after"}

// checkTimestamps fails the test for each time in the JSON body r that is
// not in the API's format, and counts the non-null times per key in seen.
func checkTimestamps(t *testing.T, r response, seen map[string]int) {
	t.Helper()
	var v any
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("%s: %v", r, err)
	}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, e := range x {
				if slices.Contains(timestampKeys, k) || strings.HasSuffix(k, "_at") {
					if e == nil {
						continue
					}
					if s, ok := e.(string); !ok || !apiTimestamp.MatchString(s) {
						t.Errorf("%s %s: %s.%s = %v, want RFC 3339 in UTC with milliseconds", r.method, r.url, path, k, e)
					}
					seen[k]++
					continue
				}
				walk(path+"."+k, e)
			}
		case []any:
			for i, e := range x {
				walk(fmt.Sprintf("%s[%d]", path, i), e)
			}
		case string:
			if looksLikeTime.MatchString(x) && !apiTimestamp.MatchString(x) {
				t.Errorf("%s %s: %s = %q, a time in another format", r.method, r.url, path, x)
			}
		}
	}
	walk("", v)
}

// TestTimestamps: every time in the answers of every route that has one
// is RFC 3339 in UTC with milliseconds: the streams' created_at,
// updated_at and last_health_check, the connection log's and the open
// connections' times, and the certificates'.
func TestTimestamps(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	cfgPort, port := freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(stream(1, cfgPort, up.Port, obj{"health_check_enabled": true, "health_check_interval_seconds": 1})), nil)
	seen := map[string]int{}
	check := func(r response) response {
		t.Helper()
		checkTimestamps(t, r, seen)
		return r
	}

	created := check(inst.call("POST", "/api/v1/streams", stream(0, port, up.Port, obj{"health_check_enabled": true, "health_check_interval_seconds": 1})).want(t, http.StatusCreated))
	path := fmt.Sprintf("/api/v1/streams/%d", id(created.obj(t)))
	check(inst.call("PUT", path, stream(0, port, up.Port, obj{"health_check_enabled": true, "health_check_interval_seconds": 1, "name": "put"})).want(t, http.StatusOK))
	check(inst.call("PATCH", path, `{"notes": "patched"}`, ctMergePatch).want(t, http.StatusOK))

	// A health check has run; a connection is open; one has ended and is
	// in the connection log.
	eventually(t, "a health check of the API stream", func() bool {
		st := inst.call("GET", path, nil).want(t, http.StatusOK).obj(t)["status"].(obj)
		return st["last_health_check"] != nil
	})
	open := dial(t, port)
	if got := roundTrip(t, open, "open"); got != "open" {
		t.Fatalf("through the stream: %q", got)
	}
	done := dial(t, port)
	if got := roundTrip(t, done, "done"); got != "done" {
		t.Fatalf("through the stream: %q", got)
	}
	done.Close()
	eventually(t, "a connection-log entry", func() bool {
		return len(inst.connLog(id(created.obj(t)), "").Entries) > 0
	})

	ca := newCA(t)
	cert := check(inst.call("POST", "/api/v1/certificates", ca.valid(t).upload("ts")).want(t, http.StatusCreated))
	certPath := fmt.Sprintf("/api/v1/certificates/%d", id(cert.obj(t)))
	check(inst.call("PUT", certPath, ca.valid(t).upload("ts2")).want(t, http.StatusOK))

	for _, p := range []string{
		"/api/v1/streams", path, "/api/v1/streams/1", "/api/v1/streams/stats",
		path + "/connections", path + "/active", "/api/v1/certificates", certPath,
	} {
		check(inst.call("GET", p, nil).want(t, http.StatusOK))
	}
	for _, k := range timestampKeys {
		if seen[k] == 0 {
			t.Errorf("no answer had a %s to check", k)
		}
	}
}
