package storage

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// testKey is the encryption key of newKeyedStore.
var testKey = bytes.Repeat([]byte{0x5a, 0xa5}, KeySize/2)

// newKeyedStore opens a store with testKey on a new file in t.TempDir,
// closed at cleanup, and returns it with the file's path.
func newKeyedStore(t *testing.T) (*SQLite, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "aegis.db")
	s, err := OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// testCert is a self-signed certificate and its key, in PEM and DER.
type testCert struct {
	certPEM, keyPEM string
	certDER, keyDER []byte
}

func makeCert(t *testing.T, key crypto.Signer, name string) testCert {
	t.Helper()
	c := testenv.Cert(t, testenv.CertOptions{Names: []string{name}, Key: key, NotAfter: time.Now().Add(90 * 24 * time.Hour)})
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return testCert{certPEM: c.CertPEM, keyPEM: c.KeyPEM, certDER: c.Cert.Raw, keyDER: keyDER}
}

func ecCert(t *testing.T, name string) testCert {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return makeCert(t, k, name)
}

func rsaCert(t *testing.T, name string) testCert {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return makeCert(t, k, name)
}

// customCert is a Certificate for tc, as an upload would store it.
func customCert(tc testCert, name string) spec.Certificate {
	c, err := x509.ParseCertificate(tc.certDER)
	if err != nil {
		panic(err)
	}
	return spec.Certificate{
		Name:           name,
		Source:         spec.SourceCustom,
		Domains:        c.DNSNames,
		Issuer:         c.Issuer.CommonName,
		NotBefore:      jsontime.Of(c.NotBefore),
		NotAfter:       jsontime.Of(c.NotAfter),
		CertificatePEM: tc.certPEM,
	}
}

func TestCertificateRoundTrip(t *testing.T) { eachBackend(t, testCertificateRoundTrip) }

func testCertificateRoundTrip(t *testing.T, b testBackend) {
	s, _ := b.keyed(t)
	ctx := context.Background()
	before := time.Now().Add(-time.Millisecond)
	tc := ecCert(t, "db.example.com")

	in := customCert(tc, "db")
	in.NotBefore = jsontime.Of(in.NotBefore.Add(123456789 * time.Nanosecond).In(time.FixedZone("X", 3600))) // stored to the ms, in UTC
	custom, err := s.CreateCertificate(ctx, in, []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	if custom.ID <= 0 || custom.CreatedAt.Before(before) || !custom.UpdatedAt.Equal(custom.CreatedAt.Time) {
		t.Errorf("created %+v", custom)
	}
	want := in
	want.ID, want.CreatedAt, want.UpdatedAt = custom.ID, custom.CreatedAt, custom.UpdatedAt
	want.NotBefore = jsontime.Of(time.UnixMilli(in.NotBefore.UnixMilli()).UTC())
	want.NotAfter = jsontime.Of(in.NotAfter.UTC())
	if !reflect.DeepEqual(custom, want) {
		t.Errorf("CreateCertificate returned\n%+v\nwant\n%+v", custom, want)
	}
	if got, err := s.GetCertificate(ctx, custom.ID); err != nil || !reflect.DeepEqual(got, custom) {
		t.Errorf("GetCertificate = %+v, %v\nwant %+v", got, err, custom)
	}
	if key, err := s.CertificateKey(ctx, custom.ID); err != nil || string(key) != tc.keyPEM {
		t.Errorf("CertificateKey = %d bytes, %v; want the key given", len(key), err)
	}

	// A managed certificate: only domains until Caddy has obtained it.
	managed, err := s.CreateCertificate(ctx, spec.Certificate{Name: "web", Source: spec.SourceManaged,
		Domains: []string{"example.com", "*.example.com"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if managed.ID <= custom.ID || managed.Issuer != "" || !managed.NotBefore.IsZero() || managed.CertificatePEM != "" {
		t.Errorf("managed certificate %+v", managed)
	}
	if _, err := s.CertificateKey(ctx, managed.ID); !errors.Is(err, ErrInvalid) {
		t.Errorf("CertificateKey of a managed certificate: %v, want ErrInvalid", err)
	}

	// Caddy obtained it: the engine records what it got.
	time.Sleep(2 * time.Millisecond)
	obtained := managed
	obtained.Issuer = "Let's Encrypt R11"
	obtained.NotBefore = jsontime.Of(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	obtained.NotAfter = jsontime.Of(obtained.NotBefore.AddDate(0, 3, 0))
	obtained.CreatedAt = jsontime.Of(time.Unix(1, 0)) // ignored
	updated, err := s.UpdateCertificate(ctx, obtained, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !updated.CreatedAt.Equal(managed.CreatedAt.Time) || !updated.UpdatedAt.After(managed.UpdatedAt.Time) ||
		updated.Issuer != obtained.Issuer || !updated.NotAfter.Equal(obtained.NotAfter.Time) {
		t.Errorf("updated managed certificate %+v", updated)
	}
	if got, _ := s.GetCertificate(ctx, managed.ID); !reflect.DeepEqual(got, updated) {
		t.Errorf("stored %+v\nwant %+v", got, updated)
	}

	// A renewed chain with the same key: nil keeps the key.
	renewed := ecCert(t, "db.example.com")
	c := custom
	c.CertificatePEM = renewed.certPEM
	if _, err := s.UpdateCertificate(ctx, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	if key, err := s.CertificateKey(ctx, custom.ID); err != nil || string(key) != tc.keyPEM {
		t.Errorf("key after an update without one: %v", err)
	}
	// A new key replaces it.
	if _, err := s.UpdateCertificate(ctx, customCert(renewed, "db"), []byte(renewed.keyPEM), nil); err == nil {
		t.Error("update of ID 0 succeeded")
	}
	c = customCert(renewed, "db2")
	c.ID = custom.ID
	if _, err := s.UpdateCertificate(ctx, c, []byte(renewed.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	if key, err := s.CertificateKey(ctx, custom.ID); err != nil || string(key) != renewed.keyPEM {
		t.Errorf("key after an update with a new one: %v", err)
	}

	// Custom to managed drops chain and key; back to custom needs a key.
	toManaged := spec.Certificate{ID: custom.ID, Name: "db", Source: spec.SourceManaged, Domains: []string{"db.example.com"}}
	if _, err := s.UpdateCertificate(ctx, toManaged, nil, nil); err != nil {
		t.Fatal(err)
	}
	if sealed := sealedKey(t, s, custom.ID); sealed != nil {
		t.Errorf("key_sealed of a certificate made managed: %x", sealed)
	}
	c.ID = custom.ID
	if _, err := s.UpdateCertificate(ctx, c, nil, nil); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "needs its private key") {
		t.Errorf("managed to custom without a key: %v", err)
	}
	if _, err := s.UpdateCertificate(ctx, c, []byte(renewed.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	if key, err := s.CertificateKey(ctx, custom.ID); err != nil || string(key) != renewed.keyPEM {
		t.Errorf("key after managed to custom: %v", err)
	}

	// Explicit IDs, and listing in ID order.
	if _, err := s.CreateCertificate(ctx, spec.Certificate{ID: 100, Name: "x", Source: spec.SourceManaged, Domains: []string{"x.example"}}, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateCertificate(ctx, spec.Certificate{ID: 50, Name: "y", Source: spec.SourceManaged}, nil, nil); err != nil {
		t.Fatal(err)
	}
	list, err := s.ListCertificates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for _, c := range list {
		ids = append(ids, c.ID)
	}
	if want := []int64{custom.ID, managed.ID, 50, 100}; !reflect.DeepEqual(ids, want) {
		t.Errorf("ListCertificates IDs = %v, want %v", ids, want)
	}
	if list[2].Domains != nil {
		t.Errorf("empty domains read back as %#v, want nil", list[2].Domains)
	}

	if err := s.DeleteCertificate(ctx, custom.ID, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetCertificate(ctx, custom.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetCertificate after delete: %v", err)
	}
	if _, err := s.CertificateKey(ctx, custom.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("CertificateKey after delete: %v", err)
	}
	c, err = s.CreateCertificate(ctx, spec.Certificate{Name: "z", Source: spec.SourceManaged}, nil, nil)
	if err != nil || c.ID <= 100 {
		t.Errorf("ID after explicit 100 and a delete: %d, %v", c.ID, err)
	}
}

func TestCertificateJSON(t *testing.T) {
	tc := ecCert(t, "db.example.com")
	c := customCert(tc, "db")
	c.ID = 3
	c.CreatedAt = jsontime.Of(time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.UTC))
	c.UpdatedAt = c.CreatedAt
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		t.Fatal(err)
	}
	want := []string{"certificate", "created_at", "domains", "id", "issuer", "name", "not_after", "not_before", "source", "updated_at"}
	var got []string
	for k := range fields {
		got = append(got, k)
	}
	slices.Sort(got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("JSON fields %q, want %q", got, want)
	}
	if fields["certificate"] != tc.certPEM || fields["created_at"] != "2026-01-02T03:04:05.006Z" {
		t.Errorf("JSON %s", b)
	}
	var back spec.Certificate
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, c) {
		t.Errorf("JSON round trip = %+v, %v", back, err)
	}

	b, err = json.Marshal(spec.Certificate{ID: 4, Name: "web", Source: spec.SourceManaged, Domains: []string{"example.com"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"id":4,"name":"web","source":"managed","domains":["example.com"]}`; string(b) != want {
		t.Errorf("managed JSON %s, want %s", b, want)
	}
}

func TestCertificateErrors(t *testing.T) { eachBackend(t, testCertificateErrors) }

func testCertificateErrors(t *testing.T, b testBackend) {
	s, _ := b.keyed(t)
	ctx := context.Background()
	tc := ecCert(t, "a.example.com")
	key := []byte(tc.keyPEM)
	c, err := s.CreateCertificate(ctx, customCert(tc, "a"), key, nil)
	if err != nil {
		t.Fatal(err)
	}
	managed := spec.Certificate{Name: "m", Source: spec.SourceManaged, Domains: []string{"m.example"}}
	noChain := customCert(tc, "b")
	noChain.CertificatePEM = ""
	withID := func(c spec.Certificate, id int64) spec.Certificate { c.ID = id; return c }

	called := false
	apply := func(spec.Certificate) error { called = true; return nil }
	apply2 := func(_, _ spec.Certificate) error { called = true; return nil }
	create := func(c spec.Certificate, key []byte) error {
		_, err := s.CreateCertificate(ctx, c, key, apply)
		return err
	}
	update := func(c spec.Certificate, key []byte) error {
		_, err := s.UpdateCertificate(ctx, c, key, apply2)
		return err
	}
	for i, tc := range []struct {
		name string
		err  error
		want error
		text string
	}{
		{"get missing", func() error { _, err := s.GetCertificate(ctx, 9); return err }(), ErrNotFound, "storage: getting certificate 9: not found"},
		{"key missing", func() error { _, err := s.CertificateKey(ctx, 9); return err }(), ErrNotFound, ""},
		{"update missing", update(withID(managed, 9), nil), ErrNotFound, ""},
		{"update id 0", update(managed, nil), ErrNotFound, ""},
		{"delete missing", s.DeleteCertificate(ctx, 9, apply), ErrNotFound, "storage: deleting certificate 9: not found"},
		{"create taken", create(withID(managed, c.ID), nil), ErrConflict, ""},
		{"create negative", create(withID(managed, -1), nil), ErrInvalid, ""},
		{"create above 2^53-1", create(withID(managed, 1<<53), nil), ErrInvalid, "id must be from 0 to 9007199254740991"},
		{"unknown source", create(spec.Certificate{Name: "x", Source: "acme"}, nil), ErrInvalid, `source "acme": must be "custom" or "managed"`},
		{"custom without chain", create(noChain, key), ErrInvalid, "needs its chain"},
		{"custom without key", create(customCert(tc2(t), "b"), nil), ErrInvalid, "needs its private key"},
		{"managed with key", create(managed, key), ErrInvalid, "no stored chain or private key"},
		{"managed with chain", create(spec.Certificate{Source: spec.SourceManaged, CertificatePEM: "x"}, nil), ErrInvalid, "no stored chain"},
		{"update managed with key", update(withID(managed, c.ID), key), ErrInvalid, ""},
		{"update custom without chain", update(withID(noChain, c.ID), nil), ErrInvalid, ""},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%d: %s: error %v, want %v", i, tc.name, tc.err, tc.want)
			continue
		}
		if !strings.HasPrefix(tc.err.Error(), "storage: ") || !strings.Contains(tc.err.Error(), tc.text) {
			t.Errorf("%d: %s: error %q, want the storage: prefix and %q", i, tc.name, tc.err, tc.text)
		}
	}
	if called {
		t.Error("apply was called for a write that failed before it")
	}
	if got, err := s.GetCertificate(ctx, c.ID); err != nil || !reflect.DeepEqual(got, c) {
		t.Errorf("certificate changed: %+v, %v", got, err)
	}
}

// tc2 is a second certificate, for tests that need one whose key is not
// stored.
func tc2(t *testing.T) testCert { return ecCert(t, "b.example.com") }

// TestCertificatesWithoutKey uses a store opened without an encryption key:
// managed certificates work, private keys are refused with ErrNoKey.
func TestCertificatesWithoutKey(t *testing.T) { eachBackend(t, testCertificatesWithoutKey) }

func testCertificatesWithoutKey(t *testing.T, b testBackend) {
	ctx := context.Background()
	keyed, path := b.keyed(t)
	tc := ecCert(t, "a.example.com")
	c, err := keyed.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}

	s := b.open(t, path, nil)
	if _, err := s.CreateCertificate(ctx, spec.Certificate{Name: "m", Source: spec.SourceManaged, Domains: []string{"m.example"}}, nil, nil); err != nil {
		t.Errorf("managed certificate without a key: %v", err)
	}
	_, err = s.CreateCertificate(ctx, customCert(tc, "b"), []byte(tc.keyPEM), nil)
	if !errors.Is(err, ErrNoKey) {
		t.Errorf("custom certificate without a key: %v, want ErrNoKey", err)
	} else if want := "storage: creating certificate: no encryption key for private keys is configured"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if got, err := s.GetCertificate(ctx, c.ID); err != nil || !reflect.DeepEqual(got, c) {
		t.Errorf("GetCertificate without a key: %+v, %v", got, err)
	}
	if _, err := s.CertificateKey(ctx, c.ID); !errors.Is(err, ErrNoKey) {
		t.Errorf("CertificateKey without a key: %v, want ErrNoKey", err)
	}
	// Renaming keeps the sealed key, which needs no key.
	c.Name = "renamed"
	if _, err := s.UpdateCertificate(ctx, c, nil, nil); err != nil {
		t.Errorf("update keeping the private key: %v", err)
	}
	if _, err := s.UpdateCertificate(ctx, c, []byte(tc.keyPEM), nil); !errors.Is(err, ErrNoKey) {
		t.Errorf("update with a private key: %v, want ErrNoKey", err)
	}
	if key, err := keyed.CertificateKey(ctx, c.ID); err != nil || string(key) != tc.keyPEM {
		t.Errorf("key after the keyless store's update: %v", err)
	}
}

func TestCertificateApply(t *testing.T) { eachBackend(t, testCertificateApply) }

func testCertificateApply(t *testing.T, b testBackend) {
	s, _ := b.keyed(t)
	ctx := context.Background()
	tc := ecCert(t, "a.example.com")

	var applied spec.Certificate
	created, err := s.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), func(c spec.Certificate) error {
		applied = c
		// apply may read the store; it sees the state before the change.
		if _, err := s.GetCertificate(ctx, c.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetCertificate inside apply: %v, want ErrNotFound", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(applied, created) {
		t.Errorf("create apply got\n%+v\nreturned\n%+v", applied, created)
	}

	var oldSeen, newSeen spec.Certificate
	next := created
	next.Name = "b"
	updated, err := s.UpdateCertificate(ctx, next, nil, func(old, new spec.Certificate) error {
		oldSeen, newSeen = old, new
		new.Domains[0] = "changed" // changes nothing stored
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(oldSeen, created) || newSeen.Name != "b" || !newSeen.UpdatedAt.Equal(updated.UpdatedAt.Time) {
		t.Errorf("update apply old %+v new %+v", oldSeen, newSeen)
	}
	if got, _ := s.GetCertificate(ctx, created.ID); !reflect.DeepEqual(got, updated) || got.Domains[0] != "a.example.com" {
		t.Errorf("stored %+v\nwant %+v", got, updated)
	}

	// A failing apply leaves the database as it was, sealed key included.
	list0, _ := s.ListCertificates(ctx)
	sealed0 := sealedKey(t, s, created.ID)
	other := ecCert(t, "a.example.com")
	for i, tc := range []struct {
		name string
		run  func(fail error) error
	}{
		{"create custom", func(fail error) error {
			_, err := s.CreateCertificate(ctx, customCert(other, "c"), []byte(other.keyPEM), func(spec.Certificate) error { return fail })
			return err
		}},
		{"create managed", func(fail error) error {
			_, err := s.CreateCertificate(ctx, spec.Certificate{ID: 7, Source: spec.SourceManaged}, nil, func(spec.Certificate) error { return fail })
			return err
		}},
		{"update with a new key", func(fail error) error {
			c := customCert(other, "d")
			c.ID = created.ID
			_, err := s.UpdateCertificate(ctx, c, []byte(other.keyPEM), func(_, _ spec.Certificate) error { return fail })
			return err
		}},
		{"update to managed", func(fail error) error {
			_, err := s.UpdateCertificate(ctx, spec.Certificate{ID: created.ID, Source: spec.SourceManaged}, nil, func(_, _ spec.Certificate) error { return fail })
			return err
		}},
		{"delete", func(fail error) error {
			return s.DeleteCertificate(ctx, created.ID, func(spec.Certificate) error { return fail })
		}},
	} {
		fail := &applyError{tc.name}
		err := tc.run(fail)
		var ae *applyError
		if !errors.Is(err, fail) || !errors.As(err, &ae) {
			t.Errorf("%d: %s: error %v, want the apply error", i, tc.name, err)
		}
		if list, _ := s.ListCertificates(ctx); !reflect.DeepEqual(list, list0) {
			t.Errorf("%d: %s: certificates changed: %+v", i, tc.name, list)
		}
		if !bytes.Equal(sealedKey(t, s, created.ID), sealed0) {
			t.Errorf("%d: %s: the sealed key changed", i, tc.name)
		}
	}
	if key, err := s.CertificateKey(ctx, created.ID); err != nil || string(key) != tc.keyPEM {
		t.Errorf("key after failed writes: %v", err)
	}
}

func TestDeleteCertificateInUse(t *testing.T) { eachBackend(t, testDeleteCertificateInUse) }

func testDeleteCertificateInUse(t *testing.T, b testBackend) {
	s, _ := b.keyed(t)
	ctx := context.Background()
	tc := ecCert(t, "a.example.com")
	// Certificate 3, as in the message the admin API shows.
	cert, err := s.CreateCertificate(ctx, withCertID(customCert(tc, "a"), 3), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.CreateCertificate(ctx, spec.Certificate{Name: "o", Source: spec.SourceManaged, Domains: []string{"o.example"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []spec.Stream{
		{ID: 1, Name: "db", SSLEnabled: true, SSLCertID: cert.ID},
		{ID: 2, Name: "web", SSLEnabled: true, SSLCertID: other.ID},
		{ID: 3, Name: "plain"},
		{ID: 4, Name: "mail", SSLEnabled: true, SSLCertID: cert.ID},
	} {
		if _, err := s.CreateHost(ctx, h, nil); err != nil {
			t.Fatal(err)
		}
	}

	called := false
	err = s.DeleteCertificate(ctx, cert.ID, func(spec.Certificate) error { called = true; return nil })
	if !errors.Is(err, ErrInUse) {
		t.Fatalf("deleting a certificate in use: %v, want ErrInUse", err)
	}
	var inUse *InUseError
	if !errors.As(err, &inUse) || inUse.CertID != 3 || !reflect.DeepEqual(inUse.StreamIDs, []int64{1, 4}) ||
		!reflect.DeepEqual(inUse.StreamNames, []string{"db", "mail"}) {
		t.Fatalf("InUseError %+v", inUse)
	}
	if want := `storage: deleting certificate 3: certificate 3 is used by streams 1 ("db"), 4 ("mail")`; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if called {
		t.Error("apply was called")
	}
	if got, err := s.GetCertificate(ctx, cert.ID); err != nil || !reflect.DeepEqual(got, cert) {
		t.Errorf("certificate after a refused delete: %+v, %v", got, err)
	}

	// A host with TLS off still refers to it.
	if _, err := s.UpdateHost(ctx, spec.Stream{ID: 1, Name: "db", SSLCertID: cert.ID}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateHost(ctx, spec.Stream{ID: 4, Name: "mail"}, nil); err != nil {
		t.Fatal(err)
	}
	err = s.DeleteCertificate(ctx, cert.ID, nil)
	if want := `storage: deleting certificate 3: certificate 3 is used by stream 1 ("db")`; err == nil || err.Error() != want {
		t.Errorf("error %v, want %q", err, want)
	}

	// Once no host uses it, it goes.
	if err := s.DeleteHost(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	var deleted spec.Certificate
	if err := s.DeleteCertificate(ctx, cert.ID, func(old spec.Certificate) error { deleted = old; return nil }); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(deleted, cert) {
		t.Errorf("delete apply got %+v, want %+v", deleted, cert)
	}
	if _, err := s.GetCertificate(ctx, cert.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetCertificate after delete: %v", err)
	}
}

func withCertID(c spec.Certificate, id int64) spec.Certificate { c.ID = id; return c }

func TestInUseErrorMessage(t *testing.T) {
	for _, tc := range []struct {
		err  InUseError
		want string
	}{
		{InUseError{CertID: 3, StreamIDs: []int64{1, 4}, StreamNames: []string{"db", "mail"}}, `certificate 3 is used by streams 1 ("db"), 4 ("mail")`},
		{InUseError{CertID: 3, StreamIDs: []int64{7}, StreamNames: []string{""}}, `certificate 3 is used by stream 7`},
		{InUseError{CertID: 2, StreamIDs: []int64{5, 6}}, `certificate 2 is used by streams 5, 6`},
		{InUseError{CertID: 2, StreamIDs: []int64{5}, StreamNames: []string{`a "quoted" name`}}, `certificate 2 is used by stream 5 ("a \"quoted\" name")`},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
		if !errors.Is(&tc.err, ErrInUse) || errors.Is(&tc.err, ErrNotFound) {
			t.Errorf("%q: Is is wrong", tc.want)
		}
	}
}

// dbFiles returns the contents of the database file and of the files
// SQLite keeps beside it (-wal, -shm, -journal).
func dbFiles(t *testing.T, path string) map[string][]byte {
	t.Helper()
	matches, err := filepath.Glob(path + "*")
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			t.Fatal(err)
		}
		files[filepath.Base(m)] = b
	}
	if len(files[filepath.Base(path)]) == 0 {
		t.Fatalf("no database file at %s", path)
	}
	return files
}

// leaks returns where the private key of tc occurs in files: its PEM text,
// its base64 body or any 16-character window of it, or any 16-byte window
// of its DER. Windows that also occur in the certificate (the public key
// is in both) are not secret and are skipped. It also returns how many
// windows it looked for, so that a caller can tell it searched at all.
func leaks(files map[string][]byte, tc testCert) (found []string, searched int) {
	body := strings.Join(strings.Fields(strings.NewReplacer(
		"-----BEGIN PRIVATE KEY-----", "", "-----END PRIVATE KEY-----", "").Replace(tc.keyPEM)), "")
	if base64.StdEncoding.EncodeToString(tc.keyDER) != body {
		panic("keyPEM is not keyDER")
	}
	var needles [][]byte
	needles = append(needles, []byte(tc.keyPEM), []byte(body))
	const w = 16
	for i := 0; i+w <= len(body); i++ {
		if win := body[i : i+w]; !strings.Contains(tc.certPEM, win) {
			needles = append(needles, []byte(win))
		}
	}
	for i := 0; i+w <= len(tc.keyDER); i++ {
		if win := tc.keyDER[i : i+w]; !bytes.Contains(tc.certDER, win) {
			needles = append(needles, win)
		}
	}
	for name, data := range files {
		for _, n := range needles {
			if bytes.Contains(data, n) {
				found = append(found, name)
				break
			}
		}
	}
	slices.Sort(found)
	return found, len(needles)
}

// TestPrivateKeyNotInDatabaseFile checks the bytes on disk: no part of a
// private key is in the database, its WAL or anything beside it, while the
// store is open and after it is closed (and has checkpointed).
func TestPrivateKeyNotInDatabaseFile(t *testing.T) {
	s, path := newKeyedStore(t)
	ctx := context.Background()
	rsaTC, ecTC, replaced := rsaCert(t, "rsa.example.com"), ecCert(t, "ec.example.com"), ecCert(t, "ec.example.com")
	keys := []testCert{rsaTC, ecTC, replaced}

	if _, err := s.CreateCertificate(ctx, customCert(rsaTC, "rsa"), []byte(rsaTC.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	c, err := s.CreateCertificate(ctx, customCert(replaced, "ec"), []byte(replaced.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	// The first key of this certificate is replaced: its old sealed bytes
	// may linger in free pages or the WAL, and must not be clear text
	// either.
	c.CertificatePEM = ecTC.certPEM
	if _, err := s.UpdateCertificate(ctx, c, []byte(ecTC.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	// Certificates whose writes failed in apply.
	fail := errors.New("no")
	for _, tc := range keys {
		s.CreateCertificate(ctx, customCert(tc, "failed"), []byte(tc.keyPEM), func(spec.Certificate) error { return fail })
	}

	check := func(when string) {
		t.Helper()
		files := dbFiles(t, path)
		for _, tc := range keys {
			found, searched := leaks(files, tc)
			if searched < 100 {
				t.Fatalf("only %d windows of the key searched for", searched)
			}
			if len(found) > 0 {
				t.Errorf("%s: private key found in clear text in %v", when, found)
			}
		}
	}
	check("store open")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	check("store closed")

	// The keys are all still there, sealed.
	s, err = OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	list, err := s.ListCertificates(ctx)
	if err != nil || len(list) != 2 {
		t.Fatalf("%d certificates, %v", len(list), err)
	}
	for i, want := range []testCert{rsaTC, ecTC} {
		if key, err := s.CertificateKey(ctx, list[i].ID); err != nil || string(key) != want.keyPEM {
			t.Errorf("certificate %d: key %v", list[i].ID, err)
		}
	}
}

// TestLeaksFindsClearText is the control of TestPrivateKeyNotInDatabaseFile:
// a private key stored in clear text, in a host's notes, is found.
func TestLeaksFindsClearText(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	tc := ecCert(t, "a.example.com")
	body := strings.Join(strings.Split(tc.keyPEM, "\n")[2:4], "") // two lines of the body
	if _, err := s.CreateHost(context.Background(), spec.Stream{Notes: body}, nil); err != nil {
		t.Fatal(err)
	}
	if found, _ := leaks(dbFiles(t, path), tc); len(found) == 0 {
		t.Error("clear text in the open store's files not found")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if found, _ := leaks(dbFiles(t, path), tc); !reflect.DeepEqual(found, []string{"aegis.db"}) {
		t.Errorf("clear text found in %v, want [aegis.db]", found)
	}
}

// TestSealedKeyBoundToKeyAndRow opens sealed keys with another key, after
// tampering and after moving them to another certificate: each fails with
// ErrWrongKey, and the message says what to check.
func TestSealedKeyBoundToKeyAndRow(t *testing.T) { eachBackend(t, testSealedKeyBoundToKeyAndRow) }

func testSealedKeyBoundToKeyAndRow(t *testing.T, bk testBackend) {
	s, path := bk.keyed(t)
	ctx := context.Background()
	a, b := ecCert(t, "a.example.com"), ecCert(t, "b.example.com")
	ca, err := s.CreateCertificate(ctx, customCert(a, "a"), []byte(a.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := s.CreateCertificate(ctx, customCert(b, "b"), []byte(b.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	sealedA, sealedB := sealedKey(t, s, ca.ID), sealedKey(t, s, cb.ID)
	if want := 12 + len(a.keyPEM) + 16; len(sealedA) != want {
		t.Errorf("sealed key of %d bytes, want nonce + key + tag = %d", len(sealedA), want)
	}

	// The same key sealed twice differs: the nonce is random.
	again, err := s.base().sealer.seal(ca.ID, []byte(a.keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(again[:12], sealedA[:12]) || bytes.Equal(again, sealedA) {
		t.Error("sealing twice gave the same nonce")
	}

	wrongKey := func(t *testing.T, s testStore, id int64) {
		t.Helper()
		key, err := s.CertificateKey(ctx, id)
		if !errors.Is(err, ErrWrongKey) || key != nil {
			t.Fatalf("CertificateKey = %d bytes, %v; want ErrWrongKey", len(key), err)
		}
		want := fmt.Sprintf("storage: certificate %d: the private key cannot be decrypted with this key (was the key file replaced?)", id)
		if err.Error() != want {
			t.Errorf("error %q, want %q", err, want)
		}
	}

	t.Run("moved to another row", func(t *testing.T) {
		setSealedKey(t, s, cb.ID, sealedA)
		wrongKey(t, s, cb.ID)
	})
	t.Run("tampered", func(t *testing.T) {
		for _, bad := range [][]byte{
			append(slices.Clone(sealedB[:len(sealedB)-1]), sealedB[len(sealedB)-1]^1),
			sealedB[:len(sealedB)-1],
			sealedB[:20],
			{},
		} {
			setSealedKey(t, s, cb.ID, bad)
			if len(bad) == 0 {
				if _, err := s.CertificateKey(ctx, cb.ID); err == nil || !strings.Contains(err.Error(), "has no private key stored") {
					t.Errorf("empty sealed key: %v", err)
				}
				continue
			}
			wrongKey(t, s, cb.ID)
		}
	})
	t.Run("another key", func(t *testing.T) {
		other := bytes.Repeat([]byte{7}, KeySize)
		s2 := bk.open(t, path, other)
		if got, err := s2.GetCertificate(ctx, ca.ID); err != nil || !reflect.DeepEqual(got, ca) {
			t.Errorf("GetCertificate with another key: %v", err)
		}
		wrongKey(t, s2, ca.ID)
		// The right key still opens it.
		if key, err := s.CertificateKey(ctx, ca.ID); err != nil || string(key) != a.keyPEM {
			t.Errorf("CertificateKey with the right key: %v", err)
		}
	})
}

func TestOpenWithBadKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	for _, n := range []int{1, 16, 31, 33, 64} {
		s, err := OpenWith(path, OpenOptions{Key: make([]byte, n)})
		if err == nil {
			s.Close()
		}
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "must be 32") {
			t.Errorf("key of %d bytes: %v, want ErrInvalid", n, err)
		}
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused key left a database file: %v", err)
	}
	// No key at all is Open.
	s, err := OpenWith(path, OpenOptions{Key: []byte{}})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

// TestCheckKey: a store opened with another key than the stored private
// keys were sealed with, or with none, says so before it serves.
func TestCheckKey(t *testing.T) { eachBackend(t, testCheckKey) }

func testCheckKey(t *testing.T, b testBackend) {
	ctx := context.Background()
	s, db := b.keyed(t)
	if err := s.CheckKey(ctx); err != nil {
		t.Errorf("no certificate stored: %v", err)
	}
	if _, err := s.CreateCertificate(ctx, spec.Certificate{Name: "m", Source: spec.SourceManaged}, nil, nil); err != nil {
		t.Fatal(err)
	}
	tc := ecCert(t, "a.example.com")
	if _, err := s.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		key  []byte
		want error
	}{
		{testKey, nil},
		{bytes.Repeat([]byte{7}, KeySize), ErrWrongKey},
		{nil, ErrNoKey},
	} {
		s := b.open(t, db, tc.key)
		err := s.CheckKey(ctx)
		if !errors.Is(err, tc.want) || (err != nil && !strings.HasPrefix(err.Error(), "storage: checking the encryption key: ")) {
			t.Errorf("key %x: CheckKey = %v, want %v", tc.key[:min(2, len(tc.key))], err, tc.want)
		}
	}
}
