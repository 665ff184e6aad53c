package streams_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// testCA issues leaf certificates for tests.
type testCA struct {
	ca   *testenv.Issued
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	ca := testenv.Cert(t, testenv.CertOptions{CA: true})
	return &testCA{ca: ca, pool: ca.Pool()}
}

// leaf returns a PEM chain (leaf, CA) and key for name with serial.
func (ca *testCA) leaf(t *testing.T, name string, serial int64) (chainPEM, keyPEM string) {
	t.Helper()
	l := testenv.Cert(t, testenv.CertOptions{Names: []string{name}, Issuer: ca.ca, Serial: big.NewInt(serial), NotAfter: time.Now().Add(20 * time.Hour)})
	return l.ChainPEM, l.KeyPEM
}

// tlsDial connects to the stream and returns the connection and the
// serial of the certificate it was served.
func tlsDial(t *testing.T, ca *testCA, port int, name string) (*tls.Conn, int64) {
	t.Helper()
	c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: ca.pool, ServerName: name})
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

func TestTLSStreamWithStoredCertificate(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port, cfgPort := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	ctx := context.Background()
	ca := newTestCA(t)

	chain, key := ca.leaf(t, "db.test", 100)
	cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "db", Certificate: chain, PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	if cert.Source != "custom" || len(cert.Domains) != 1 || cert.Domains[0] != "db.test" {
		t.Fatalf("stored certificate: %+v", cert)
	}

	// A stream without a certificate, or with a missing one, is refused.
	s := apiStream(2, port, up.Port)
	s.SSLEnabled, s.SSLCertID = true, cert.ID+50
	var fe *spec.FieldError
	if _, err := streams.CreateHost(ctx, s); !errors.As(err, &fe) || fe.Field != "ssl_cert_id" || !strings.Contains(err.Error(), "no such certificate") {
		t.Fatalf("ssl stream with a missing certificate: %v", err)
	}
	s.SSLCertID = cert.ID
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}

	c1, serial := tlsDial(t, ca, port, "db.test")
	if serial != 100 {
		t.Fatalf("served serial %d, want 100", serial)
	}
	if got := roundTrip(t, c1, "plain inside"); got != "plain inside" {
		t.Fatalf("through TLS: %q", got)
	}

	// Replace the certificate: new handshakes get it, c1 goes on.
	chain2, key2 := ca.leaf(t, "db.test", 200)
	if _, err := streams.UpdateCertificate(ctx, cert.ID, spec.CertInput{Name: "db", Certificate: chain2, PrivateKey: key2}); err != nil {
		t.Fatal(err)
	}
	if _, serial := tlsDial(t, ca, port, "db.test"); serial != 200 {
		t.Fatalf("after replacement: serial %d, want 200", serial)
	}
	if got := roundTrip(t, c1, "still"); got != "still" {
		t.Fatalf("the open TLS connection after replacement: %q", got)
	}

	// A config stream can use the stored certificate by id.
	cfgTLS := host(3, cfgPort, up.Port, map[string]any{"ssl_enabled": true, "ssl_cert_id": cert.ID})
	if err := inst.load(hosts(host(1, freePort(t), up.Port, nil), cfgTLS)); err != nil {
		t.Fatal(err)
	}
	cc, _ := tlsDial(t, ca, cfgPort, "db.test")
	if got := roundTrip(t, cc, "config tls"); got != "config tls" {
		t.Fatalf("config TLS stream: %q", got)
	}
	missing := host(4, freePort(t), up.Port, map[string]any{"ssl_enabled": true, "ssl_cert_id": 999})
	if err := inst.load(hosts(cfgTLS, missing)); err == nil || !strings.Contains(err.Error(), "ssl_cert_id 999") {
		t.Fatalf("config stream with a missing certificate: %v", err)
	}

	// Not deletable while streams use it; the error names them.
	err = streams.DeleteCertificate(ctx, cert.ID)
	if !errors.Is(err, spec.ErrInUse) || !strings.Contains(err.Error(), "2") || !strings.Contains(err.Error(), "3") {
		t.Fatalf("deleting a certificate in use: %v", err)
	}

	// A plain-text client fails the handshake, logged as such.
	plain := dial(t, port)
	_, _ = plain.Write([]byte("not tls at all\r\n\r\n"))
	expectClosed(t, plain, 5*time.Second)
	inst.waitLog(2, "tls_handshake_failed", func(e logEntry) bool { return e.DisconnectReason == "tls_handshake_failed" })
}

// A managed certificate is obtained by Caddy's tls app (here from its
// internal CA) and served to a TLS stream by its name.
func TestManagedCertificateFromCaddy(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := &testCaddy{t: t, caddy: testenv.New(t)}
	inst.admin, inst.logFile, inst.dbFile = inst.caddy.AdminAddr, inst.caddy.LogFile, inst.caddy.DBFile
	apps := map[string]any{
		"streams": hosts(host(1, freePort(t), up.Port, nil)),
		"tls": map[string]any{"automation": map[string]any{"policies": []any{map[string]any{
			"subjects": []string{"managed.test"},
			"issuers":  []any{map[string]any{"module": "internal"}},
		}}}},
		// Keep the test CA out of the system's trust store.
		"pki": map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
	}
	if err := inst.caddy.Load(apps); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "managed", Domains: []string{"Managed.Test"}})
	if err != nil {
		t.Fatal(err)
	}
	if cert.Source != "managed" || len(cert.Domains) != 1 || cert.Domains[0] != "managed.test" {
		t.Fatalf("managed certificate: %+v", cert)
	}
	s := apiStream(2, port, up.Port)
	s.SSLEnabled, s.SSLCertID = true, cert.ID
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	// Caddy obtains the certificate in the background.
	var c *tls.Conn
	testenv.Eventually(t, "a handshake with the certificate Caddy obtained", func() bool {
		var err error
		c, err = tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{ServerName: "managed.test", InsecureSkipVerify: true})
		return err == nil
	})
	defer c.Close()
	leaf := c.ConnectionState().PeerCertificates[0]
	if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "managed.test" || !strings.Contains(leaf.Issuer.CommonName, "Caddy Local Authority") {
		t.Fatalf("served %v issued by %q", leaf.DNSNames, leaf.Issuer.CommonName)
	}
	if got := roundTrip(t, c, "managed"); got != "managed" {
		t.Fatalf("through the managed TLS stream: %q", got)
	}
	// Once obtained, its issuer and validity show.
	got, err := streams.Running().Certificate(ctx, cert.ID)
	if err != nil || !strings.Contains(got.Issuer, "Caddy Local Authority") || !got.NotAfter.Equal(leaf.NotAfter.UTC()) || len(got.UsedBy) != 1 {
		t.Fatalf("managed certificate after Caddy obtained it: %+v, %v", got, err)
	}
}

// A stream in the config may name a certificate by Caddy tag (loaded by
// the tls app) or by a domain the tls app manages; the API refuses both.
func TestConfigStreamCertificateByTagAndDomain(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	tagPort, domainPort := freePort(t), freePort(t)
	ca := newTestCA(t)
	chain, key := ca.leaf(t, "tagged.test", 300)
	inst := &testCaddy{t: t, caddy: testenv.New(t)}
	inst.admin, inst.logFile, inst.dbFile = inst.caddy.AdminAddr, inst.caddy.LogFile, inst.caddy.DBFile
	apps := map[string]any{
		"streams": hosts(
			host(1, tagPort, up.Port, map[string]any{"ssl_enabled": true, "ssl_cert_tag": "db"}),
			host(2, domainPort, up.Port, map[string]any{"ssl_enabled": true, "ssl_domain": "auto.test"}),
		),
		"tls": map[string]any{
			"certificates": map[string]any{"load_pem": []any{map[string]any{"certificate": chain, "key": key, "tags": []string{"db"}}}},
			"automation": map[string]any{"policies": []any{map[string]any{
				"subjects": []string{"auto.test"},
				"issuers":  []any{map[string]any{"module": "internal"}},
			}}},
		},
		"pki": map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
	}
	if err := inst.caddy.Load(apps); err != nil {
		t.Fatal(err)
	}
	c, serial := tlsDial(t, ca, tagPort, "tagged.test")
	if serial != 300 {
		t.Fatalf("tagged certificate: serial %d, want 300", serial)
	}
	if got := roundTrip(t, c, "by tag"); got != "by tag" {
		t.Fatalf("through the tagged stream: %q", got)
	}
	var dc *tls.Conn
	testenv.Eventually(t, "the certificate Caddy manages for auto.test", func() bool {
		var err error
		dc, err = tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", domainPort), &tls.Config{ServerName: "auto.test", InsecureSkipVerify: true})
		return err == nil
	})
	defer dc.Close()
	if names := dc.ConnectionState().PeerCertificates[0].DNSNames; len(names) != 1 || names[0] != "auto.test" {
		t.Fatalf("managed domain certificate for %v", names)
	}

	s := apiStream(3, freePort(t), up.Port)
	s.SSLEnabled, s.SSLCertTag = true, "db"
	var fe *spec.FieldError
	if _, err := streams.CreateHost(context.Background(), s); !errors.As(err, &fe) || fe.Field != "ssl_cert_tag" || !strings.Contains(err.Error(), "only for streams in the Caddy config") {
		t.Fatalf("API stream with ssl_cert_tag: %v", err)
	}
}
