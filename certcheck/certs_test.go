package certcheck

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseCustomChain(t *testing.T) {
	now := time.Now()
	key := ecKeys()[2]
	p := newPKI(t, now, key)

	got, warnings, err := ParseCustom(p.fullChain(), pkcs8PEM(t, key), now)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings: %q", warnings)
	}
	if want := []string{"example.com", "www.example.com"}; !reflect.DeepEqual(got.Domains, want) {
		t.Errorf("Domains = %q, want %q", got.Domains, want)
	}
	if got.Issuer != "Aegis Test Intermediate" {
		t.Errorf("Issuer = %q", got.Issuer)
	}
	if !got.NotBefore.Equal(p.leaf.cert.NotBefore) || !got.NotAfter.Equal(p.leaf.cert.NotAfter) {
		t.Errorf("validity %v–%v, want %v–%v", got.NotBefore, got.NotAfter, p.leaf.cert.NotBefore, p.leaf.cert.NotAfter)
	}
	if got.ChainPEM != p.fullChain() {
		t.Errorf("ChainPEM =\n%s\nwant\n%s", got.ChainPEM, p.fullChain())
	}
	if got.KeyPEM != pkcs8PEM(t, key) {
		t.Errorf("KeyPEM is not the key in PKCS #8")
	}
	tc := got.Certificate
	if len(tc.Certificate) != 2 || tc.Leaf == nil || !tc.Leaf.Equal(p.leaf.cert) {
		t.Fatalf("tls.Certificate has %d certificates, leaf %v", len(tc.Certificate), tc.Leaf)
	}

	// The result serves TLS: a client that trusts only the root accepts
	// it for example.com.
	roots := x509.NewCertPool()
	roots.AddCert(p.root.cert)
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	srv := tls.Server(c1, &tls.Config{Certificates: []tls.Certificate{tc}})
	done := make(chan error, 1)
	go func() { done <- srv.Handshake() }()
	cli := tls.Client(c2, &tls.Config{RootCAs: roots, ServerName: "www.example.com"})
	if err := cli.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("server handshake: %v", err)
	}

	// The re-encoded form parses to the same result.
	again, _, err := ParseCustom(got.ChainPEM, got.KeyPEM, now)
	if err != nil {
		t.Fatal(err)
	}
	if again.ChainPEM != got.ChainPEM || again.KeyPEM != got.KeyPEM || !reflect.DeepEqual(again.Domains, got.Domains) {
		t.Error("parsing the normalized PEM gives another result")
	}
}

func TestParseCustomKeyFormats(t *testing.T) {
	now := time.Now()
	ec, rsaKey := ecKeys()[2], rsaKeys()[0]
	ecPKI, rsaPKI, edPKI := newPKI(t, now, ec), newPKI(t, now, rsaKey), newPKI(t, now, edKey())
	ecParams := "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
	mislabeled := strings.ReplaceAll(pkcs8PEM(t, rsaKey), " PRIVATE KEY", " RSA PRIVATE KEY")

	for _, tc := range []struct {
		name   string
		pki    pki
		key    crypto.Signer
		keyPEM string
	}{
		{"ECDSA PKCS #8", ecPKI, ec, pkcs8PEM(t, ec)},
		{"ECDSA SEC 1", ecPKI, ec, sec1PEM(t, ec)},
		{"ECDSA SEC 1 after EC PARAMETERS", ecPKI, ec, ecParams + sec1PEM(t, ec)},
		{"RSA PKCS #8", rsaPKI, rsaKey, pkcs8PEM(t, rsaKey)},
		{"RSA PKCS #1", rsaPKI, rsaKey, pkcs1PEM(rsaKey)},
		{"RSA PKCS #8 labelled PKCS #1", rsaPKI, rsaKey, mislabeled},
		{"Ed25519 PKCS #8", edPKI, edKey(), pkcs8PEM(t, edKey())},
		{"CRLF line ends and padding", ecPKI, ec, "\r\n  " + strings.ReplaceAll(pkcs8PEM(t, ec), "\n", "\r\n") + "\n\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, warnings, err := ParseCustom(tc.pki.fullChain(), tc.keyPEM, now)
			if err != nil {
				t.Fatal(err)
			}
			if len(warnings) != 0 {
				t.Errorf("warnings: %q", warnings)
			}
			if got.KeyPEM != pkcs8PEM(t, tc.key) {
				t.Error("KeyPEM is not the key in PKCS #8")
			}
			if pub, ok := got.Certificate.PrivateKey.(crypto.Signer); !ok || !keyMatches(got.Certificate.Leaf, pub) {
				t.Errorf("tls.Certificate holds key %T, not the leaf's", got.Certificate.PrivateKey)
			}
		})
	}
}

func TestParseCustomErrors(t *testing.T) {
	now := time.Now()
	key := ecKeys()[2]
	keyPEM := pkcs8PEM(t, key)
	p := newPKI(t, now, key)
	leaf, inter, root := p.leaf.pem(), p.inter.pem(), p.root.pem()

	expired := issue(t, leafTemplate(now.Add(-100*24*time.Hour), now.Add(-3*24*time.Hour), "old.example.com"), key, &p.inter)
	future := issue(t, leafTemplate(now.Add(5*24*time.Hour), now.Add(95*24*time.Hour), "new.example.com"), key, &p.inter)
	noName := issue(t, leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour)), key, &p.inter)
	badCN := leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour))
	badCN.Subject.CommonName = "Example Corp Server"
	badCNLeaf := issue(t, badCN, key, &p.inter)
	other := issue(t, caTemplate("Other Intermediate", now.Add(-time.Hour), now.Add(time.Hour)), ecKeys()[3], &p.root)

	damaged := []byte(leaf)
	damaged[len("-----BEGIN CERTIFICATE-----\n")+10] = '!'
	truncated := leaf[:len(leaf)/2]
	encrypted := strings.ReplaceAll(keyPEM, "PRIVATE KEY", "ENCRYPTED PRIVATE KEY")
	legacyEncrypted := strings.Replace(sec1PEM(t, key), "-----\n", "-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n", 1)
	notDER := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("not a certificate")}))
	notKeyDER := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("not a key")}))

	for _, tc := range []struct {
		name      string
		cert, key string
		field     string
		reason    string // a part of the reason
	}{
		{"empty certificate", "", keyPEM, FieldCertificate, "no PEM certificate found"},
		{"blank certificate", " \n\t\n", keyPEM, FieldCertificate, "no PEM certificate found"},
		{"garbage certificate", "hello, world", keyPEM, FieldCertificate, "unexpected text at line 1, before the first PEM block"},
		{"text before", "subject=CN=example.com\n" + leaf, keyPEM, FieldCertificate, "unexpected text at line 1"},
		{"trailing garbage", leaf + inter + "\ntrailing", keyPEM, FieldCertificate, fmt.Sprintf("unexpected text at line %d, after PEM block 2", lines(leaf+inter)+2)},
		{"text between", leaf + "x\n" + inter, keyPEM, FieldCertificate, "after PEM block 1"},
		{"damaged base64", string(damaged), keyPEM, FieldCertificate, "line 1 is malformed"},
		{"truncated", truncated, keyPEM, FieldCertificate, "has no -----END line"},
		{"damaged block then good", leaf[:len(leaf)-30] + "\n" + leaf, keyPEM, FieldCertificate, "before the next BEGIN line"},
		{"not a certificate", notDER, keyPEM, FieldCertificate, "block 1 (line 1) is not a valid certificate"},
		{"key in certificate field", leaf + keyPEM, keyPEM, FieldCertificate, fmt.Sprintf("block 2 (line %d) is a private key", lines(leaf)+1) + ", which belongs in the private_key field"},
		{"other block type", leaf + "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", keyPEM, FieldCertificate, fmt.Sprintf(`block 2 (line %d) is a "X509 CRL" block`, lines(leaf)+1)},
		{"too many", strings.Repeat(leaf, MaxChainLength+1), keyPEM, FieldCertificate, "17 certificates: at most 16 are allowed"},
		{"far too many", strings.Repeat(leaf, 100), keyPEM, FieldCertificate, "more than 16 PEM blocks"},
		{"reversed chain", inter + leaf, keyPEM, FieldCertificate, "the private key belongs to certificate 2 (example.com), not to the first"},
		{"root before the intermediate", leaf + root + inter, keyPEM, FieldCertificate,
			"the chain is out of order: certificate 2 (Aegis Test Root) did not issue certificate 1 (example.com)"},
		{"reversed CA chain", root + inter, pkcs8PEM(t, p.root.key), FieldCertificate,
			"the chain is out of order (the chain looks reversed): certificate 2 (Aegis Test Intermediate) did not issue certificate 1 (Aegis Test Root)"},
		{"foreign intermediate", leaf + other.pem(), keyPEM, FieldCertificate,
			"the chain is out of order: certificate 2 (Other Intermediate) did not issue certificate 1 (example.com)"},
		{"leaf twice", leaf + leaf, keyPEM, FieldCertificate, "did not issue certificate 1"},
		{"expired", expired.pem() + inter, keyPEM, FieldCertificate, "expired on " + stamp(expired.cert.NotAfter) + " (3 days ago)"},
		{"not yet valid", future.pem() + inter, keyPEM, FieldCertificate, "not valid until " + stamp(future.cert.NotBefore) + " (in 5 days)"},
		{"no name", noName.pem() + inter, keyPEM, FieldCertificate, "names no domain"},
		{"common name not a domain", badCNLeaf.pem() + inter, keyPEM, FieldCertificate, "names no domain"},

		{"key mismatch", leaf + inter, pkcs8PEM(t, ecKeys()[3]), FieldPrivateKey, "does not match the certificate (leaf for example.com)"},
		{"key of another type", leaf + inter, pkcs1PEM(rsaKeys()[1]), FieldPrivateKey,
			"does not match the certificate (leaf for example.com): the key is RSA 2048-bit, the certificate's is ECDSA P-256"},
		{"empty key", leaf + inter, "", FieldPrivateKey, "no PEM private key found"},
		{"garbage key", leaf + inter, "not a key", FieldPrivateKey, "unexpected text at line 1"},
		{"key not DER", leaf + inter, notKeyDER, FieldPrivateKey, "not a valid PKCS #8, PKCS #1 or SEC 1 private key"},
		{"encrypted PKCS #8", leaf + inter, encrypted, FieldPrivateKey, "is encrypted"},
		{"encrypted legacy", leaf + inter, legacyEncrypted, FieldPrivateKey, "is encrypted"},
		{"two keys", leaf + inter, keyPEM + keyPEM, FieldPrivateKey, "2 PEM blocks"},
		{"certificate as key", leaf + inter, leaf, FieldPrivateKey, "holds a certificate"},
		{"public key", leaf + inter, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", FieldPrivateKey, `the PEM block is "PUBLIC KEY"`},
		{"OpenSSH key", leaf + inter, "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n", FieldPrivateKey, "OpenSSH"},
		{"key after text", leaf + inter, "key:\n" + keyPEM, FieldPrivateKey, "unexpected text at line 1"},
		{"key too large", leaf + inter, strings.Repeat(" ", MaxPEMSize+1), FieldPrivateKey, "at most 1048576 are allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, warnings, err := ParseCustom(tc.cert, tc.key, now)
			if err == nil {
				t.Fatalf("accepted: domains %q, warnings %q", got.Domains, warnings)
			}
			if got != nil || warnings != nil {
				t.Errorf("an error with a result %v or warnings %q", got, warnings)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v (%T) is not a *FieldError", err, err)
			}
			if fe.Field != tc.field || !strings.Contains(fe.Reason, tc.reason) {
				t.Errorf("error %q\nwant field %s, reason containing %q", err, tc.field, tc.reason)
			}
			if err.Error() != fe.Field+": "+fe.Reason {
				t.Errorf("Error() = %q", err)
			}
			for _, secret := range []string{pemBody(keyPEM), pemBody(keyPEM)[:20]} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("the message quotes the private key: %q", err)
				}
			}
		})
	}
}

// lines is the number of lines of a text that ends with a newline.
func lines(s string) int { return strings.Count(s, "\n") }

func TestParseCustomWarnings(t *testing.T) {
	now := time.Now()
	key := ecKeys()[2]
	keyPEM := pkcs8PEM(t, key)
	p := newPKI(t, now, key)

	soon := issue(t, leafTemplate(now.Add(-80*24*time.Hour), now.Add(10*24*time.Hour), "soon.example.com"), key, &p.inter)
	self := issue(t, leafTemplate(now.Add(-time.Hour), now.Add(365*24*time.Hour), "self.example.com"), key, nil)
	cnOnly := leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour))
	cnOnly.Subject.CommonName = "Legacy.Example.com"
	cnLeaf := issue(t, cnOnly, key, &p.inter)
	oldInter := issue(t, caTemplate("Old Intermediate", now.Add(-400*24*time.Hour), now.Add(-24*time.Hour)), ecKeys()[1], &p.root)
	underOld := issue(t, leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour), "example.com"), key, &oldInter)
	clientOnly := leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour), "client.example.com")
	clientOnly.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	clientLeaf := issue(t, clientOnly, key, &p.inter)
	ipLeaf := issue(t, leafTemplate(now.Add(-time.Hour), now.Add(90*24*time.Hour), "DB.Example.com", "10.0.0.7", "db.example.com", "2001:db8::1"), key, &p.inter)

	for _, tc := range []struct {
		name     string
		cert     string
		domains  []string
		warnings []string // a part of each warning, in order
	}{
		{"expires in 10 days", soon.pem() + p.inter.pem(), []string{"soon.example.com"},
			[]string{"certificate: expires on " + stamp(soon.cert.NotAfter) + " (in 10 days)"}},
		{"leaf alone", p.leaf.pem(), []string{"example.com", "www.example.com"},
			[]string{"certificate: only the leaf is given"}},
		{"self-signed alone", self.pem(), []string{"self.example.com"}, nil},
		{"root included", p.fullChain() + p.root.pem(), []string{"example.com", "www.example.com"}, nil},
		{"common name only", cnLeaf.pem() + p.inter.pem(), []string{"legacy.example.com"},
			[]string{`certificate: the leaf has no subject alternative names, only the common name "legacy.example.com"`}},
		{"expired intermediate", underOld.pem() + oldInter.pem(), []string{"example.com"},
			[]string{"certificate: certificate 2 (Old Intermediate) expired on"}},
		{"client certificate", clientLeaf.pem() + p.inter.pem(), []string{"client.example.com"},
			[]string{"certificate: the leaf is not for TLS servers"}},
		{"IP addresses", ipLeaf.pem() + p.inter.pem(), []string{"db.example.com", "10.0.0.7", "2001:db8::1"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, warnings, err := ParseCustom(tc.cert, keyPEM, now)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got.Domains, tc.domains) {
				t.Errorf("Domains = %q, want %q", got.Domains, tc.domains)
			}
			if len(warnings) != len(tc.warnings) {
				t.Fatalf("warnings %q, want %d", warnings, len(tc.warnings))
			}
			for i, w := range tc.warnings {
				if !strings.HasPrefix(warnings[i], w) {
					t.Errorf("warning %q, want it to begin %q", warnings[i], w)
				}
			}
		})
	}
}

// TestParseCustomValidityBounds checks the instants where validity starts
// and ends, and where the warning starts.
func TestParseCustomValidityBounds(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	key := ecKeys()[2]
	p := newPKI(t, now, key)
	notAfter := now.Add(60 * 24 * time.Hour)
	leaf := issue(t, leafTemplate(now, notAfter, "edge.example.com"), key, &p.inter)
	chain := leaf.pem() + p.inter.pem()
	keyPEM := pkcs8PEM(t, key)

	for _, tc := range []struct {
		at       time.Time
		ok       bool
		warnings int
	}{
		{now.Add(-time.Second), false, 0},
		{now, true, 0},
		{notAfter.Add(-ExpiryWarning - time.Second), true, 0},
		{notAfter.Add(-ExpiryWarning + time.Second), true, 1},
		{notAfter, true, 1},
		{notAfter.Add(time.Second), false, 0},
	} {
		_, warnings, err := ParseCustom(chain, keyPEM, tc.at)
		if (err == nil) != tc.ok || len(warnings) != tc.warnings {
			t.Errorf("at %v: error %v, warnings %q; want ok %v, %d warnings", tc.at, err, warnings, tc.ok, tc.warnings)
		}
	}
}

func TestSpan(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{500 * time.Millisecond, "500ms"},
		{90 * time.Second, "1m30s"},
		{5*time.Hour + 10*time.Minute, "5h0m0s"},
		{30 * time.Hour, "1 day"},
		{10 * 24 * time.Hour, "10 days"},
		{10*24*time.Hour - time.Minute, "10 days"},
		{40 * time.Hour, "2 days"},
	} {
		if got := span(tc.d); got != tc.want {
			t.Errorf("span(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}
