package admin_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// ---- certificates made on the fly ------------------------------------------

// testCA is a certificate authority of the test: ECDSA P-256.
type testCA struct {
	ca   *testenv.Issued
	pool *x509.CertPool
}

// tlsName is the name the test leaves are issued for.
const tlsName = "tls.test"

func newCA(t *testing.T) *testCA {
	t.Helper()
	ca := testenv.Cert(t, testenv.CertOptions{CA: true, NotAfter: time.Now().Add(365 * 24 * time.Hour)})
	return &testCA{ca: ca, pool: ca.Pool()}
}

// leafCert is a leaf the CA issued, with its chain and key as PEM.
type leafCert struct {
	serial   *big.Int
	chainPEM string // leaf, then the CA
	keyPEM   string // PKCS #8
	// keyLines are the base64 lines of the key's PEM body.
	keyLines []string
}

// issue makes a leaf for tlsName and 127.0.0.1, valid from notBefore to
// notAfter, with a new key.
func (ca *testCA) issue(t *testing.T, notBefore, notAfter time.Time) leafCert {
	t.Helper()
	l := testenv.Cert(t, testenv.CertOptions{Names: []string{tlsName, "127.0.0.1"}, Issuer: ca.ca, NotBefore: notBefore, NotAfter: notAfter})
	var lines []string
	for _, line := range strings.Split(l.KeyPEM, "\n") {
		if line != "" && !strings.HasPrefix(line, "-----") {
			lines = append(lines, line)
		}
	}
	return leafCert{serial: l.Cert.SerialNumber, chainPEM: l.ChainPEM, keyPEM: l.KeyPEM, keyLines: lines}
}

// valid issues a leaf valid from an hour ago for 90 days.
func (ca *testCA) valid(t *testing.T) leafCert {
	return ca.issue(t, time.Now().Add(-time.Hour), time.Now().Add(90*24*time.Hour))
}

// upload is the body of POST or PUT /api/v1/certificates.
func (l leafCert) upload(name string) obj {
	return obj{"name": name, "certificate": l.chainPEM, "private_key": l.keyPEM}
}

// ---- keeping private keys out of responses and logs -------------------------

// keyWatch sends API requests and checks that no response, nor Caddy's
// log, holds any line of the private keys it was told of.
type keyWatch struct {
	inst *instance
	keys []leafCert
}

func (kw *keyWatch) secret(l leafCert) leafCert {
	kw.keys = append(kw.keys, l)
	return l
}

func (kw *keyWatch) call(method, path string, body any, headers ...hdr) response {
	kw.inst.t.Helper()
	r := kw.inst.call(method, path, body, headers...)
	// The message names the request, and does not show the body.
	what := fmt.Sprintf("%s %s: %d", method, path, r.code)
	kw.check(what+": the body", r.body)
	for k, vs := range r.header {
		kw.check(what+": header "+k, []byte(strings.Join(vs, "\n")))
	}
	return r
}

func (kw *keyWatch) check(what string, b []byte) {
	kw.inst.t.Helper()
	for _, l := range kw.keys {
		for _, line := range l.keyLines {
			if bytes.Contains(b, []byte(line)) {
				kw.inst.t.Fatalf("%s: holds a line of a private key", what)
			}
		}
	}
}

// checkLog checks Caddy's log file.
func (kw *keyWatch) checkLog() {
	kw.inst.t.Helper()
	b, err := os.ReadFile(kw.inst.logFile)
	if err != nil {
		kw.inst.t.Fatal(err)
	}
	if len(b) == 0 {
		kw.inst.t.Fatal("the log is empty")
	}
	kw.check("Caddy's log", b)
}

// ---- API types ------------------------------------------------------------

// certJSON is a certificate as the API returns it.
type certJSON struct {
	ID          int64     `json:"id"`
	Name        string    `json:"name"`
	Source      string    `json:"source"`
	Domains     []string  `json:"domains"`
	Issuer      string    `json:"issuer"`
	NotBefore   time.Time `json:"not_before"`
	NotAfter    time.Time `json:"not_after"`
	Certificate string    `json:"certificate"`
	UsedBy      []int64   `json:"used_by"`
	Warnings    []string  `json:"warnings"`
}

// inUseBody is the error of deleting a certificate in use.
type inUseBody struct {
	Error   string  `json:"error"`
	Streams []int64 `json:"streams"`
}

// ---- tests ----------------------------------------------------------------

// TestCertificateUploads uploads good and bad certificates and reads them
// back; no private key is ever returned or logged.
func TestCertificateUploads(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	kw := &keyWatch{inst: inst}
	ca := newCA(t)

	if l := kw.call("GET", "/api/v1/certificates", nil).want(t, 200).list(t); len(l) != 0 {
		t.Fatalf("list before any upload: %v", l)
	}

	// A valid chain and key: 201, what was stored, a Location.
	good := kw.secret(ca.valid(t))
	r := kw.call("POST", "/api/v1/certificates", good.upload("main"))
	var created certJSON
	r.want(t, http.StatusCreated).decode(t, &created)
	if created.ID <= 0 || created.Name != "main" || created.Source != "custom" ||
		!slices.Equal(created.Domains, []string{tlsName, "127.0.0.1"}) || created.Issuer != "Aegis Test CA" ||
		created.NotBefore.IsZero() || created.NotAfter.IsZero() || created.UsedBy == nil || len(created.UsedBy) != 0 ||
		len(created.Warnings) != 0 {
		t.Fatalf("created: %s", r)
	}
	if loc := r.header.Get("Location"); loc != fmt.Sprintf("/api/v1/certificates/%d", created.ID) {
		t.Fatalf("Location %q", loc)
	}
	if o := r.obj(t); o["used_by"] == nil || o["private_key"] != nil {
		t.Fatalf("created: used_by must be an array and private_key absent: %s", r)
	}

	// GET lists it, and returns it alone.
	r = kw.call("GET", "/api/v1/certificates", nil).want(t, 200)
	var list []certJSON
	r.decode(t, &list)
	if len(list) != 1 || list[0].ID != created.ID || !slices.Equal(list[0].Domains, created.Domains) ||
		list[0].Issuer != created.Issuer || !list[0].NotAfter.Equal(created.NotAfter) ||
		!list[0].NotBefore.Equal(created.NotBefore) || list[0].UsedBy == nil || len(list[0].UsedBy) != 0 {
		t.Fatalf("list: %s", r)
	}
	var one certJSON
	kw.call("GET", fmt.Sprintf("/api/v1/certificates/%d", created.ID), nil).want(t, 200).decode(t, &one)
	if one.ID != created.ID || one.Certificate == "" || !strings.Contains(one.Certificate, "BEGIN CERTIFICATE") {
		t.Fatalf("GET one: %+v", one)
	}
	if r := kw.call("HEAD", "/api/v1/certificates", nil); r.code != 200 || len(r.body) != 0 {
		t.Fatalf("HEAD: %s", r)
	}
	kw.call("GET", "/api/v1/certificates/999", nil).apiErr(t, 404)

	// Rejected uploads: 400 naming the field, never quoting a PEM or a
	// key, and nothing stored.
	before := string(kw.call("GET", "/api/v1/certificates", nil).want(t, 200).body)
	expired := kw.secret(ca.issue(t, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour)))
	other := kw.secret(ca.valid(t))
	mismatched := good.upload("mismatched")
	mismatched["private_key"] = other.keyPEM
	badDER := good.upload("bad der")
	badDER["certificate"] = "-----BEGIN CERTIFICATE-----\nZm9vYmFy\n-----END CERTIFICATE-----\n"
	keyAsCert := good.upload("key as cert")
	keyAsCert["certificate"] = good.keyPEM
	noName := good.upload("")
	noKey := good.upload("no key")
	delete(noKey, "private_key")
	misspelt := obj{"name": "x", "certificate": good.chainPEM, "privatekey": good.keyPEM}
	keyInArray := obj{"name": "x", "certificate": good.chainPEM, "private_key": []string{good.keyPEM}}
	for _, tc := range []struct {
		name     string
		body     any
		field    string // "" for an error about the whole body
		contains string
	}{
		{"expired", expired.upload("expired"), "certificate", "expired"},
		{"key of another certificate", mismatched, "private_key", "does not match"},
		{"garbage", obj{"name": "x", "certificate": "hello, not a PEM", "private_key": good.keyPEM}, "certificate", ""},
		{"not a certificate inside", badDER, "certificate", "not a valid certificate"},
		{"a key in the certificate field", keyAsCert, "certificate", "private key"},
		{"garbage key", obj{"name": "x", "certificate": good.chainPEM, "private_key": "hello"}, "private_key", ""},
		{"no key", noKey, "private_key", ""},
		{"no name", noName, "name", "name"},
		{"unknown field", obj{"name": "x", "certificate": good.chainPEM, "private_key": good.keyPEM, "bogus": 1}, "bogus", `unknown field "bogus"`},
		{"the key in a misspelt field", misspelt, "privatekey", "private_key"},
		{"the key in an array", keyInArray, "private_key", "must be a string"},
		{"a number for the name", obj{"name": 5, "certificate": good.chainPEM, "private_key": good.keyPEM}, "name", "must be a string"},
		{"a field twice", `{"name": "a", "name": "b"}`, "name", "twice"},
		{"the key as the body", fmt.Sprintf("%q", good.keyPEM), "", "JSON object"},
		{"the key after the body", fmt.Sprintf("{} %q", good.keyPEM), "", "goes on after"},
		{"empty", "", "", "empty"},
	} {
		body := tc.body
		if s, ok := body.(string); ok {
			body = []byte(s) // sent as it is, with the JSON content type below
		}
		r := kw.call("POST", "/api/v1/certificates", body, ctJSON)
		if r.code != 400 {
			t.Errorf("%s: %s, want 400", tc.name, r)
			continue
		}
		var e errBody
		r.decode(t, &e)
		if e.Field != tc.field || !strings.Contains(e.Error, tc.contains) || e.Value != nil {
			t.Errorf("%s: %s: want field %q, no value, a message with %q", tc.name, r, tc.field, tc.contains)
		}
		if tc.field != "" && (len(e.Errors) == 0 || e.Errors[0].Field != tc.field || e.Errors[0].Value != nil) {
			t.Errorf("%s: errors %+v", tc.name, e.Errors)
		}
		// Base64 DER of a certificate or a key starts with MI.
		if strings.Contains(string(r.body), "MI") {
			t.Errorf("%s: the error quotes a PEM: %s", tc.name, r)
		}
	}
	if after := string(kw.call("GET", "/api/v1/certificates", nil).want(t, 200).body); after != before {
		t.Fatalf("rejected uploads changed the list:\nbefore %s\nafter  %s", before, after)
	}

	// Expiring within 30 days: stored, with a warning.
	soon := kw.secret(ca.issue(t, time.Now().Add(-time.Hour), time.Now().Add(10*24*time.Hour)))
	var warned certJSON
	r = kw.call("POST", "/api/v1/certificates", soon.upload("soon"))
	r.want(t, http.StatusCreated).decode(t, &warned)
	if len(warned.Warnings) == 0 || !strings.Contains(strings.Join(warned.Warnings, " "), "expires") {
		t.Fatalf("expiring in 10 days: want a warning: %s", r)
	}
	if l := kw.call("GET", "/api/v1/certificates", nil).want(t, 200).list(t); len(l) != 2 {
		t.Fatalf("list after two uploads: %v", l)
	}

	// PUT replaces; the id in the path must exist.
	repl := kw.secret(ca.valid(t))
	var put certJSON
	kw.call("PUT", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), repl.upload("renewed")).want(t, 200).decode(t, &put)
	if put.ID != warned.ID || put.Name != "renewed" || len(put.Warnings) != 0 || !put.NotAfter.After(warned.NotAfter) {
		t.Fatalf("PUT: %+v", put)
	}
	e := kw.call("PUT", "/api/v1/certificates/999", repl.upload("x")).apiErr(t, 404)
	if !strings.Contains(e.Error, "999") {
		t.Errorf("PUT of a missing certificate: %+v", e)
	}
	e = kw.call("PUT", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), expired.upload("x")).apiErr(t, 400)
	if e.Field != "certificate" {
		t.Errorf("PUT of an expired certificate: %+v", e)
	}
	var still certJSON
	kw.call("GET", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), nil).want(t, 200).decode(t, &still)
	if still.Name != "renewed" {
		t.Fatalf("a refused PUT changed the certificate: %+v", still)
	}

	// DELETE of an unused certificate.
	kw.call("DELETE", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), nil).want(t, http.StatusNoContent)
	kw.call("GET", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), nil).apiErr(t, 404)
	kw.call("DELETE", fmt.Sprintf("/api/v1/certificates/%d", warned.ID), nil).apiErr(t, 404)

	kw.checkLog()
}

// TestCertificateRoutes checks methods, paths, headers and bodies of the
// certificate routes, as TestRoutes does for the streams routes.
func TestCertificateRoutes(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	kw := &keyWatch{inst: inst}
	good := kw.secret(newCA(t).valid(t))
	kw.call("POST", "/api/v1/certificates", good.upload("a")).want(t, http.StatusCreated)

	checkRoutes(t, kw.call, []routeCase{
		{method: "GET", path: "/api/v1/certificates/", code: 200},
		{method: "GET", path: "/api/v1/certificates/1", code: 200},
		{method: "GET", path: "/api/v1/certificates/abc", code: 404, contains: "certificate id"},
		{method: "GET", path: "/api/v1/certificates/0", code: 404, contains: "positive integer"},
		{method: "GET", path: "/api/v1/certificates/1/x", code: 404},
		{method: "GET", path: "/api/v1/certificates/1/", code: 404},
		{method: "PATCH", path: "/api/v1/certificates", code: 405, allow: "GET, HEAD, POST, OPTIONS"},
		{method: "DELETE", path: "/api/v1/certificates", code: 405, allow: "GET, HEAD, POST, OPTIONS"},
		{method: "POST", path: "/api/v1/certificates/1", body: obj{}, code: 405, allow: "GET, HEAD, PUT, DELETE, OPTIONS"},
		{method: "OPTIONS", path: "/api/v1/certificates/1", code: 204, allow: "GET, HEAD, PUT, DELETE, OPTIONS"},
		{method: "POST", path: "/api/v1/certificates", body: good.upload("b"), headers: []hdr{{"Content-Type", "text/plain"}}, code: 415},
		{method: "POST", path: "/api/v1/certificates", body: `{}`, code: 415, contains: "application/json"},
		{method: "PUT", path: "/api/v1/certificates/1", body: `{}`, code: 415},
		{method: "POST", path: "/api/v1/certificates", body: good.upload("b"), headers: []hdr{{"Sec-Fetch-Site", "cross-site"}}, code: 403, contains: "cross-site"},
		{method: "PUT", path: "/api/v1/certificates/1", body: good.upload("b"), headers: []hdr{{"Origin", "http://evil.example"}}, code: 403},
		{method: "DELETE", path: "/api/v1/certificates/1", headers: []hdr{{"Sec-Fetch-Site", "same-site"}}, code: 403},
		{method: "POST", path: "/api/v1/certificates", body: `{"name": "` + strings.Repeat("x", 2<<20) + `"}`, headers: []hdr{ctJSON}, code: 413},
		{method: "PUT", path: "/api/v1/certificates/1", body: `{"certificate": "` + strings.Repeat("x", 1<<20) + `"}`, headers: []hdr{ctJSON}, code: 413},
	})
	if l := kw.call("GET", "/api/v1/certificates", nil).want(t, 200).list(t); len(l) != 1 {
		t.Fatalf("refused requests changed the list: %v", l)
	}
	kw.checkLog()
}

// TestCertificatesWithoutStorage: no streams app lists none and refuses
// the rest; storage off refuses all, saying why.
func TestCertificatesWithoutStorage(t *testing.T) {
	checkNoLeaks(t)
	good := newCA(t).valid(t)
	inst := newInstance(t)
	if err := inst.load(nil, nil); err != nil {
		t.Fatal(err)
	}
	if l := inst.call("GET", "/api/v1/certificates", nil).want(t, 200).list(t); len(l) != 0 {
		t.Fatalf("list without a streams app: %v", l)
	}
	inst.call("POST", "/api/v1/certificates", good.upload("a")).apiErr(t, 503)
	inst.call("GET", "/api/v1/certificates/1", nil).apiErr(t, 503)

	app := streamsApp()
	app["storage"] = obj{"disabled": true}
	if err := inst.load(app, nil); err != nil {
		t.Fatal(err)
	}
	for _, r := range []response{
		inst.call("GET", "/api/v1/certificates", nil),
		inst.call("POST", "/api/v1/certificates", good.upload("a")),
		inst.call("DELETE", "/api/v1/certificates/1", nil),
	} {
		if e := r.apiErr(t, 409); !strings.Contains(e.Error, "storage") {
			t.Errorf("storage off: %s", r)
		}
	}
}

// recorder is an upstream that echoes and keeps what it received.
type recorder struct {
	mu  sync.Mutex
	got bytes.Buffer
}

func (rc *recorder) serve(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			rc.mu.Lock()
			rc.got.Write(buf[:n])
			rc.mu.Unlock()
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (rc *recorder) received() string {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.got.String()
}

// dialTLS completes a TLS handshake with the stream on port, trusting only
// the CA; the connection is closed when the test ends.
func dialTLS(t *testing.T, port int, ca *testCA) *tls.Conn {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{
		RootCAs: ca.pool, ServerName: tlsName, MinVersion: tls.VersionTLS12,
	})
	if err != nil {
		t.Fatalf("TLS handshake with port %d: %v", port, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func leafSerial(c *tls.Conn) *big.Int {
	return c.ConnectionState().PeerCertificates[0].SerialNumber
}

// TestTLSStream terminates TLS with an uploaded certificate on a stream
// created through the API, replaces the certificate under an open
// connection, refuses to delete it while used, and logs a failed
// handshake.
func TestTLSStream(t *testing.T) {
	checkNoLeaks(t)
	rec := &recorder{}
	up := newServer(t, rec.serve)
	inst := startCaddy(t, streamsApp(), nil)
	kw := &keyWatch{inst: inst}
	ca := newCA(t)
	first := kw.secret(ca.valid(t))
	var cert certJSON
	kw.call("POST", "/api/v1/certificates", first.upload("tls")).want(t, http.StatusCreated).decode(t, &cert)
	certPath := fmt.Sprintf("/api/v1/certificates/%d", cert.ID)

	// A stream that names a certificate that does not exist is refused.
	badPort := freePort(t)
	e := kw.call("POST", "/api/v1/streams", stream(0, badPort, up.Port, obj{"ssl_enabled": true, "ssl_cert_id": cert.ID + 100})).apiErr(t, 400)
	if e.Field != "ssl_cert_id" || norm(e.Value) != norm(cert.ID+100) {
		t.Fatalf("a stream with a missing certificate: %+v", e)
	}
	if !refused(t, badPort) {
		t.Fatalf("port %d listens after a refused create", badPort)
	}
	// Disabled too: a certificate uploaded later would get that id and
	// become the stream's without anyone choosing it.
	e = kw.call("POST", "/api/v1/streams", stream(0, badPort, up.Port, obj{"enabled": false, "ssl_enabled": true, "ssl_cert_id": cert.ID + 100})).apiErr(t, 400)
	if e.Field != "ssl_cert_id" || !strings.Contains(e.Error, "no such certificate") {
		t.Fatalf("a disabled stream with a missing certificate: %+v", e)
	}

	// The stream terminates TLS: the client trusts the CA, the upstream
	// gets plain bytes.
	port := freePort(t)
	sid := id(kw.call("POST", "/api/v1/streams", stream(0, port, up.Port, obj{"name": "tls-db", "ssl_enabled": true, "ssl_cert_id": cert.ID})).
		want(t, http.StatusCreated).obj(t))
	c1 := dialTLS(t, port, ca)
	if got := roundTrip(t, c1, "hello over tls\n"); got != "hello over tls\n" {
		t.Fatalf("echo over TLS: %q", got)
	}
	if s := leafSerial(c1); s.Cmp(first.serial) != 0 {
		t.Fatalf("served serial %v, want %v", s, first.serial)
	}
	eventually(t, "the upstream to get the plain bytes", func() bool { return rec.received() == "hello over tls\n" })
	var used certJSON
	kw.call("GET", certPath, nil).want(t, 200).decode(t, &used)
	if !slices.Equal(used.UsedBy, []int64{sid}) {
		t.Fatalf("used_by %v, want [%d]", used.UsedBy, sid)
	}

	// Hot replacement: the open connection goes on with the old
	// certificate, a new one gets the new certificate.
	second := kw.secret(ca.valid(t))
	var replaced certJSON
	kw.call("PUT", certPath, second.upload("tls renewed")).want(t, 200).decode(t, &replaced)
	if !slices.Equal(replaced.UsedBy, []int64{sid}) {
		t.Fatalf("PUT: used_by %v", replaced.UsedBy)
	}
	if got := roundTrip(t, c1, "still here\n"); got != "still here\n" {
		t.Fatalf("the open connection after the replacement: %q", got)
	}
	c2 := dialTLS(t, port, ca)
	if s := leafSerial(c2); s.Cmp(second.serial) != 0 {
		t.Fatalf("a new connection got serial %v, want the new certificate's %v (the old one was %v)", s, second.serial, first.serial)
	}
	if got := roundTrip(t, c2, "new\n"); got != "new\n" {
		t.Fatalf("echo on the new connection: %q", got)
	}
	c1.Close()
	c2.Close()

	// A plain-text client fails the handshake, and the log says so.
	plain := dial(t, port)
	if _, err := plain.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, plain, 10*time.Second)
	inst.waitLogLine(sid, "tls_handshake_failed")

	// The certificate cannot be deleted while the stream uses it.
	r := kw.call("DELETE", certPath, nil)
	r.want(t, http.StatusConflict)
	var iu inUseBody
	r.decode(t, &iu)
	if !slices.Equal(iu.Streams, []int64{sid}) || !strings.Contains(iu.Error, "tls-db") || !strings.Contains(iu.Error, fmt.Sprint(sid)) {
		t.Fatalf("DELETE of a certificate in use: %s", r)
	}
	kw.call("GET", certPath, nil).want(t, 200)

	// Once the stream is gone, it can.
	kw.call("DELETE", fmt.Sprintf("/api/v1/streams/%d", sid), nil).want(t, http.StatusNoContent)
	kw.call("DELETE", certPath, nil).want(t, http.StatusNoContent)
	kw.call("GET", certPath, nil).apiErr(t, 404)
	kw.call("DELETE", certPath, nil).apiErr(t, 404)

	kw.checkLog()
}

// TestCertificatesThroughHandler: the certificate routes through the
// streams_admin handler under a stripped prefix, Location included.
func TestCertificatesThroughHandler(t *testing.T) {
	checkNoLeaks(t)
	inst := newInstance(t)
	site := freePort(t)
	if err := inst.caddy.LoadCaddyfile(inst.caddyfile(`http://127.0.0.1:%d {
	handle_path /admin/* {
		streams_admin
	}
	respond "site"
}
`, site)); err != nil {
		t.Fatal(err)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d/admin", site)
	good := newCA(t).valid(t)
	r := doRequest(t, inst.client, "POST", base+"/api/v1/certificates", good.upload("via site")).want(t, http.StatusCreated)
	loc := r.header.Get("Location")
	if !strings.HasPrefix(loc, "/admin/api/v1/certificates/") {
		t.Fatalf("Location %q", loc)
	}
	got := doRequest(t, inst.client, "GET", fmt.Sprintf("http://127.0.0.1:%d%s", site, loc), nil).want(t, 200).obj(t)
	if got["name"] != "via site" {
		t.Fatalf("GET %s: %v", loc, got)
	}
	if l := doRequest(t, inst.client, "GET", base+"/api/v1/certificates", nil).want(t, 200).list(t); len(l) != 1 {
		t.Fatalf("list: %v", l)
	}
}

// The errors of text that is not PEM say how to paste it, whole: the
// redaction of secrets in messages (certcheck.Redact) takes anything from
// "-----BEGIN" on, so they must not quote a PEM header.
func TestPEMErrorsSayWhatToPaste(t *testing.T) {
	inst := startCaddy(t, streamsApp(), nil)
	for _, tc := range []struct {
		path string
		body obj
		want string
	}{
		{"/api/v1/certificates", obj{"name": "c", "domains": []string{}},
			"paste the certificate from its BEGIN CERTIFICATE line to its END CERTIFICATE line"},
		{"/api/v1/streams", stream(0, freePort(t), 9, obj{"upstream_tls": true, "upstream_tls_ca": "not pem"}),
			"paste the CA certificate(s), each from its BEGIN CERTIFICATE line to its END CERTIFICATE line"},
	} {
		r := inst.call("POST", tc.path, tc.body)
		if e := r.apiErr(t, 400); !strings.Contains(r.String(), tc.want) || strings.Contains(r.String(), "redacted") {
			t.Errorf("POST %s: %+v\nwant %q, whole", tc.path, e, tc.want)
		}
	}
}
