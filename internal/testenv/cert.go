package testenv

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"testing"
	"time"
)

// CertOptions says what Cert makes. The zero value is a self-signed server
// certificate for "localhost" with a new ECDSA P-256 key, valid from an
// hour ago for a day.
type CertOptions struct {
	// Names are the DNS names and IP addresses the certificate is for; the
	// first is also its common name.
	Names []string
	// CA makes a certificate authority (it may sign certificates) instead
	// of a server certificate. Its common name is Names[0], or
	// "Aegis Test CA".
	CA bool
	// Issuer signs the certificate; nil makes it self-signed.
	Issuer *Issued
	// Key is the certificate's key; nil makes a new ECDSA P-256 key.
	Key crypto.Signer
	// NotBefore and NotAfter default to an hour ago and a day from now.
	NotBefore, NotAfter time.Time
	// Serial defaults to a random 120-bit number.
	Serial *big.Int
	// Template, when set, is the certificate to make as it is (with Serial
	// or a random serial when it has none): Names, CA, NotBefore and
	// NotAfter are then not used.
	Template *x509.Certificate
}

// Issued is a certificate Cert made, with its key, in the forms tests use.
type Issued struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// CertPEM is this certificate alone; ChainPEM is it followed by its
	// issuer's ChainPEM.
	CertPEM, ChainPEM string
	// KeyPEM is the key as PKCS #8.
	KeyPEM string
	// TLS is the certificates of ChainPEM and the key as crypto/tls
	// serves them, with Leaf set.
	TLS tls.Certificate
}

// Pool returns a pool that trusts this certificate.
func (c *Issued) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Cert)
	return p
}

// Cert makes a certificate as o says, failing the test on any error. It is
// the one certificate maker of the tests of every package.
func Cert(t testing.TB, o CertOptions) *Issued {
	t.Helper()
	key := o.Key
	if key == nil {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		key = k
	}
	tmpl := o.Template
	if tmpl == nil {
		tmpl = certTemplate(o)
	}
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = o.Serial
	}
	if tmpl.SerialNumber == nil {
		n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
		if err != nil {
			t.Fatal(err)
		}
		tmpl.SerialNumber = n.Add(n, big.NewInt(1))
	}
	parent, signer := tmpl, key
	if o.Issuer != nil {
		parent, signer = o.Issuer.Cert, o.Issuer.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c := &Issued{
		Cert:    cert,
		Key:     key,
		CertPEM: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		KeyPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})),
		TLS:     tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert},
	}
	c.ChainPEM = c.CertPEM
	if o.Issuer != nil {
		c.ChainPEM += o.Issuer.ChainPEM
		c.TLS.Certificate = append(c.TLS.Certificate, o.Issuer.TLS.Certificate...)
	}
	return c
}

// certTemplate is the certificate o describes, without a serial.
func certTemplate(o CertOptions) *x509.Certificate {
	now := time.Now()
	tmpl := &x509.Certificate{
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		BasicConstraintsValid: true,
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = now.Add(-time.Hour)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = now.Add(24 * time.Hour)
	}
	names := o.Names
	if len(names) == 0 && !o.CA {
		names = []string{"localhost"}
	}
	if len(names) > 0 {
		tmpl.Subject = pkix.Name{CommonName: names[0]}
	}
	if o.CA {
		if len(names) == 0 {
			tmpl.Subject = pkix.Name{CommonName: "Aegis Test CA"}
		}
		tmpl.IsCA = true
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
		return tmpl
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	return tmpl
}
