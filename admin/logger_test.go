package admin_test

import (
	"net/http"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// The API on the admin endpoint logs as admin.api.streams, not on Caddy's
// root logger.
func TestAdminAPILoggerName(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	inst.call("GET", "/api/v1/streams/999", nil).want(t, http.StatusNotFound)
	type line struct {
		Logger string `json:"logger"`
		Msg    string `json:"msg"`
		Path   string `json:"path"`
	}
	var got []line
	eventually(t, "the API's log line of the refused request", func() bool {
		got = testenv.LogLines(t, inst.logFile, func(l line) bool {
			return l.Msg == "streams API request refused" && l.Path == "/api/v1/streams/999"
		})
		return len(got) > 0
	})
	if got[0].Logger != "admin.api.streams" {
		t.Fatalf("logged by %q, want admin.api.streams", got[0].Logger)
	}
}
