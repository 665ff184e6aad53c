package streams_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// tlsUpstream is a crypto/tls echo server that records the common name of
// each client certificate it was shown ("" for none).
type tlsUpstream struct {
	*loopback.Server
	mu  sync.Mutex
	cns []string
}

func newTLSUpstream(t *testing.T, cert *testenv.Issued, clientCAs *x509.CertPool) *tlsUpstream {
	cfg := &tls.Config{Certificates: []tls.Certificate{cert.TLS}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: clientCAs}
	u := &tlsUpstream{}
	u.Server = newUpstream(t, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			return
		}
		cn := ""
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 {
			cn = pc[0].Subject.CommonName
		}
		u.mu.Lock()
		u.cns = append(u.cns, cn)
		u.mu.Unlock()
		_, _ = io.Copy(tc, tc)
	})
	return u
}

func (u *tlsUpstream) clients() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.cns...)
}

// clientCert is a certificate for TLS clients (and servers: the store
// takes server certificates), signed by ca.
func clientCert(t *testing.T, ca *testenv.Issued, cn string) *testenv.Issued {
	return testenv.Cert(t, testenv.CertOptions{Issuer: ca, Template: &x509.Certificate{
		Subject: pkix.Name{CommonName: cn}, DNSNames: []string{cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}})
}

// TestUpstreamTLS runs streams with upstream_tls against crypto/tls
// upstreams with their own CA: a verified one relays (a large transfer
// too, through the TLS connection) and presents the stored client
// certificate; a wrong name, an expired certificate and an unknown CA are
// refused, and so is an upstream that never answers the handshake, each
// with its reason in the connection log, in the warning
// line and in the health status, whose checks do the handshake. The
// client certificate cannot be deleted while a stream uses it.
func TestUpstreamTLS(t *testing.T) {
	checkNoLeaks(t)
	ca := testenv.Cert(t, testenv.CertOptions{CA: true, Names: []string{"Upstream Test CA"}})
	good := testenv.Cert(t, testenv.CertOptions{Names: []string{"db.internal", "127.0.0.1"}, Issuer: ca})
	expired := testenv.Cert(t, testenv.CertOptions{Names: []string{"db.internal", "127.0.0.1"}, Issuer: ca,
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)})
	clientCA := testenv.Cert(t, testenv.CertOptions{CA: true, Names: []string{"Client Test CA"}})
	client := clientCert(t, clientCA, "aegis-client.test")

	upGood := newTLSUpstream(t, good, clientCA.Pool())
	upExpired := newTLSUpstream(t, expired, clientCA.Pool())
	// An upstream that takes the connection and never answers the
	// handshake.
	silent := &tlsUpstream{Server: newUpstream(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })}
	plain := newUpstream(t, echo)
	inst := startCaddy(t, hosts(host(1, freePort(t), plain.Port, nil)))
	ctx := context.Background()
	stored, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "aegis-client", Certificate: client.ChainPEM, PrivateKey: client.KeyPEM})
	if err != nil {
		t.Fatal(err)
	}

	for i, tc := range []struct {
		name       string
		up         *tlsUpstream
		serverName string
		ca         string
		clientCert int64
		insecure   bool
		fail       string // the reason's words; "" relays
		cn         string // the client certificate the upstream sees
	}{
		{name: "verified, mTLS", up: upGood, serverName: "db.internal", ca: ca.CertPEM, clientCert: stored.ID, cn: "aegis-client.test"},
		{name: "an IP upstream, verified by IP", up: upGood, ca: ca.CertPEM},
		{name: "wrong name", up: upGood, serverName: "other.internal", ca: ca.CertPEM, fail: "name mismatch"},
		{name: "expired", up: upExpired, serverName: "db.internal", ca: ca.CertPEM, fail: "expired"},
		{name: "unknown authority", up: upGood, serverName: "db.internal", fail: "unknown authority"},
		{name: "handshake timeout", up: silent, serverName: "db.internal", ca: ca.CertPEM, fail: "handshake timeout"},
		{name: "insecure", up: upExpired, serverName: "wrong", insecure: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := int64(10 + i)
			port := freePort(t)
			s := apiStream(id, port, tc.up.Port)
			s.UpstreamTLS, s.UpstreamTLSServerName, s.UpstreamTLSCA = true, tc.serverName, tc.ca
			s.UpstreamTLSClientCertID, s.UpstreamTLSInsecureSkipVerify = tc.clientCert, tc.insecure
			s.HealthCheckEnabled, s.HealthCheckIntervalSeconds = true, 1
			if tc.up == silent {
				s.ConnectionTimeoutSeconds = 1 // the handshake's too
			}
			if _, err := streams.CreateHost(ctx, s); err != nil {
				t.Fatal(err)
			}
			defer streams.DeleteHost(ctx, id)
			before := len(tc.up.clients())
			c := dial(t, port)
			if tc.fail != "" {
				expectClosed(t, c, 5*time.Second)
				inst.waitLog(id, "upstream_tls_failed", func(e logEntry) bool { return e.DisconnectReason == "upstream_tls_failed" })
				st := inst.waitStats(id, "unhealthy", func(s spec.Status) bool { return s.HealthStatus == "unhealthy" })
				if !strings.HasPrefix(st.LastHealthError, "upstream_tls_failed: "+tc.fail) {
					t.Errorf("last_health_error %q, want upstream_tls_failed: %s", st.LastHealthError, tc.fail)
				}
				warned := testenv.LogLines(t, inst.logFile, func(e struct {
					Msg      string `json:"msg"`
					StreamID int64  `json:"stream_id"`
					Error    string `json:"error"`
				}) bool {
					return e.Msg == "tls to the upstream failed" && e.StreamID == id && strings.Contains(e.Error, tc.fail)
				})
				if len(warned) == 0 {
					t.Errorf("no warning line with %q", tc.fail)
				}
				return
			}
			if got := roundTrip(t, c, "hello\n"); got != "hello\n" {
				t.Fatalf("echo %q", got)
			}
			// A transfer larger than a TLS record and the relay's buffer.
			big := make([]byte, 1<<20)
			_, _ = rand.Read(big)
			go func() { _, _ = c.Write(big) }()
			back := make([]byte, len(big))
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, big) {
				t.Fatalf("1 MiB echo through upstream TLS: %v, equal %v", err, bytes.Equal(back, big))
			}
			if got := tc.up.clients(); len(got) <= before || got[before] != tc.cn {
				t.Errorf("the upstream's clients %q, want %q after %d", got, tc.cn, before)
			}
			inst.waitStats(id, "healthy", func(s spec.Status) bool { return s.HealthStatus == "healthy" })
			c.Close()
			inst.waitLog(id, "the end", func(e logEntry) bool { return e.BytesSent == 6+1<<20 && e.BytesReceived == 6+1<<20 })

			if tc.clientCert > 0 {
				err := streams.DeleteCertificate(ctx, tc.clientCert)
				if !errors.Is(err, spec.ErrInUse) || !strings.Contains(err.Error(), s.Name) {
					t.Errorf("deleting the client certificate in use: %v", err)
				}
			}
		})
	}

	// TLS on both sides: the stream terminates the client's TLS with the
	// stored certificate (it is a server's too) and opens its own to the
	// upstream.
	t.Run("both sides", func(t *testing.T) {
		port := freePort(t)
		s := apiStream(30, port, upGood.Port)
		s.SSLEnabled, s.SSLCertID = true, stored.ID
		s.UpstreamTLS, s.UpstreamTLSServerName, s.UpstreamTLSCA = true, "db.internal", ca.CertPEM
		if _, err := streams.CreateHost(ctx, s); err != nil {
			t.Fatal(err)
		}
		defer streams.DeleteHost(ctx, 30)
		c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: clientCA.Pool(), ServerName: "aegis-client.test"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := roundTrip(t, c, "both\n"); got != "both\n" {
			t.Fatalf("echo %q", got)
		}
	})

	if err := streams.DeleteCertificate(ctx, stored.ID); err != nil {
		t.Errorf("deleting the client certificate once no stream uses it: %v", err)
	}
}

// TestUpstreamTLSOpenSSL relays to `openssl s_server -rev` (a TLS echo
// server that reverses lines) that requires a client certificate
// (-Verify): a second, independent TLS implementation as the upstream.
func TestUpstreamTLSOpenSSL(t *testing.T) {
	checkNoLeaks(t)
	ca := testenv.Cert(t, testenv.CertOptions{CA: true, Names: []string{"Upstream Test CA"}})
	server := testenv.Cert(t, testenv.CertOptions{Names: []string{"db.internal"}, Issuer: ca})
	clientCA := testenv.Cert(t, testenv.CertOptions{CA: true, Names: []string{"Client Test CA"}})
	client := clientCert(t, clientCA, "aegis-client.test")
	dir := t.TempDir()
	for name, content := range map[string]string{"server.pem": server.ChainPEM, "server.key": server.KeyPEM, "clientca.pem": clientCA.CertPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	upPort := freePort(t)
	ossl := testenv.Program(t, "openssl", "s_server", "-accept", fmt.Sprintf("127.0.0.1:%d", upPort), "-rev",
		"-cert", filepath.Join(dir, "server.pem"), "-key", filepath.Join(dir, "server.key"),
		"-CAfile", filepath.Join(dir, "clientca.pem"), "-Verify", "1")
	testenv.Eventually(t, "openssl listening", func() bool { return !refused(upPort) })

	port := freePort(t)
	startCaddy(t, hosts(host(1, freePort(t), upPort, nil)))
	ctx := context.Background()
	stored, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "aegis-client", Certificate: client.ChainPEM, PrivateKey: client.KeyPEM})
	if err != nil {
		t.Fatal(err)
	}
	s := apiStream(2, port, upPort)
	s.UpstreamTLS, s.UpstreamTLSServerName, s.UpstreamTLSCA, s.UpstreamTLSClientCertID = true, "db.internal", ca.CertPEM, stored.ID
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	c := dial(t, port)
	if got := roundTrip(t, c, "hello aegis\n"); got != "sigea olleh\n" {
		t.Fatalf("openssl s_server -rev answered %q; its output:\n%s", got, ossl.Log())
	}
}
