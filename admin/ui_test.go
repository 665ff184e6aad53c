package admin_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/ui"
)

// uiTypes are the Content-Types the UI's files must be served with, by
// extension. A file of another kind fails the test until it is added.
var uiTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".svg":  "image/svg+xml",
}

// uiFiles returns the UI's embedded files by name, and "" for the index.
func uiFiles(t *testing.T) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := fs.WalkDir(ui.FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		out[name], err = fs.ReadFile(ui.FS(), name)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if out["index.html"] == nil || out["app.js"] == nil || out["style.css"] == nil {
		t.Fatalf("the UI lacks index.html, app.js or style.css: %d files", len(out))
	}
	out[""] = out["index.html"]
	return out
}

// checkUIHeaders checks the security headers of a UI response.
func checkUIHeaders(t *testing.T, r response) {
	t.Helper()
	for k, want := range map[string]string{
		"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "same-origin",
	} {
		if got := r.header.Get(k); got != want {
			t.Errorf("%s %s: %s %q, want %q", r.method, r.url, k, got, want)
		}
	}
}

// checkUIServed fetches the index and every file of the UI below prefix
// (a URL without the trailing slash) and checks bodies, types, headers,
// revalidation with the ETag, and HEAD.
func checkUIServed(t *testing.T, client *http.Client, prefix string) {
	t.Helper()
	for name, data := range uiFiles(t) {
		u := prefix + "/" + name
		wantType := uiTypes[path.Ext(name)]
		if name == "" {
			wantType = uiTypes[".html"]
		}
		if wantType == "" {
			t.Errorf("%s: no Content-Type known for this kind of file; add it to uiTypes and ui.contentTypes", name)
			continue
		}
		r := doRequest(t, client, "GET", u, nil).want(t, http.StatusOK)
		if !bytes.Equal(r.body, data) {
			t.Errorf("GET %s: %d bytes, not the embedded %d", u, len(r.body), len(data))
		}
		if ct := r.header.Get("Content-Type"); ct != wantType {
			t.Errorf("GET %s: Content-Type %q, want %q", u, ct, wantType)
		}
		checkUIHeaders(t, r)
		etag := r.header.Get("ETag")
		if r.header.Get("Cache-Control") != "no-cache" || !strings.HasPrefix(etag, `"`) {
			t.Errorf("GET %s: Cache-Control %q, ETag %q", u, r.header.Get("Cache-Control"), etag)
		}
		if r := doRequest(t, client, "GET", u, nil, hdr{"If-None-Match", etag}); r.code != http.StatusNotModified || len(r.body) != 0 {
			t.Errorf("GET %s with its ETag: %s, want 304 without a body", u, r)
		}
		r = doRequest(t, client, "HEAD", u, nil).want(t, http.StatusOK)
		if len(r.body) != 0 || r.header.Get("Content-Type") != wantType || r.header.Get("Content-Length") != fmt.Sprint(len(data)) {
			t.Errorf("HEAD %s: %d body bytes, Content-Type %q, Content-Length %q (want %d)",
				u, len(r.body), r.header.Get("Content-Type"), r.header.Get("Content-Length"), len(data))
		}
	}
}

// rawGet sends GET path to addr exactly as written (no client cleans or
// re-encodes it) with the Host header host.
func rawGet(t *testing.T, addr, path, host string) response {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, host); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading: %v", path, err)
	}
	return response{method: "GET", url: path, code: resp.StatusCode, header: resp.Header, body: body}
}

// escapes are paths that try to reach files outside ui/static, relative
// to a UI mount ("" or "/ui"), raw and percent-encoded.
var escapes = []string{
	"/../go.mod", "/%2e%2e/go.mod", "/%2E%2E/%2E%2E/go.mod", "/..%2fgo.mod", "/%2e%2e%2fgo.mod",
	"/..%5cgo.mod", "/....//go.mod", "//go.mod", "/../ui/ui.go", "/%2e%2e/ui/ui.go", "/static/index.html",
	"/./../admin/api.go", "/app.js/../../go.mod", "/go.mod", "/ui.go",
}

// checkNoEscape checks that no path in escapes, below mount, returns a
// file from outside the UI: each is refused, or handed to a next handler,
// which answers one of next (Caddy cleans a path first, so /admin/../x is
// the site root's); a redirect leads nowhere either.
func checkNoEscape(t *testing.T, addr, mount string, next ...string) {
	t.Helper()
	for _, p := range escapes {
		r := rawGet(t, addr, mount+p, addr)
		for hops := 0; r.code >= 300 && r.code < 400 && hops < 3; hops++ {
			loc := r.header.Get("Location")
			if !strings.HasPrefix(loc, "/") {
				t.Fatalf("GET %s: redirect to %q", mount+p, loc)
			}
			r = rawGet(t, addr, loc, addr)
		}
		leaked := bytes.Contains(r.body, []byte("module github.com/aegis-proxy")) || bytes.Contains(r.body, []byte("package "))
		if leaked || (r.code == http.StatusOK && !slices.Contains(next, string(r.body))) {
			t.Errorf("GET %s: %d %.80q, want it refused or passed on", mount+p, r.code, r.body)
		}
	}
}

// TestUIOnAdminEndpoint serves the UI at /ui/ on Caddy's admin endpoint,
// with the API below it where the UI calls it.
func TestUIOnAdminEndpoint(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := startCaddy(t, streamsApp(stream(1, freePort(t), up.Port, obj{"name": "cfg"})), nil)
	base := "http://" + inst.adminAddr()
	client := &http.Client{Timeout: 15 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	t.Cleanup(client.CloseIdleConnections)

	// /ui leads to /ui/, where relative links work.
	for from, to := range map[string]string{"/ui": "/ui/", "/ui?x=1": "/ui/?x=1"} {
		r := doRequest(t, client, "GET", base+from, nil)
		if r.code != http.StatusMovedPermanently || r.header.Get("Location") != to {
			t.Errorf("GET %s: %d, Location %q, want 301 to %s", from, r.code, r.header.Get("Location"), to)
		}
	}
	checkUIServed(t, client, base+"/ui")

	// The admin endpoint's Host check lets the loopback names in.
	for _, host := range []string{inst.adminAddr(), fmt.Sprintf("localhost:%d", inst.adminPort)} {
		if r := rawGet(t, inst.adminAddr(), "/ui/", host); r.code != http.StatusOK || !bytes.Contains(r.body, []byte(`src="app.js"`)) {
			t.Errorf("GET /ui/ with Host %s: %s", host, r)
		}
	}
	// A browser's own requests from the UI: Caddy refuses one with
	// Sec-Fetch-Mode that names its origin in neither Origin nor Referer,
	// so the UI's Referrer-Policy sends the Referer to its own origin.
	browser := []hdr{{"Sec-Fetch-Mode", "cors"}, {"Sec-Fetch-Site", "same-origin"}, {"Referer", base + "/ui/"}}
	doRequest(t, client, "GET", base+"/ui/app.js", nil, browser...).want(t, http.StatusOK)
	doRequest(t, client, "GET", base+"/ui/api/v1/streams", nil, browser...).want(t, http.StatusOK)
	doRequest(t, client, "GET", base+"/ui/app.js", nil, hdr{"Sec-Fetch-Mode", "cors"}).apiErr(t, http.StatusForbidden)

	// The API below /ui/, as the UI calls it, and at its own path.
	l := doRequest(t, client, "GET", base+"/ui/api/v1/streams", nil).want(t, http.StatusOK).list(t)
	if len(l) != 1 || l[0]["name"] != "cfg" || l[0]["source"] != "config" {
		t.Fatalf("GET /ui/api/v1/streams: %v", l)
	}
	p := freePort(t)
	r := doRequest(t, client, "POST", base+"/ui/api/v1/streams", stream(0, p, up.Port, nil), hdr{"Origin", base}).want(t, http.StatusCreated)
	sid := id(r.obj(t))
	if loc := r.header.Get("Location"); loc != fmt.Sprintf("/ui/api/v1/streams/%d", sid) {
		t.Errorf("Location %q", loc)
	}
	doRequest(t, client, "GET", fmt.Sprintf("%s/api/v1/streams/%d", base, sid), nil).want(t, http.StatusOK)
	if got := roundTrip(t, dial(t, p), "via-ui-path"); got != "via-ui-path" {
		t.Fatalf("through the stream created below /ui/: %q", got)
	}
	doRequest(t, client, "DELETE", fmt.Sprintf("%s/ui/api/v1/streams/%d", base, sid), nil).want(t, http.StatusNoContent)
	doRequest(t, client, "GET", base+"/ui/api/v1/nope", nil).want(t, http.StatusNotFound)

	// Only GET and HEAD; only the UI's files.
	for _, m := range []string{"POST", "PUT", "DELETE"} {
		r := doRequest(t, client, m, base+"/ui/app.js", "x", ctJSON)
		if r.code != http.StatusMethodNotAllowed || r.header.Get("Allow") != "GET, HEAD" {
			t.Errorf("%s /ui/app.js: %s, Allow %q", m, r, r.header.Get("Allow"))
		}
	}
	for _, p := range []string{"/ui/nope.js", "/ui/index.html/", "/ui/static/app.js", "/ui/App.js", "/ui/api/"} {
		r := doRequest(t, client, "GET", base+p, nil)
		if r.code != http.StatusNotFound {
			t.Errorf("GET %s: %s, want 404", p, r)
		}
		checkUIHeaders(t, r)
	}
	checkNoEscape(t, inst.adminAddr(), "/ui")
}

// TestUIOnSite serves the UI from the streams_admin handler at a site's
// root and under handle_path, next to the API; everything else goes on
// to the next handler.
func TestUIOnSite(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := newInstance(t)
	site := freePort(t)
	cf := inst.caddyfile(`http://127.0.0.1:%d {
	handle_path /admin/* {
		streams_admin
		respond "admin-next"
	}
	handle_path /api-only/* {
		streams_admin {
			ui off
		}
		respond "api-only-next"
	}
	handle {
		streams_admin
		respond "site-next"
	}
}
`, site)
	if err := inst.caddy.LoadCaddyfile(cf); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", site)
	base := "http://" + addr
	checkUIServed(t, inst.client, base)
	checkUIServed(t, inst.client, base+"/admin")

	// The API at the same mounts.
	for _, mount := range []string{"", "/admin"} {
		p := freePort(t)
		r := doRequest(t, inst.client, "POST", base+mount+"/api/v1/streams", stream(0, p, up.Port, nil), hdr{"Origin", base}).want(t, http.StatusCreated)
		if loc := r.header.Get("Location"); loc != fmt.Sprintf("%s/api/v1/streams/%d", mount, id(r.obj(t))) {
			t.Errorf("Location %q", loc)
		}
		if got := roundTrip(t, dial(t, p), "via-site"); got != "via-site" {
			t.Fatalf("through the stream created at %q: %q", mount, got)
		}
		if l := doRequest(t, inst.client, "GET", base+mount+"/api/v1/streams", nil).want(t, http.StatusOK).list(t); len(l) == 0 {
			t.Errorf("GET %s/api/v1/streams: empty", mount)
		}
	}

	// What is neither the UI nor the API goes on.
	for _, tc := range []struct{ method, path, want string }{
		{"GET", "/other", "site-next"},
		{"GET", "/ui/", "site-next"},
		{"GET", "/index.htm", "site-next"},
		{"GET", "/app.js.map", "site-next"},
		{"GET", "/api/v1", "site-next"},
		{"POST", "/", "site-next"},
		{"PUT", "/app.js", "site-next"},
		{"DELETE", "/style.css", "site-next"},
		{"GET", "/admin/other", "admin-next"},
		{"POST", "/admin/", "admin-next"},
		{"GET", "/admin", "site-next"},
		// ui off: the UI's paths go on, the API stays.
		{"GET", "/api-only/", "api-only-next"},
		{"GET", "/api-only/app.js", "api-only-next"},
		{"GET", "/api-only/api/v1/streams/stats", "<json>"},
	} {
		if tc.want == "<json>" {
			if r := doRequest(t, inst.client, tc.method, base+tc.path, nil); r.code != http.StatusOK || !strings.HasPrefix(string(r.body), "[") {
				t.Errorf("%s %s: %s, want the API's JSON list", tc.method, tc.path, r)
			}
			continue
		}
		r := doRequest(t, inst.client, tc.method, base+tc.path, nil)
		if r.code != http.StatusOK || string(r.body) != tc.want {
			t.Errorf("%s %s: %s, want %q", tc.method, tc.path, r, tc.want)
		}
	}
	checkNoEscape(t, addr, "", "site-next", "admin-next")
	checkNoEscape(t, addr, "/admin", "site-next", "admin-next")
}
