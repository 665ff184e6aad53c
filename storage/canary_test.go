package storage

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// keyFileStore opens the database at path with the key file beside it, as
// the streams app does.
func keyFileStore(t *testing.T, path string) (*SQLite, error) {
	t.Helper()
	s, err := OpenWith(path, OpenOptions{KeyFile: filepath.Join(filepath.Dir(path), "streams.key")})
	if err == nil {
		t.Cleanup(func() { s.Close() })
	}
	return s, err
}

// wantKeyError checks that err is a *KeyError whose message names the key,
// the database and both fixes.
func wantKeyError(t *testing.T, err error, keySource, db string, missing bool) {
	t.Helper()
	var ke *KeyError
	if !errors.As(err, &ke) || !errors.Is(err, ErrWrongKey) || ke.Missing != missing {
		t.Fatalf("error %v, want a *KeyError with Missing %v", err, missing)
	}
	for _, want := range []string{keySource, db, "restore", "backup", "aegis streams forget-keys --config"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// A lost key file is never replaced while the database holds sealed keys:
// the store refuses to open, names the file, the database and the fix, and
// leaves no new key file behind. Restoring the file opens it again.
func TestKeyFileLostRefused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path, keyFile := filepath.Join(dir, "streams.db"), filepath.Join(dir, "streams.key")

	s, err := keyFileStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	backup, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatalf("no key file made for a new database: %v", err)
	}
	tc := ecCert(t, "a.example.com")
	c, err := s.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	if err := os.Remove(keyFile); err != nil {
		t.Fatal(err)
	}
	_, err = keyFileStore(t, path)
	wantKeyError(t, err, "key file "+keyFile, path, true)
	if _, err := os.Stat(keyFile); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a refused open made a key file: %v", err)
	}

	// Another key in its place is refused too.
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("7", 64)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = keyFileStore(t, path)
	wantKeyError(t, err, "key file "+keyFile, path, false)

	// The backup opens it, and the key with it.
	if err := os.WriteFile(keyFile, backup, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err = keyFileStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	if key, err := s.CertificateKey(ctx, c.ID); err != nil || string(key) != tc.keyPEM {
		t.Fatalf("private key after restoring the key file: %v", err)
	}
}

// The canary alone counts as sealed: a database opened once with a key,
// with no certificate yet, refuses another key too, so that two nodes (or a
// lost file) never seal under two keys.
func TestCanaryRefusesAnotherKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "streams.db")
	s, err := OpenWith(path, OpenOptions{Key: testKey, KeySource: "storage_key"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	other := bytes.Repeat([]byte{7}, KeySize)
	_, err = OpenWith(path, OpenOptions{Key: other, KeySource: "storage_key"})
	wantKeyError(t, err, "storage_key", path, false)
	if strings.Contains(err.Error(), "0707") || strings.Contains(err.Error(), "5aa5") {
		t.Errorf("the error quotes a key: %v", err)
	}
	_, err = keyFileStore(t, path)
	wantKeyError(t, err, "key file", path, true)

	// Without a key the store opens (and can seal nothing).
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatalf("the right key: %v", err)
	}
	s.Close()
}

// A database written before canaries: a key that opens its newest sealed
// private key is taken and a canary written; another is refused. Without
// any sealed key, a missing key file is made.
func TestKeyCheckBeforeCanary(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "streams.db")
	s, err := openAt(path, canaryVersion-1, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	tc := ecCert(t, "a.example.com")
	if _, err := s.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()

	_, err = OpenWith(path, OpenOptions{Key: bytes.Repeat([]byte{7}, KeySize)})
	wantKeyError(t, err, "the storage key", path, false)
	_, err = keyFileStore(t, path)
	wantKeyError(t, err, "key file", path, true)

	s, err = OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	var canary []byte
	if err := s.read.QueryRow(`SELECT sealed FROM key_canary`).Scan(&canary); err != nil || !opensCanary(testKey, canary) {
		t.Fatalf("canary after the first open with the right key: %v", err)
	}
	s.Close()

	// No sealed key at all: the key file is made.
	path2 := filepath.Join(t.TempDir(), "streams.db")
	s, err = openAt(path2, canaryVersion-1, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := keyFileStore(t, path2); err != nil {
		t.Fatal(err)
	}
}

// KeyCheck.Verify is what every store calls: the cases on their own.
func TestKeyCheckVerify(t *testing.T) {
	other := bytes.Repeat([]byte{7}, KeySize)
	canary, err := SealCanary(testKey)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := newKeyedStore(t)
	sealed, _ := s.sealer.seal(3, []byte("key"))

	for _, tc := range []struct {
		name      string
		c         KeyCheck
		key       []byte
		newCanary bool
		wrong     bool
	}{
		{"new store", KeyCheck{}, testKey, true, false},
		{"canary opens", KeyCheck{Canary: canary}, testKey, false, false},
		{"canary of another key", KeyCheck{Canary: canary}, other, false, true},
		{"canary tampered", KeyCheck{Canary: append(bytes.Clone(canary[:len(canary)-1]), canary[len(canary)-1]^1)}, testKey, false, true},
		{"canary cut", KeyCheck{Canary: canary[:5]}, testKey, false, true},
		{"old sealed key opens", KeyCheck{CertID: 3, SealedKey: sealed}, testKey, true, false},
		{"old sealed key of another row", KeyCheck{CertID: 4, SealedKey: sealed}, testKey, false, true},
		{"old sealed key, another key", KeyCheck{CertID: 3, SealedKey: sealed}, other, false, true},
		{"a certificate key is no canary", KeyCheck{Canary: sealed}, testKey, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.c.Verify(tc.key)
			if tc.wrong != errors.Is(err, ErrWrongKey) || (!tc.wrong && err != nil) {
				t.Fatalf("Verify: %v, want wrong key %v", err, tc.wrong)
			}
			if (got != nil) != tc.newCanary {
				t.Fatalf("new canary %v, want %v", got != nil, tc.newCanary)
			}
			if got != nil && !opensCanary(tc.key, got) {
				t.Error("the new canary does not open with the key")
			}
		})
	}
}

// ForgetKeys on a store whose key file was lost and whose keys were split
// between two keys (as the bug this prevents left them): the keys the new
// key cannot open go, the certificates and their hosts are listed, a new
// canary opens the store normally after, a new upload makes a certificate
// whole, and running it again deletes nothing more.
func TestForgetKeys(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path, keyFile := filepath.Join(dir, "streams.db"), filepath.Join(dir, "streams.key")
	s, err := keyFileStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := ecCert(t, "a.example.com"), ecCert(t, "b.example.com"), ecCert(t, "c.example.com")
	ca, err := s.CreateCertificate(ctx, customCert(a, "a"), []byte(a.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := s.CreateCertificate(ctx, customCert(b, "b"), []byte(b.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := s.CreateHost(ctx, spec.Stream{Name: "db", Protocol: "tcp", ListenPort: 5432, SSLEnabled: true, SSLCertID: cb.ID}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	// The file is lost. Opening for ForgetKeys makes a new one.
	if err := os.Remove(keyFile); err != nil {
		t.Fatal(err)
	}
	s, err = OpenWith(path, OpenOptions{KeyFile: keyFile, NoKeyCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := os.Stat(keyFile); err != nil {
		t.Fatalf("no new key file: %v", err)
	}
	// A certificate uploaded with the new key before the fix (a split).
	cc, err := s.CreateCertificate(ctx, customCert(c, "c"), []byte(c.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}

	got, err := s.ForgetKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Certificate.ID != ca.ID || got[1].Certificate.ID != cb.ID ||
		!got[0].Forgotten || !got[1].Forgotten || got[0].StreamIDs != nil ||
		!reflect.DeepEqual(got[1].StreamIDs, []int64{h.ID}) || !reflect.DeepEqual(got[1].StreamNames, []string{"db"}) {
		t.Fatalf("ForgetKeys = %+v, want certificates %d and %d (used by %d)", got, ca.ID, cb.ID, h.ID)
	}
	if got[0].Certificate.CertificatePEM != a.certPEM {
		t.Error("the certificate's chain went with its key")
	}
	if _, err := s.CertificateKey(ctx, ca.ID); err == nil || !strings.Contains(err.Error(), "no private key stored") {
		t.Errorf("a forgotten key: %v", err)
	}
	if key, err := s.CertificateKey(ctx, cc.ID); err != nil || string(key) != c.keyPEM {
		t.Errorf("the key sealed with the new key: %v", err)
	}
	s.Close()

	// The new key file now opens the store normally.
	s, err = keyFileStore(t, path)
	if err != nil {
		t.Fatal(err)
	}
	// A new upload makes certificate a whole again.
	if _, err := s.UpdateCertificate(ctx, customCert(a, "a"), []byte(a.keyPEM), nil); err == nil {
		t.Fatal("UpdateCertificate without an ID succeeded")
	}
	up := customCert(a, "a")
	up.ID = ca.ID
	if _, err := s.UpdateCertificate(ctx, up, []byte(a.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	if key, err := s.CertificateKey(ctx, ca.ID); err != nil || string(key) != a.keyPEM {
		t.Errorf("the key uploaded again: %v", err)
	}
	again, err := s.ForgetKeys(ctx)
	if err != nil || len(again) != 1 || again[0].Certificate.ID != cb.ID || again[0].Forgotten {
		t.Fatalf("ForgetKeys again = %+v, %v; want certificate %d still without a key, not forgotten now", again, err, cb.ID)
	}

	// Without a key it cannot run.
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.ForgetKeys(ctx); !errors.Is(err, ErrNoKey) {
		t.Errorf("ForgetKeys without a key: %v", err)
	}
}

// A key file others can read is refused through OpenWith too, with the
// file's error as it is.
func TestKeyFileModeRefusedAtOpen(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no Unix file modes")
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "streams.key")
	if err := os.WriteFile(keyFile, []byte(strings.Repeat("ab", KeySize)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := OpenWith(filepath.Join(dir, "streams.db"), OpenOptions{KeyFile: keyFile})
	if want := "storage: key file " + keyFile + ": mode 0644 lets other users access it; make it readable by its owner only: chmod 600 " + keyFile; err == nil || err.Error() != want {
		t.Errorf("OpenWith: %v, want %s", err, want)
	}
}

// SealPrivateKey and OpenPrivateKey seal as a store does: each opens what
// the other sealed, for the same certificate ID and key only.
func TestSealPrivateKeyAsStore(t *testing.T) {
	s, _ := newKeyedStore(t)
	byStore, _ := s.sealer.seal(5, []byte("pem"))
	if p, err := OpenPrivateKey(testKey, 5, byStore); err != nil || string(p) != "pem" {
		t.Errorf("OpenPrivateKey of the store's: %q, %v", p, err)
	}
	byFunc, err := SealPrivateKey(testKey, 5, []byte("pem"))
	if err != nil {
		t.Fatal(err)
	}
	if p, err := s.sealer.open(5, byFunc); err != nil || string(p) != "pem" {
		t.Errorf("the store's open of SealPrivateKey's: %q, %v", p, err)
	}
	if _, err := OpenPrivateKey(testKey, 6, byFunc); !errors.Is(err, ErrWrongKey) {
		t.Errorf("another ID: %v", err)
	}
	if _, err := OpenPrivateKey(bytes.Repeat([]byte{7}, KeySize), 5, byFunc); !errors.Is(err, ErrWrongKey) {
		t.Errorf("another key: %v", err)
	}
	if _, err := SealPrivateKey([]byte("short"), 5, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("a short key: %v", err)
	}
}
