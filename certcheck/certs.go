// Package certcheck validates the certificates that streams terminate TLS with:
// custom certificates uploaded as PEM (ParseCustom) and the domain names of
// managed certificates, which Caddy's TLS automation obtains (ValidateDomains).
//
// The package imports no Caddy package and keeps no state: the admin API
// calls it before anything is stored, the storage package stores what it
// returns, and the streams app loads the result into its TLS configuration.
//
// Errors are *FieldError values naming the request field at fault
// ("certificate", "private_key" or "domains") with a plain reason; they
// never quote private key material.
package certcheck

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Field names a FieldError reports: the JSON fields of an upload request
// ({"name", "certificate", "private_key"}) and of a managed certificate
// ({"name", "domains"}).
const (
	FieldCertificate = "certificate"
	FieldPrivateKey  = "private_key"
	FieldDomains     = "domains"
)

// ExpiryWarning is how close to its expiry a certificate may be before
// ParseCustom warns about it.
const ExpiryWarning = 30 * 24 * time.Hour

// Limits on what ParseCustom reads, so that a request cannot make it parse
// without end. A full chain with RSA-4096 keys is under 10 KiB.
const (
	// MaxPEMSize is the most bytes the certificate and the private_key
	// field may each hold.
	MaxPEMSize = 1 << 20

	// MaxChainLength is the most certificates the certificate field may
	// hold.
	MaxChainLength = 16
)

// FieldError is a validation error: the request field at fault and why.
// Its message is "field: reason", for example
// "private_key: does not match the certificate (leaf for example.com)".
type FieldError struct {
	// Field is FieldCertificate, FieldPrivateKey or FieldDomains.
	Field string

	// Reason says what is wrong, in plain words; it does not repeat Field.
	Reason string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Reason }

func fieldErr(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// Parsed is a custom certificate that passed ParseCustom.
type Parsed struct {
	// Certificate is the chain and private key, ready for a tls.Config:
	// Certificate holds the DER of each certificate, leaf first, and Leaf
	// is set.
	Certificate tls.Certificate

	// Domains are the names the leaf is valid for: its DNS names
	// (lowercased) then its IP addresses, without duplicates. For a leaf
	// without subject alternative names, its common name.
	Domains []string

	// Issuer is the common name of the leaf's issuer or, when it has none,
	// the issuer's full distinguished name.
	Issuer string

	// NotBefore and NotAfter bound the leaf's validity.
	NotBefore, NotAfter time.Time

	// ChainPEM is the chain re-encoded: one CERTIFICATE block per
	// certificate, leaf first, nothing else.
	ChainPEM string

	// KeyPEM is the private key re-encoded as one PKCS #8 "PRIVATE KEY"
	// block, whatever form it was given in. It is secret: store it sealed
	// and never return it.
	KeyPEM string
}

// ParseCustom validates an uploaded certificate chain and private key, as
// of now, and returns them parsed, with warnings that do not prevent their
// use (plain sentences, for the operator). Errors are *FieldError.
//
// certPEM must hold only PEM CERTIFICATE blocks, separated by white space:
// the leaf first, then each certificate's issuer in turn (the root may be
// left out). Any other text or block, including one before the first
// certificate (such as the "subject=" lines that some openssl commands
// print), is an error that says where it is.
//
// keyPEM must hold exactly one unencrypted private key: PKCS #8
// ("PRIVATE KEY"; RSA, ECDSA or Ed25519), PKCS #1 ("RSA PRIVATE KEY") or
// SEC 1 ("EC PRIVATE KEY", which may follow an "EC PARAMETERS" block as
// openssl ecparam writes it). The key must belong to the leaf.
//
// Each certificate must be issued, and its signature made, by the next one.
// The leaf must be valid at now: not yet valid or expired is an error;
// expiring within ExpiryWarning is a warning, as are an expired
// intermediate, a leaf whose extended key usage excludes TLS servers, and a
// chain that holds only a leaf that is not self-signed.
//
// A leaf without subject alternative names is accepted when its common
// name is a valid DNS name or IP address (Domains is then that name), with
// a warning: most TLS clients, browsers and Go's among them, no longer read
// the common name. A leaf with neither is refused.
func ParseCustom(certPEM, keyPEM string, now time.Time) (*Parsed, []string, error) {
	chain, err := parseChain(certPEM)
	if err != nil {
		return nil, nil, err
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, nil, err
	}
	leaf := chain[0]

	if !keyMatches(leaf, key) {
		for i, c := range chain[1:] {
			if keyMatches(c, key) {
				return nil, nil, fieldErr(FieldCertificate,
					"the private key belongs to certificate %d (%s), not to the first: list the leaf first, then each certificate's issuer",
					i+2, describe(c))
			}
		}
		reason := fmt.Sprintf("does not match the certificate (leaf for %s)", describe(leaf))
		if kt, ct := keyType(key.Public()), keyType(leaf.PublicKey); kt != ct {
			reason += fmt.Sprintf(": the key is %s, the certificate's is %s", kt, ct)
		}
		return nil, nil, &FieldError{Field: FieldPrivateKey, Reason: reason}
	}

	if err := checkOrder(chain); err != nil {
		return nil, nil, err
	}

	var warnings []string
	switch {
	case now.Before(leaf.NotBefore):
		return nil, nil, fieldErr(FieldCertificate, "not valid until %s (in %s)",
			stamp(leaf.NotBefore), span(leaf.NotBefore.Sub(now)))
	case now.After(leaf.NotAfter):
		return nil, nil, fieldErr(FieldCertificate, "expired on %s (%s ago)",
			stamp(leaf.NotAfter), span(now.Sub(leaf.NotAfter)))
	case leaf.NotAfter.Sub(now) < ExpiryWarning:
		warnings = append(warnings, fmt.Sprintf("certificate: expires on %s (in %s)",
			stamp(leaf.NotAfter), span(leaf.NotAfter.Sub(now))))
	}
	for i, c := range chain[1:] {
		if now.After(c.NotAfter) {
			warnings = append(warnings, fmt.Sprintf("certificate: certificate %d (%s) expired on %s; clients that need it will refuse the chain",
				i+2, describe(c), stamp(c.NotAfter)))
		}
	}
	if len(leaf.ExtKeyUsage) > 0 && !slices.ContainsFunc(leaf.ExtKeyUsage, func(u x509.ExtKeyUsage) bool {
		return u == x509.ExtKeyUsageServerAuth || u == x509.ExtKeyUsageAny
	}) {
		warnings = append(warnings, "certificate: the leaf is not for TLS servers (its extended key usage lacks serverAuth); most clients will refuse it")
	}
	if len(chain) == 1 && !selfSigned(leaf) {
		warnings = append(warnings, "certificate: only the leaf is given; unless clients already have them, add the intermediate certificates after it (the full chain)")
	}

	domains := leafDomains(leaf)
	if len(domains) == 0 {
		cn := strings.ToLower(leaf.Subject.CommonName)
		if cn == "" || checkName(cn) != nil {
			return nil, nil, fieldErr(FieldCertificate,
				"the leaf (%s) names no domain: it has no subject alternative names and no common name that is a domain or IP address", describe(leaf))
		}
		domains = []string{cn}
		warnings = append(warnings, fmt.Sprintf("certificate: the leaf has no subject alternative names, only the common name %q, which most TLS clients ignore", cn))
	}

	var chainPEM bytes.Buffer
	raw := make([][]byte, len(chain))
	for i, c := range chain {
		raw[i] = c.Raw
		pem.Encode(&chainPEM, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}) // writes to a buffer: cannot fail
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fieldErr(FieldPrivateKey, "cannot be re-encoded: %v", err)
	}

	issuer := leaf.Issuer.CommonName
	if issuer == "" {
		issuer = leaf.Issuer.String()
	}
	return &Parsed{
		Certificate: tls.Certificate{Certificate: raw, PrivateKey: key, Leaf: leaf},
		Domains:     domains,
		Issuer:      issuer,
		NotBefore:   leaf.NotBefore,
		NotAfter:    leaf.NotAfter,
		ChainPEM:    chainPEM.String(),
		KeyPEM:      string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})),
	}, warnings, nil
}

// parseChain reads the certificate field.
func parseChain(certPEM string) ([]*x509.Certificate, error) {
	blocks, err := splitPEM(FieldCertificate, certPEM)
	if err != nil {
		return nil, err
	}
	if len(blocks) == 0 {
		return nil, fieldErr(FieldCertificate, "no PEM certificate found: paste the certificate from its BEGIN CERTIFICATE line to its END CERTIFICATE line")
	}
	if len(blocks) > MaxChainLength {
		return nil, fieldErr(FieldCertificate, "%d certificates: at most %d are allowed", len(blocks), MaxChainLength)
	}
	chain := make([]*x509.Certificate, 0, len(blocks))
	for i, b := range blocks {
		if b.Type != "CERTIFICATE" {
			what := fmt.Sprintf("a %q block", b.Type)
			if strings.Contains(b.Type, "PRIVATE KEY") {
				what = "a private key, which belongs in the private_key field"
			}
			return nil, fieldErr(FieldCertificate, "block %d (line %d) is %s; only CERTIFICATE blocks are allowed", i+1, b.line, what)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fieldErr(FieldCertificate, "block %d (line %d) is not a valid certificate: %v", i+1, b.line, err)
		}
		chain = append(chain, c)
	}
	return chain, nil
}

// checkOrder checks that each certificate was issued by the next.
func checkOrder(chain []*x509.Certificate) error {
	for i := 0; i+1 < len(chain); i++ {
		child, parent := chain[i], chain[i+1]
		if err := child.CheckSignatureFrom(parent); err != nil {
			reversed := ""
			if parent.CheckSignatureFrom(child) == nil {
				reversed = " (the chain looks reversed)"
			}
			detail := err.Error()
			if !bytes.Equal(child.RawIssuer, parent.RawSubject) {
				detail = fmt.Sprintf("certificate %d's issuer is %q", i+1, child.Issuer.String())
			}
			return fieldErr(FieldCertificate,
				"the chain is out of order%s: certificate %d (%s) did not issue certificate %d (%s): %s; list the leaf first, then each certificate's issuer",
				reversed, i+2, describe(parent), i+1, describe(child), detail)
		}
	}
	return nil
}

func selfSigned(c *x509.Certificate) bool {
	// CheckSignatureFrom would refuse a leaf that is not a CA as its own
	// issuer.
	return bytes.Equal(c.RawIssuer, c.RawSubject) &&
		c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

// leafDomains are c's DNS names, lowercased, then its IP addresses, without
// duplicates.
func leafDomains(c *x509.Certificate) []string {
	var out []string
	for _, n := range c.DNSNames {
		if n = strings.ToLower(n); !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	for _, ip := range c.IPAddresses {
		if n := ip.String(); !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// describe names a certificate for a message: its first name, its common
// name or its subject.
func describe(c *x509.Certificate) string {
	switch {
	case len(c.DNSNames) > 0:
		return c.DNSNames[0]
	case len(c.IPAddresses) > 0:
		return c.IPAddresses[0].String()
	case c.Subject.CommonName != "":
		return c.Subject.CommonName
	case len(c.RawSubject) > 2: // more than an empty SEQUENCE
		return c.Subject.String()
	}
	return "no subject"
}

func keyMatches(c *x509.Certificate, key crypto.Signer) bool {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(c.PublicKey)
}

func keyType(pub any) string {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d-bit", k.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return fmt.Sprintf("%T", pub)
}

// stamp formats a time for a message.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") }

// span formats a duration for a message, in whole days (rounded) once it
// is a day or more.
func span(d time.Duration) string {
	switch days := int64(math.Round(d.Hours() / 24)); {
	case d >= 24*time.Hour && days > 1:
		return fmt.Sprintf("%d days", days)
	case d >= 24*time.Hour:
		return "1 day"
	case d >= time.Hour:
		return d.Truncate(time.Hour).String()
	case d >= time.Second:
		return d.Truncate(time.Second).String()
	}
	return d.String()
}
