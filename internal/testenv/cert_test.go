package testenv

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"
)

// A leaf that a CA issued verifies against the CA's pool for its DNS name
// and IP address, carries its chain in PEM and for crypto/tls, and its key
// pairs with it.
func TestCertChain(t *testing.T) {
	ca := Cert(t, CertOptions{CA: true})
	if !ca.Cert.IsCA || ca.Cert.Subject.CommonName != "Aegis Test CA" {
		t.Fatalf("CA: IsCA %v, CN %q", ca.Cert.IsCA, ca.Cert.Subject.CommonName)
	}
	notAfter := time.Now().Add(2 * time.Hour).Truncate(time.Second)
	leaf := Cert(t, CertOptions{Names: []string{"db.test", "127.0.0.1"}, Issuer: ca, Serial: big.NewInt(42), NotAfter: notAfter})
	if leaf.Cert.SerialNumber.Int64() != 42 || !leaf.Cert.NotAfter.Equal(notAfter) || leaf.Cert.IsCA {
		t.Fatalf("leaf: serial %v, not after %v, IsCA %v", leaf.Cert.SerialNumber, leaf.Cert.NotAfter, leaf.Cert.IsCA)
	}
	for _, name := range []string{"db.test", "127.0.0.1"} {
		if _, err := leaf.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: name}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if !leaf.Cert.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) {
		t.Errorf("IP addresses %v", leaf.Cert.IPAddresses)
	}
	if leaf.ChainPEM != leaf.CertPEM+ca.CertPEM || len(leaf.TLS.Certificate) != 2 || leaf.TLS.Leaf != leaf.Cert {
		t.Errorf("chain: %d certificates for crypto/tls, ChainPEM is leaf+CA: %v", len(leaf.TLS.Certificate), leaf.ChainPEM == leaf.CertPEM+ca.CertPEM)
	}
	if _, err := tls.X509KeyPair([]byte(leaf.ChainPEM), []byte(leaf.KeyPEM)); err != nil {
		t.Errorf("the PEM chain and key do not pair: %v", err)
	}
}

// Two self-signed certificates get different serials; a given key and
// template are used as they are.
func TestCertKeyAndTemplate(t *testing.T) {
	a, b := Cert(t, CertOptions{}), Cert(t, CertOptions{})
	if a.Cert.SerialNumber.Cmp(b.Cert.SerialNumber) == 0 || a.Cert.DNSNames[0] != "localhost" {
		t.Errorf("serials %v and %v, names %v", a.Cert.SerialNumber, b.Cert.SerialNumber, a.Cert.DNSNames)
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Minute), DNSNames: []string{"t.test"}}
	c := Cert(t, CertOptions{Key: key, Template: tmpl, Names: []string{"ignored.test"}})
	if c.Cert.PublicKeyAlgorithm != x509.Ed25519 || len(c.Cert.DNSNames) != 1 || c.Cert.DNSNames[0] != "t.test" || c.Cert.ExtKeyUsage != nil {
		t.Errorf("from a template: %v %v %v", c.Cert.PublicKeyAlgorithm, c.Cert.DNSNames, c.Cert.ExtKeyUsage)
	}
}
