package certcheck

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fuzzNow is the time FuzzParseCustom validates at; the committed corpus in
// testdata/fuzz/FuzzParseCustom holds chains valid then.
var fuzzNow = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

// FuzzParseCustom checks that ParseCustom never panics, returns either a
// result or a *FieldError for a known field, and that what it accepts it
// accepts again in its normalized form.
func FuzzParseCustom(f *testing.F) {
	ec, rsaKey := ecKeys()[2], rsaKeys()[0]
	p := newPKI(f, fuzzNow, ec)
	rp := newPKI(f, fuzzNow, rsaKey)
	keyPEM := pkcs8PEM(f, ec)
	for _, seed := range [][2]string{
		{p.fullChain(), keyPEM},
		{p.fullChain(), sec1PEM(f, ec)},
		{p.fullChain() + p.root.pem(), keyPEM},
		{p.leaf.pem(), keyPEM},
		{p.inter.pem() + p.leaf.pem(), keyPEM},
		{rp.fullChain(), pkcs1PEM(rsaKey)},
		{rp.fullChain(), pkcs8PEM(f, rsaKey)},
		{p.fullChain(), pkcs1PEM(rsaKey)},
		{p.fullChain() + "junk", keyPEM},
		{"", ""},
		{"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n", "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n"},
		{"-----BEGIN CERTIFICATE-----\nAAAA\n-----BEGIN CERTIFICATE-----\n", "-----BEGIN EC PARAMETERS-----\n-----END"},
	} {
		f.Add(seed[0], seed[1])
	}

	f.Fuzz(func(t *testing.T, certPEM, keyPEM string) {
		got, warnings, err := ParseCustom(certPEM, keyPEM, fuzzNow)
		if err != nil {
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v (%T) is not a *FieldError", err, err)
			}
			switch fe.Field {
			case FieldCertificate, FieldPrivateKey:
			default:
				t.Fatalf("error for field %q", fe.Field)
			}
			if got != nil || warnings != nil {
				t.Fatal("an error with a result")
			}
			return
		}
		if got == nil || got.Certificate.Leaf == nil || got.Certificate.PrivateKey == nil ||
			len(got.Certificate.Certificate) == 0 || len(got.Domains) == 0 {
			t.Fatalf("incomplete result %+v", got)
		}
		if fuzzNow.Before(got.NotBefore) || fuzzNow.After(got.NotAfter) {
			t.Fatalf("accepted a leaf valid %v–%v", got.NotBefore, got.NotAfter)
		}
		if !strings.HasPrefix(got.KeyPEM, "-----BEGIN PRIVATE KEY-----\n") {
			t.Fatal("KeyPEM is not PKCS #8")
		}
		again, warnings2, err := ParseCustom(got.ChainPEM, got.KeyPEM, fuzzNow)
		if err != nil {
			t.Fatalf("the normalized form is refused: %v", err)
		}
		if again.ChainPEM != got.ChainPEM || again.KeyPEM != got.KeyPEM ||
			!reflect.DeepEqual(again.Domains, got.Domains) || !reflect.DeepEqual(warnings2, warnings) {
			t.Fatal("the normalized form parses differently")
		}
	})
}
