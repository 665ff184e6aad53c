package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// tlsName is the name the bench certificate is for, and the SNI the
// clients send.
const tlsName = "bench.test"

// benchCert is the certificate every TLS-terminating proxy serves: an
// ECDSA P-256 leaf for tlsName, issued by an ECDSA P-256 CA made for the
// run. The TLS upstreams of the features test serve others, for other
// names, each from a CA of its own.
type benchCert struct {
	name     string // the leaf's one DNS name
	chainPEM string // the leaf, then the CA
	caPEM    string // the CA alone
	keyPEM   string // the leaf's key, PKCS #8
	leafDER  []byte
	roots    *x509.CertPool // the CA
}

// newBenchCert makes a CA and a leaf for tlsName valid from an hour before
// now for 90 days.
func newBenchCert(now time.Time) (*benchCert, error) { return newBenchCertFor(now, tlsName) }

// newBenchCertFor is newBenchCert for name.
func newBenchCertFor(now time.Time, name string) (*benchCert, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "aegis-bench CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
	return &benchCert{
		name:     name,
		chainPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})) + caPEM,
		caPEM:    caPEM,
		keyPEM:   string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})),
		leafDER:  leafDER,
		roots:    roots,
	}, nil
}

// combinedPEM is the chain and the key in one file, as HAProxy's crt wants
// it (nginx reads it for ssl_certificate and ssl_certificate_key alike).
func (bc *benchCert) combinedPEM() string { return bc.chainPEM + bc.keyPEM }

// tlsGroups are the key exchanges the clients offer, and the proxies are
// set to X25519 alone. Without this, Go's client would also offer
// X25519MLKEM768, which Aegis (Go) would pick and HAProxy and nginx
// (OpenSSL 3.0) cannot: different work for the same handshake. P-256 is
// offered but not used: in TLS 1.2, OpenSSL serves an ECDSA certificate
// only to a client that lists the certificate's curve.
var tlsGroups = []tls.CurveID{tls.X25519, tls.CurveP256}

// tls12Suite is the one TLS 1.2 cipher suite the clients offer; for TLS 1.3
// the proxies are set to TLS_AES_128_GCM_SHA256, which Go picks on a CPU
// with AES instructions.
const tls12Suite = tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256

// clientConfig is the config of the load's clients for TLS version v. It
// has no ClientSessionCache, so every handshake is a full one. The server
// is checked by its leaf, byte for byte, rather than by a chain
// verification: the client then checks one signature per handshake (the
// CertificateVerify) instead of two, since the bench's one CPU may be
// what limits the handshake rate. probeTLS verifies the chain.
func (bc *benchCert) clientConfig(v uint16) *tls.Config {
	return &tls.Config{
		ServerName:         bc.name,
		MinVersion:         v,
		MaxVersion:         v,
		CurvePreferences:   tlsGroups,
		CipherSuites:       []uint16{tls12Suite}, // TLS 1.2 only: 1.3's are not configurable
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, bc.leafDER) {
				return errors.New("the server did not present the bench certificate")
			}
			return nil
		},
	}
}

// verifyingConfig is a client config that verifies the chain against the
// CA, as a real client would.
func (bc *benchCert) verifyingConfig() *tls.Config {
	return &tls.Config{ServerName: bc.name, RootCAs: bc.roots, MinVersion: tls.VersionTLS12,
		CurvePreferences: tlsGroups}
}

// uploadAegisCert uploads the bench certificate through aegis's API (POST
// /api/v1/certificates), which stores it with its key sealed, and returns
// its id.
func uploadAegisCert(api *aegisAPI, bc *benchCert) (int64, error) {
	var cs spec.CertStatus
	if err := api.call("POST", "/api/v1/certificates", certInput("bench", bc), http.StatusCreated, &cs); err != nil {
		return 0, fmt.Errorf("uploading the certificate: %w", err)
	}
	if len(cs.Warnings) > 0 {
		return 0, fmt.Errorf("the bench certificate: %v", cs.Warnings)
	}
	return cs.ID, nil
}

// dialTLS connects to addr and completes the handshake with cfg by end
// (and within dialTimeout).
func dialTLS(addr string, cfg *tls.Config, end time.Time) (*tls.Conn, error) {
	d := net.Dialer{Timeout: dialTimeout, Deadline: end}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, cfg)
	raw.SetDeadline(earliest(end, time.Now().Add(dialTimeout)))
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	raw.SetDeadline(time.Time{})
	return c, nil
}

// tlsDialer is a dialer of TLS connections with cfg.
func tlsDialer(addr string, cfg *tls.Config) dialer {
	return func(end time.Time) (net.Conn, error) {
		c, err := dialTLS(addr, cfg, end)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// describeTLS names what a connection negotiated, e.g.
// "TLS 1.3 TLS_AES_128_GCM_SHA256 X25519".
func describeTLS(cs tls.ConnectionState) string {
	return fmt.Sprintf("%s %s %v", tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite), cs.CurveID)
}
