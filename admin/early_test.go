package admin

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// Caddy hands an HTTP/3 request that came as 0-RTT early data on before
// the TLS handshake is complete: a write in that state answers 425 Too
// Early before anything else looks at it, a read is served (RFC 8470).
// (The end-to-end test, TestEarlyDataWritesTooEarly, uses the Early-Data
// header, as no client here sends real 0-RTT.)
func TestTooEarlyBeforeHandshake(t *testing.T) {
	a := &api{logger: zap.NewNop()}
	for _, tc := range []struct {
		method   string
		complete bool
		want     int
	}{
		{"POST", false, http.StatusTooEarly},
		{"PUT", false, http.StatusTooEarly},
		{"PATCH", false, http.StatusTooEarly},
		{"DELETE", false, http.StatusTooEarly},
		{"POST", true, http.StatusServiceUnavailable}, // no streams app runs here
	} {
		r := httptest.NewRequest(tc.method, "https://127.0.0.1/api/v1/streams/1", strings.NewReader(`{}`))
		if tc.method == "POST" {
			r.URL.Path = "/api/v1/streams"
		}
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Origin", "https://127.0.0.1")
		r.TLS = &tls.ConnectionState{HandshakeComplete: tc.complete}
		w := httptest.NewRecorder()
		a.serve(w, r, "")
		if w.Code != tc.want {
			t.Errorf("%s, handshake complete %v: %d %s, want %d", tc.method, tc.complete, w.Code, w.Body, tc.want)
		}
	}
}
