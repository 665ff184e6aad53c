package certcheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// Keys are generated once per test binary: RSA generation is slow under
// the race detector.
var (
	rsaKeys = sync.OnceValue(func() [2]*rsa.PrivateKey {
		var ks [2]*rsa.PrivateKey
		for i := range ks {
			k, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				panic(err)
			}
			ks[i] = k
		}
		return ks
	})
	ecKeys = sync.OnceValue(func() [4]*ecdsa.PrivateKey {
		var ks [4]*ecdsa.PrivateKey
		for i := range ks {
			k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				panic(err)
			}
			ks[i] = k
		}
		return ks
	})
	edKey = sync.OnceValue(func() ed25519.PrivateKey {
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			panic(err)
		}
		return k
	})
)

// issued is a certificate with its key.
type issued struct {
	cert *x509.Certificate
	key  crypto.Signer
	made *testenv.Issued
}

func (c issued) pem() string { return c.made.CertPEM }

// issue makes a certificate from tmpl for key, signed by parent (self-signed
// when parent is nil).
func issue(tb testing.TB, tmpl *x509.Certificate, key crypto.Signer, parent *issued) issued {
	tb.Helper()
	var issuer *testenv.Issued
	if parent != nil {
		issuer = parent.made
	}
	c := testenv.Cert(tb, testenv.CertOptions{Template: tmpl, Key: key, Issuer: issuer})
	return issued{cert: c.Cert, key: key, made: c}
}

func caTemplate(cn string, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"Aegis Test"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

func leafTemplate(notBefore, notAfter time.Time, names ...string) *x509.Certificate {
	t := &x509.Certificate{
		NotBefore:   notBefore,
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if len(names) > 0 {
		t.Subject.CommonName = names[0]
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			t.IPAddresses = append(t.IPAddresses, ip)
		} else {
			t.DNSNames = append(t.DNSNames, n)
		}
	}
	return t
}

// pki is a root, an intermediate it issued and a leaf the intermediate
// issued, for example.com, valid around now.
type pki struct {
	root, inter, leaf issued
}

func newPKI(tb testing.TB, now time.Time, leafKey crypto.Signer) pki {
	tb.Helper()
	var p pki
	ks := ecKeys()
	p.root = issue(tb, caTemplate("Aegis Test Root", now.Add(-48*time.Hour), now.Add(10*365*24*time.Hour)), ks[0], nil)
	p.inter = issue(tb, caTemplate("Aegis Test Intermediate", now.Add(-48*time.Hour), now.Add(5*365*24*time.Hour)), ks[1], &p.root)
	p.leaf = issue(tb, leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour), "example.com", "www.example.com"), leafKey, &p.inter)
	return p
}

// fullChain is the leaf then the intermediate.
func (p pki) fullChain() string { return p.leaf.pem() + p.inter.pem() }

func pkcs8PEM(tb testing.TB, key crypto.Signer) string {
	tb.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

func pkcs1PEM(key *rsa.PrivateKey) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
}

func sec1PEM(tb testing.TB, key *ecdsa.PrivateKey) string {
	tb.Helper()
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}))
}

// pemBody is the base64 body of a PEM text, without line breaks: what must
// never appear in a message.
func pemBody(s string) string {
	var body []string
	for _, l := range strings.Split(s, "\n") {
		if l != "" && !strings.HasPrefix(l, "-----") {
			body = append(body, l)
		}
	}
	return strings.Join(body, "")
}
