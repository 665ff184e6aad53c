package admin_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/aegis-proxy/caddy-aegis/admin"
)

// adapt turns a Caddyfile into JSON.
func adapt(t *testing.T, src string) ([]byte, error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	return out, err
}

// TestHTTPHandler serves the API from a Caddy site with the streams_admin
// directive: under handle_path (a stripped prefix), in a route, and ordered
// with the order option.
func TestHTTPHandler(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := newInstance(t)
	site, ordered := freePort(t), freePort(t)
	cf := inst.caddyfile(`http://127.0.0.1:%d {
	handle_path /admin/* {
		streams_admin {
			allowed_origins https://ui.example.com
		}
	}
	route /api/v1/streams* {
		streams_admin
	}
	respond "site"
}

http://127.0.0.1:%d {
	streams_admin
	respond "other"
}
`, site, ordered)
	if err := inst.caddy.LoadCaddyfile(cf); err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", site)
	get := func(url string, headers ...hdr) response {
		return doRequest(t, inst.client, "GET", url, nil, headers...)
	}
	post := func(url string, body any, headers ...hdr) response {
		return doRequest(t, inst.client, "POST", url, body, headers...)
	}

	// Reads through the stripped prefix and the route.
	for _, u := range []string{base + "/admin/api/v1/streams", base + "/api/v1/streams", fmt.Sprintf("http://127.0.0.1:%d/api/v1/streams", ordered)} {
		if l := get(u).want(t, 200).list(t); len(l) != 0 {
			t.Fatalf("GET %s: %v", u, l)
		}
	}
	// Other paths go on to the site's next handler.
	for u, want := range map[string]string{
		base + "/":                "site",
		base + "/api/v1/streamsX": "site",
		fmt.Sprintf("http://127.0.0.1:%d/other", ordered):     "other",
		fmt.Sprintf("http://127.0.0.1:%d/api/v1", ordered):    "other",
		fmt.Sprintf("http://127.0.0.1:%d/api/v1/st", ordered): "other",
	} {
		if r := get(u).want(t, 200); string(r.body) != want {
			t.Errorf("GET %s: %q, want %q", u, r.body, want)
		}
	}
	get(base+"/admin/api/v1/streams/999").apiErr(t, 404)

	// Create through the stripped prefix: the Location keeps the prefix,
	// and the stream relays.
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	r := post(base+"/admin/api/v1/streams", stream(0, p1, up.Port, nil)).want(t, http.StatusCreated)
	sid := id(r.obj(t))
	if loc := r.header.Get("Location"); loc != fmt.Sprintf("/admin/api/v1/streams/%d", sid) {
		t.Fatalf("Location %q", loc)
	}
	get(base+r.header.Get("Location")).want(t, 200)
	if got := roundTrip(t, dial(t, p1), "via-http"); got != "via-http" {
		t.Fatalf("through the stream created over HTTP: %q", got)
	}
	r = post(base+"/api/v1/streams", stream(0, p2, up.Port, nil), hdr{"Origin", base}).want(t, http.StatusCreated)
	if loc := r.header.Get("Location"); loc != fmt.Sprintf("/api/v1/streams/%d", id(r.obj(t))) {
		t.Fatalf("Location %q", loc)
	}

	// Origins: allowed_origins lets a listed one in where it is set, with
	// the answers to a browser's CORS checks: its preflight, then the
	// headers that let the page read the answer.
	pre := doRequest(t, inst.client, "OPTIONS", base+"/admin/api/v1/streams", nil, hdr{"Origin", "https://ui.example.com"},
		hdr{"Access-Control-Request-Method", "POST"}, hdr{"Access-Control-Request-Headers", "content-type"}).want(t, http.StatusNoContent)
	if h := pre.header; h.Get("Access-Control-Allow-Origin") != "https://ui.example.com" || !strings.Contains(h.Get("Access-Control-Allow-Methods"), "POST") ||
		!strings.Contains(h.Get("Access-Control-Allow-Headers"), "Content-Type") || h.Get("Access-Control-Allow-Credentials") != "true" {
		t.Errorf("preflight of a listed origin: %v", h)
	}
	for _, origin := range []string{"https://evil.example", base} {
		r := doRequest(t, inst.client, "OPTIONS", base+"/admin/api/v1/streams", nil, hdr{"Origin", origin}, hdr{"Access-Control-Request-Method", "POST"})
		if got := r.header.Get("Access-Control-Allow-Origin"); got != "" {
			t.Errorf("preflight from %s: Access-Control-Allow-Origin %q, want none", origin, got)
		}
	}
	if h := get(base+"/admin/api/v1/streams/x", hdr{"Origin", "https://ui.example.com"}).want(t, http.StatusNotFound).header; h.Get("Access-Control-Allow-Origin") != "https://ui.example.com" {
		t.Errorf("a listed origin's 404 cannot be read: %v", h)
	}
	r = post(base+"/admin/api/v1/streams", stream(0, p3, up.Port, nil), hdr{"Origin", "https://ui.example.com"}).want(t, http.StatusCreated)
	if h := r.header; h.Get("Access-Control-Allow-Origin") != "https://ui.example.com" || !strings.Contains(h.Get("Access-Control-Expose-Headers"), "ETag") {
		t.Errorf("a listed origin's POST: %v", h)
	}
	e := post(base+"/api/v1/streams", stream(0, freePort(t), up.Port, nil), hdr{"Origin", "https://ui.example.com"}).apiErr(t, http.StatusForbidden)
	if !strings.Contains(e.Error, "https://ui.example.com") || !strings.Contains(e.Error, "allowed_origins") {
		t.Errorf("foreign origin: %q", e.Error)
	}
	post(base+"/admin/api/v1/streams", stream(0, freePort(t), up.Port, nil), hdr{"Origin", "https://evil.example"}).apiErr(t, http.StatusForbidden)
	post(base+"/admin/api/v1/streams", stream(0, freePort(t), up.Port, nil), hdr{"Origin", "null"}).apiErr(t, http.StatusForbidden)
	post(base+"/admin/api/v1/streams", stream(0, freePort(t), up.Port, nil), hdr{"Origin", fmt.Sprintf("http://127.0.0.1:%d", ordered)}).apiErr(t, http.StatusForbidden)
	post(base+"/admin/api/v1/streams", stream(0, freePort(t), up.Port, nil), hdr{"Content-Type", "text/plain"}).apiErr(t, http.StatusUnsupportedMediaType)

	// The site's port is Caddy's own: no stream may take it.
	e = post(base+"/api/v1/streams", stream(0, site, up.Port, nil)).apiErr(t, http.StatusBadRequest)
	if e.Field != "listen_port" || norm(e.Value) != norm(site) {
		t.Errorf("a stream on the site's port: %+v", e)
	}

	// The same streams on every endpoint, the admin endpoint's included.
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t); len(l) != 3 {
		t.Fatalf("admin endpoint lists %d streams, want 3", len(l))
	}
	// PATCH through the stripped prefix: a merge patch toggles the stream.
	patchURL := fmt.Sprintf("%s/admin/api/v1/streams/%d", base, sid)
	if got := doRequest(t, inst.client, "PATCH", patchURL, `{"enabled": false}`, ctMergePatch).want(t, http.StatusOK).obj(t); got["enabled"] != false || !refused(t, p1) {
		t.Fatalf("PATCH enabled false over HTTP: %v", got)
	}
	doRequest(t, inst.client, "PATCH", patchURL, `{"enabled": true}`, ctMergePatch, hdr{"Origin", "https://evil.example"}).apiErr(t, http.StatusForbidden)
	doRequest(t, inst.client, "PATCH", patchURL, `{"enabled": true}`, ctMergePatch, hdr{"Origin", "https://ui.example.com"}).want(t, http.StatusOK)
	if got := roundTrip(t, dial(t, p1), "on-again"); got != "on-again" {
		t.Fatalf("through the stream enabled again by PATCH over HTTP: %q", got)
	}
	doRequest(t, inst.client, "DELETE", fmt.Sprintf("%s/admin/api/v1/streams/%d", base, sid), nil).want(t, http.StatusNoContent)
	if !refused(t, p1) {
		t.Fatalf("port %d listens after DELETE", p1)
	}
}

// TestCaddyfile checks the streams_admin directive's syntax and the
// handler's options.
func TestCaddyfile(t *testing.T) {
	for i, tc := range []struct {
		input   string
		origins []string
		noUI    bool
		err     string
	}{
		{input: `streams_admin`},
		{input: "streams_admin {\n}"},
		{input: "streams_admin {\n allowed_origins https://a.example http://localhost:3000\n}", origins: []string{"https://a.example", "http://localhost:3000"}},
		{input: `streams_admin extra`, err: "wrong argument count"},
		{input: "streams_admin {\n allowed_origins\n}", err: "wrong argument count"},
		{input: "streams_admin {\n allowed_origins a\n allowed_origins b\n}", err: "duplicate"},
		{input: "streams_admin {\n origins a\n}", err: "unknown option 'origins'"},
		{input: "streams_admin {\n allowed_origins a {\n x\n }\n}", err: "no block"},
		{input: "streams_admin {\n ui off\n}", noUI: true},
		{input: "streams_admin {\n ui on\n}", err: "ui takes one word, off"},
		{input: "streams_admin {\n ui\n}", err: "ui takes one word, off"},
		{input: "streams_admin {\n ui off off\n}", err: "ui takes one word, off"},
	} {
		var h admin.Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%d: %q: error %v, want one containing %q", i, tc.input, err, tc.err)
			}
			continue
		}
		if err != nil || strings.Join(h.AllowedOrigins, " ") != strings.Join(tc.origins, " ") || h.NoUI != tc.noUI {
			t.Errorf("%d: %q: %v, no_ui %v, %v", i, tc.input, h.AllowedOrigins, h.NoUI, err)
		}
	}

	// The adapted JSON: the handler with its options, where the directive
	// was.
	out, err := adapt(t, ":8080 {\n\troute {\n\t\tstreams_admin /api/* {\n\t\t\tallowed_origins https://ui.example\n\t\t}\n\t}\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `{"allowed_origins":["https://ui.example"],"handler":"streams_admin"}`) ||
		!strings.Contains(string(out), `"path":["/api/*"]`) {
		t.Errorf("adapted: %s", out)
	}
	// Without an order or a route, the Caddyfile adapter refuses it.
	if _, err := adapt(t, ":8080 {\n\tstreams_admin\n}\n"); err == nil || !strings.Contains(err.Error(), "not an ordered") {
		t.Errorf("streams_admin without an order: %v", err)
	}

	// Origins are checked when the handler is provisioned.
	for _, bad := range []string{"ftp://a.example", "https://a.example/path", "a.example", "https://"} {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
		h := admin.Handler{AllowedOrigins: []string{bad}}
		err := h.Provision(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "allowed_origins") {
			t.Errorf("allowed_origins %q: %v", bad, err)
		}
	}
	var h admin.Handler
	if err := json.Unmarshal([]byte(`{"allowed_origins": ["HTTPS://UI.Example:443"]}`), &h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: t.Context()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("a valid origin: %v", err)
	}
}
