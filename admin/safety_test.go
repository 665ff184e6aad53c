package admin_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// safetySites is a Caddyfile site on port site with the API under
// /api/v1/streams* through streams_admin.
const safetySites = `http://127.0.0.1:%d {
	route /api/v1/* {
		streams_admin
	}
	respond "site"
}
`

// safetySetup starts an instance with the safetySites config on a free
// site port and one stream to an echo upstream, for the tests that check
// refused writes change nothing.
func safetySetup(t *testing.T) (inst *instance, up *loopback.Server, site int, sid int64) {
	t.Helper()
	checkNoLeaks(t)
	up = newServer(t, echo)
	inst = newInstance(t)
	site = freePort(t)
	if err := inst.caddy.LoadCaddyfile(inst.caddyfile(safetySites, site)); err != nil {
		t.Fatal(err)
	}
	return inst, up, site, id(inst.create(stream(0, freePort(t), up.Port, nil)))
}

// writes are one request of each state-changing kind against stream sid.
func writes(t *testing.T, sid int64, upPort int) []struct {
	method, path string
	body         any
	headers      []hdr
} {
	return []struct {
		method, path string
		body         any
		headers      []hdr
	}{
		{"POST", "/api/v1/streams", stream(0, freePort(t), upPort, nil), nil},
		{"PUT", fmt.Sprintf("/api/v1/streams/%d", sid), stream(sid, freePort(t), upPort, nil), nil},
		{"PATCH", fmt.Sprintf("/api/v1/streams/%d", sid), `{"enabled": false}`, []hdr{ctMergePatch}},
		{"DELETE", fmt.Sprintf("/api/v1/streams/%d", sid), nil, nil},
		{"POST", "/api/v1/certificates", obj{"name": "c", "domains": []string{"a.example"}}, nil},
		{"DELETE", "/api/v1/certificates/1", nil, nil},
	}
}

// The origin check compares scheme, host and port: a page of
// https://127.0.0.1:P is another origin than http://127.0.0.1:P and may
// not change streams on either the admin endpoint or a streams_admin site;
// nor may any other origin, by any write method (issue 22).
func TestCrossOriginWritesChangeNothing(t *testing.T) {
	inst, up, site, sid := safetySetup(t)
	before := inst.streamsNow(t)

	for _, ep := range []struct {
		name, base string
		port       int
	}{
		{"admin endpoint", "http://" + inst.adminAddr(), inst.adminPort},
		{"streams_admin", fmt.Sprintf("http://127.0.0.1:%d", site), site},
	} {
		foreign := []hdr{
			{"Origin", fmt.Sprintf("https://127.0.0.1:%d", ep.port)}, // same host and port, other scheme
			{"Origin", fmt.Sprintf("https://localhost:%d", ep.port)},
			{"Origin", fmt.Sprintf("http://127.0.0.1:%d", ep.port+1)},
			{"Origin", fmt.Sprintf("http://127.0.0.2:%d", ep.port)},
			{"Origin", "http://127.0.0.1"},
			{"Origin", "https://evil.example"},
			{"Origin", "null"},
			{"Origin", "file://"},
			{"Origin", fmt.Sprintf("http://user@127.0.0.1:%d", ep.port)},
			{"Sec-Fetch-Site", "cross-site"},
			{"Sec-Fetch-Site", "same-site"},
		}
		for _, w := range writes(t, sid, up.Port) {
			for _, h := range foreign {
				r := doRequest(t, inst.client, w.method, ep.base+w.path, w.body, append([]hdr{h}, w.headers...)...)
				// 403 from the API; Caddy's admin endpoint refuses
				// "Origin: null" itself with a 400.
				if r.code != http.StatusForbidden && (r.code != http.StatusBadRequest || h.value != "null") {
					t.Errorf("%s: %s %s with %s: %s", ep.name, w.method, w.path, h, r)
				}
			}
			// A form or a no-cors fetch cannot send JSON: 415 for the
			// methods with a body.
			if w.method != "DELETE" {
				r := doRequest(t, inst.client, w.method, ep.base+w.path, w.body, hdr{"Content-Type", "text/plain"})
				if r.code != http.StatusUnsupportedMediaType {
					t.Errorf("%s: %s %s as text/plain: %s", ep.name, w.method, w.path, r)
				}
			}
		}
		// The endpoint's own origin still may.
		r := doRequest(t, inst.client, "POST", ep.base+"/api/v1/streams/validate-port", obj{"listen_port": freePort(t)}, hdr{"Origin", fmt.Sprintf("http://127.0.0.1:%d", ep.port)})
		r.want(t, http.StatusOK)
	}
	inst.streamsUnchanged(t, before, "by refused requests")
}

// A write that arrives as TLS early data (0-RTT), or that a proxy in
// front marks so (Early-Data: 1), answers 425 Too Early and changes
// nothing (RFC 8470); reads are answered.
func TestEarlyDataWritesTooEarly(t *testing.T) {
	inst, up, site, sid := safetySetup(t)
	before := inst.streamsNow(t)
	early := hdr{"Early-Data", "1"}
	for _, base := range []string{"http://" + inst.adminAddr(), fmt.Sprintf("http://127.0.0.1:%d", site)} {
		for _, w := range writes(t, sid, up.Port) {
			e := doRequest(t, inst.client, w.method, base+w.path, w.body, append([]hdr{early}, w.headers...)...).apiErr(t, http.StatusTooEarly)
			if !strings.Contains(e.Error, "early data") {
				t.Errorf("%s %s%s: %q", w.method, base, w.path, e.Error)
			}
		}
		doRequest(t, inst.client, "GET", base+"/api/v1/streams", nil, early).want(t, http.StatusOK)
	}
	inst.streamsUnchanged(t, before, "by early-data writes")
}

// A name with a control or format character is refused naming the field
// and the code point, and the character is not echoed raw (issue 22).
func TestNameControlCharacterRefused(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	for _, name := range []string{"db\u202ecod.exe", "db\u2028INFO fake line", "a\u0000b", "x\u200bx"} {
		r := inst.call("POST", "/api/v1/streams", stream(0, freePort(t), 9, obj{"name": name}))
		e := r.apiErr(t, http.StatusBadRequest)
		cp := fmt.Sprintf("%U", []rune(strings.TrimLeft(name, "abdx"))[0])
		if e.Field != "name" || !strings.Contains(e.Error, "name: has "+cp) {
			t.Errorf("name %q: %+v, want an error on name with %s", name, e, cp)
		}
		for _, raw := range []string{"\u202e", "\u2028", "\u200b"} {
			if bytes.Contains(r.body, []byte(raw)) {
				t.Errorf("name %q: the answer has %U raw: %s", name, []rune(raw)[0], r.body)
			}
		}
	}
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).list(t); len(l) != 0 {
		t.Errorf("%d streams stored, want none", len(l))
	}
}

// Ids stay within 2^53-1, which the UI's JavaScript holds exactly, and an
// id is never given out twice, even after the highest is deleted: the
// audit and log rows of a deleted stream never point at a new one.
func TestIDsBoundedAndNeverReused(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	for _, big := range []string{"9223372036854775807", "9007199254740992"} {
		body := fmt.Sprintf(`{"id": %s, "listen_port": %d, "upstream_host": "db.internal", "upstream_port": 9}`, big, freePort(t))
		e := inst.call("POST", "/api/v1/streams", body, ctJSON).apiErr(t, http.StatusBadRequest)
		if e.Field != "id" || !strings.Contains(e.Error, "must be at most 9007199254740991") {
			t.Errorf("id %s: %+v", big, e)
		}
	}
	// Later creates still work.
	first := id(inst.create(stream(0, freePort(t), 9, obj{"upstream_host": "db.internal"})))
	inst.create(stream(7, freePort(t), 9, obj{"upstream_host": "db.internal"}))
	inst.call("DELETE", "/api/v1/streams/7", nil).want(t, http.StatusNoContent)
	if got := id(inst.create(stream(0, freePort(t), 9, obj{"upstream_host": "db.internal"}))); got != 8 {
		t.Errorf("after deleting the highest id 7, the next is %d, want 8", got)
	}
	top := id(inst.create(stream(1<<53-1, freePort(t), 9, obj{"upstream_host": "db.internal"})))
	if first != 1 || top != 1<<53-1 {
		t.Fatalf("ids %d and %d", first, top)
	}
	inst.call("DELETE", "/api/v1/streams/9007199254740991", nil).want(t, http.StatusNoContent)
	mid := id(inst.create(stream(50, freePort(t), 9, obj{"upstream_host": "db.internal"})))
	inst.call("DELETE", "/api/v1/streams/50", nil).want(t, http.StatusNoContent)
	// The next id would pass 2^53-1: refused, nothing stored, and never
	// 50 or 1<<53-1 again.
	r := inst.call("POST", "/api/v1/streams", stream(0, freePort(t), 9, obj{"upstream_host": "db.internal"}))
	if r.code == http.StatusCreated {
		if got := id(r.obj(t)); got == mid || got == top || got <= 0 || got > 1<<53-1 {
			t.Errorf("new id %d after deleting %d and %d", got, mid, top)
		}
	} else {
		e := r.apiErr(t, http.StatusBadRequest)
		if e.Field != "id" {
			t.Errorf("create after the highest id: %+v", e)
		}
	}
	if l := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).list(t); len(l) != 2 {
		t.Errorf("%d streams, want 2", len(l))
	}
}

// A private key pasted into the wrong field (domains, name, or a stream's
// ssl_domain) is never quoted back in the 400 nor in the log (issue 22).
func TestKeyNeverQuoted(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	key := testenv.Cert(t, testenv.CertOptions{}).KeyPEM
	oneLine := strings.Join(strings.Split(strings.TrimSpace(key), "\n")[1:3], "")
	for _, tc := range []struct {
		path string
		body any
	}{
		{"/api/v1/certificates", obj{"name": "c", "domains": []string{key}}},
		{"/api/v1/certificates", obj{"name": "c", "domains": []string{"a.example", oneLine}}},
		{"/api/v1/certificates", obj{"name": "c", "domains": key}},
		{"/api/v1/streams", stream(0, freePort(t), 9, obj{"ssl_domain": key})},
		{"/api/v1/streams", stream(0, freePort(t), 9, obj{"upstream_host": oneLine})},
		{"/api/v1/streams", stream(0, freePort(t), 9, obj{"whitelist_cidrs": []string{key}})},
	} {
		r := inst.call("POST", tc.path, tc.body)
		if r.code != http.StatusBadRequest {
			t.Errorf("POST %s: %s, want 400", tc.path, r)
		}
		checkNoKey(t, "the answer to POST "+tc.path, string(r.body), key)
	}
	log, err := os.ReadFile(inst.logFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(log, []byte("streams API request refused")) {
		t.Fatal("the refusals were not logged at DEBUG")
	}
	checkNoKey(t, "the log", string(log), key)
}

// checkNoKey fails if text holds the PEM header or any base64 line of key.
func checkNoKey(t *testing.T, where, text, key string) {
	t.Helper()
	if strings.Contains(text, "BEGIN") {
		t.Errorf("%s quotes a PEM header: %.300s", where, text)
	}
	for _, line := range strings.Split(key, "\n") {
		if len(line) >= 16 && !strings.HasPrefix(line, "-----") && strings.Contains(text, line[:16]) {
			t.Errorf("%s quotes the key (%q…): %.300s", where, line[:16], text)
			return
		}
	}
}

// Every write route, on the admin endpoint and on a streams_admin site,
// refuses a body over 1 MiB with 413, with or without a Content-Length,
// and changes nothing; 1 MiB itself is read (and refused for what it
// says).
func TestBodyLimitEveryRoute(t *testing.T) {
	inst, _, site, sid := safetySetup(t)
	before := inst.streamsNow(t)
	// padded is a JSON object of exactly n bytes.
	padded := func(n int) []byte {
		head := []byte(`{"notes": "`)
		tail := []byte(`"}`)
		return append(append(head, bytes.Repeat([]byte("x"), n-len(head)-len(tail))...), tail...)
	}
	for _, base := range []string{"http://" + inst.adminAddr(), fmt.Sprintf("http://127.0.0.1:%d", site)} {
		for _, rt := range []struct{ method, path, ct string }{
			{"POST", "/api/v1/streams", "application/json"},
			{"PUT", fmt.Sprintf("/api/v1/streams/%d", sid), "application/json"},
			{"PATCH", fmt.Sprintf("/api/v1/streams/%d", sid), "application/merge-patch+json"},
			{"POST", "/api/v1/streams/validate-port", "application/json"},
			{"POST", "/api/v1/certificates", "application/json"},
			{"PUT", "/api/v1/certificates/1", "application/json"},
		} {
			for _, chunked := range []bool{false, true} {
				body := padded(1<<20 + 1)
				var rd io.Reader = bytes.NewReader(body)
				if chunked {
					rd = io.MultiReader(bytes.NewReader(body[:10]), bytes.NewReader(body[10:]))
				}
				req, err := http.NewRequest(rt.method, base+rt.path, rd)
				if err != nil {
					t.Fatal(err)
				}
				req.Header.Set("Content-Type", rt.ct)
				resp, err := inst.client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(b), "the limit is 1048576 bytes") {
					t.Errorf("%s %s%s, 1 MiB + 1 (chunked %v): %d %.200s", rt.method, base, rt.path, chunked, resp.StatusCode, b)
				}
			}
			r := doRequest(t, inst.client, rt.method, base+rt.path, padded(1<<20), hdr{"Content-Type", rt.ct})
			if r.code == http.StatusRequestEntityTooLarge || r.code/100 == 2 && rt.method != "POST" {
				t.Errorf("%s %s%s, 1 MiB: %s", rt.method, base, rt.path, r)
			}
		}
	}
	inst.streamsUnchanged(t, before, "by bodies over the limit")
}

// A streams_admin site behind basic_auth: no path or method trick reaches
// the API or the UI without the password (401), nothing changes, and the
// password lets in (issue 22, "what held keeps holding").
func TestBasicAuthNoBypass(t *testing.T) {
	checkNoLeaks(t)
	inst := newInstance(t)
	site := inst.basicAuthSite(`respond "site"`)
	base := fmt.Sprintf("http://127.0.0.1:%d", site)
	sid := id(inst.create(stream(0, freePort(t), 9, obj{"upstream_host": "db.internal"})))
	before := inst.streamsNow(t)

	paths := []string{
		"/", "/app.js", "/api/v1/streams", "/api/v1/streams/", fmt.Sprintf("/api/v1/streams/%d", sid),
		"/api/v1/streams/stats", "/api/v1/certificates", "//api/v1/streams", "/API/v1/streams",
		"/api/v1/streams/../streams", "/api/v1/./streams", "/api/v1/streams%2F1", "/api/v1/%73treams",
		"/api/v1/streams;x", "/api/v1/streams?x=1", "/api/v1/streams#x", "/./api/v1/streams",
		fmt.Sprintf("/api/v1/streams/%d/active", sid), fmt.Sprintf("/api/v1/streams/%d/connections", sid),
		"/api/v1/streams/validate-port", "/ui/", "/x/../api/v1/streams",
	}
	methods := []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "get"}
	creds := []hdr{
		{},
		{"Authorization", "Basic " + "b3BzOndyb25n"},      // ops:wrong
		{"Authorization", "Basic " + "b3BzOg=="},          // ops: (empty)
		{"Authorization", "Bearer s3cret-test"},           // another scheme
		{"Authorization", "Basic !!!"},                    // not base64
		{"X-Forwarded-User", "ops"},                       // trusted nowhere
		{"Authorization", "basic b3BzOnMzY3JldC10ZXN0 x"}, // trailing junk
	}
	n := 0
	for _, p := range paths {
		for _, m := range methods {
			for _, c := range creds {
				if c.key != "" && m != "POST" && m != "GET" {
					continue // the header tricks once per path with GET and POST
				}
				req, err := http.NewRequest(m, base+p, strings.NewReader(`{"listen_port": 1, "upstream_host": "x", "upstream_port": 1}`))
				if err != nil {
					continue // a method net/http will not send
				}
				req.Header.Set("Content-Type", "application/json")
				if c.key != "" {
					req.Header.Set(c.key, c.value)
				}
				resp, err := inst.client.Do(req)
				if err != nil {
					t.Fatalf("%s %s: %v", m, p, err)
				}
				resp.Body.Close()
				n++
				if resp.StatusCode != http.StatusUnauthorized {
					t.Errorf("%s %s with %v: %d, want 401", m, p, c, resp.StatusCode)
				}
			}
		}
	}
	inst.streamsUnchanged(t, before, "without the password")
	r := doRequest(t, inst.client, "GET", base+"/api/v1/streams", nil, hdr{"Authorization", "Basic b3BzOnMzY3JldC10ZXN0"})
	if l := r.want(t, http.StatusOK).list(t); len(l) != 1 {
		t.Errorf("with the password: %d streams, want 1", len(l))
	}
	t.Logf("%d requests without the password refused", n)
}

// basicAuthSite loads a site on a free port that serves streams_admin
// behind basic_auth, user ops with the password s3cret-test, then the
// Caddyfile lines of more; it returns the site's port.
func (inst *instance) basicAuthSite(more string) int {
	inst.t.Helper()
	site := freePort(inst.t)
	// The bcrypt hash (cost 4, for speed) of "s3cret-test".
	const hash = "$2a$04$FnyhZjCJOPv9ztMMV0yFSOdwChsTs.0PUbpg2Gu3V9FLUu60bPTFO"
	if err := inst.caddy.LoadCaddyfile(inst.caddyfile(`http://127.0.0.1:%d {
	basic_auth {
		ops %s
	}
	streams_admin
	%s
}
`, site, hash, more)); err != nil {
		inst.t.Fatal(err)
	}
	return site
}
