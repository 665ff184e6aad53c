package certcheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strings"
)

// block is a PEM block and the line it begins on (from 1).
type block struct {
	*pem.Block
	line int
}

const (
	beginMarker = "-----BEGIN "
	endMarker   = "-----END "
	dashes      = "-----"
)

// splitPEM reads s as PEM blocks separated by white space and nothing else.
// Unlike pem.Decode, which skips text it does not understand (and with it a
// damaged block), any such text is an error that gives its line. Messages
// never quote the text, which may be key material.
func splitPEM(field, s string) ([]block, error) {
	if len(s) > MaxPEMSize {
		return nil, fieldErr(field, "%d bytes: at most %d are allowed", len(s), MaxPEMSize)
	}
	var blocks []block
	rest := s
	for {
		trimmed := strings.TrimLeft(rest, " \t\r\n")
		if trimmed == "" {
			return blocks, nil
		}
		line := 1 + strings.Count(s[:len(s)-len(trimmed)], "\n")
		if !strings.HasPrefix(trimmed, beginMarker) {
			where := "before the first PEM block"
			if len(blocks) > 0 {
				where = "after PEM block " + fmt.Sprint(len(blocks))
			}
			return nil, fieldErr(field, "unexpected text at line %d, %s; the field must hold only PEM blocks", line, where)
		}
		// The block ends at the end of its END line: "-----END TYPE-----".
		end := strings.Index(trimmed, endMarker)
		if end < 0 {
			return nil, fieldErr(field, "PEM block at line %d has no -----END line", line)
		}
		closing := strings.Index(trimmed[end+len(endMarker):], dashes)
		if closing < 0 {
			return nil, fieldErr(field, "PEM block at line %d has a malformed -----END line", line)
		}
		n := end + len(endMarker) + closing + len(dashes)
		// With one BEGIN in the segment, pem.Decode cannot skip a damaged
		// block and return a later one.
		if strings.Count(trimmed[:n], beginMarker) != 1 {
			return nil, fieldErr(field, "PEM block at line %d has no END line before the next BEGIN line", line)
		}
		b, after := pem.Decode([]byte(trimmed[:n]))
		if b == nil || strings.TrimSpace(string(after)) != "" {
			return nil, fieldErr(field, "PEM block at line %d is malformed (damaged base64, or BEGIN and END lines that differ)", line)
		}
		blocks = append(blocks, block{Block: b, line: line})
		if len(blocks) > MaxChainLength+1 { // more than any valid input
			return nil, fieldErr(field, "more than %d PEM blocks", MaxChainLength)
		}
		rest = trimmed[n:]
	}
}

// parseKey reads the private_key field: one private key, optionally after
// an EC PARAMETERS block.
func parseKey(keyPEM string) (crypto.Signer, error) {
	blocks, err := splitPEM(FieldPrivateKey, keyPEM)
	if err != nil {
		return nil, err
	}
	if len(blocks) > 0 && blocks[0].Type == "EC PARAMETERS" {
		blocks = blocks[1:]
	}
	if len(blocks) == 0 {
		return nil, fieldErr(FieldPrivateKey, "no PEM private key found: paste the key from its BEGIN line (BEGIN PRIVATE KEY, BEGIN EC PRIVATE KEY or BEGIN RSA PRIVATE KEY) to its END line")
	}
	if len(blocks) > 1 {
		return nil, fieldErr(FieldPrivateKey, "%d PEM blocks; the field must hold exactly one private key", len(blocks))
	}
	b := blocks[0]
	switch {
	case b.Type == "ENCRYPTED PRIVATE KEY" || b.Headers["Proc-Type"] != "" || b.Headers["DEK-Info"] != "":
		return nil, fieldErr(FieldPrivateKey, "is encrypted; upload it decrypted (for example: openssl pkey -in key.pem -out key-plain.pem)")
	case b.Type == "CERTIFICATE":
		return nil, fieldErr(FieldPrivateKey, "holds a certificate, which belongs in the certificate field")
	case b.Type == "OPENSSH PRIVATE KEY":
		return nil, fieldErr(FieldPrivateKey, "is an OpenSSH key; TLS needs a PKCS #8, PKCS #1 or SEC 1 key")
	case !strings.HasSuffix(b.Type, "PRIVATE KEY"):
		return nil, fieldErr(FieldPrivateKey, "the PEM block is %q, not a private key", b.Type)
	}

	// Try the form the label names first, then the others, as the label
	// is sometimes wrong.
	parsers := []func([]byte) (any, error){parsePKCS8, parsePKCS1, parseSEC1}
	switch b.Type {
	case "RSA PRIVATE KEY":
		parsers[0], parsers[1] = parsers[1], parsers[0]
	case "EC PRIVATE KEY":
		parsers[0], parsers[2] = parsers[2], parsers[0]
	}
	var first error
	for _, parse := range parsers {
		k, err := parse(b.Bytes)
		if err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		switch k := k.(type) {
		case *rsa.PrivateKey, *ecdsa.PrivateKey, ed25519.PrivateKey:
			return k.(crypto.Signer), nil
		default:
			return nil, fieldErr(FieldPrivateKey, "is a %T key, which cannot sign; TLS needs an RSA, ECDSA or Ed25519 key", k)
		}
	}
	return nil, fieldErr(FieldPrivateKey, "not a valid PKCS #8, PKCS #1 or SEC 1 private key: %v", first)
}

func parsePKCS8(der []byte) (any, error) { return x509.ParsePKCS8PrivateKey(der) }
func parsePKCS1(der []byte) (any, error) { return x509.ParsePKCS1PrivateKey(der) }
func parseSEC1(der []byte) (any, error)  { return x509.ParseECPrivateKey(der) }
