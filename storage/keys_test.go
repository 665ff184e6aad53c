package storage

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "caddy", "aegis")
	path := filepath.Join(dir, "certificates.key")
	key, err := LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(key) != KeySize || bytes.Equal(key, make([]byte, KeySize)) {
		t.Fatalf("key %x", key)
	}
	text, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := hex.EncodeToString(key) + "\n"; string(text) != want {
		t.Errorf("key file holds %q, want %q", text, want)
	}
	if runtime.GOOS != "windows" {
		for p, want := range map[string]os.FileMode{path: 0o600, dir: 0o700} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if perm := fi.Mode().Perm(); perm != want {
				t.Errorf("%s: mode %04o, want %04o", p, perm, want)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("files beside the key: %v", entries)
	}

	// The second call reads the same key.
	again, err := LoadOrCreateKey(path)
	if err != nil || !bytes.Equal(again, key) {
		t.Errorf("second call: %x, %v; want %x", again, err, key)
	}

	// A key file kept read-only is fine.
	if err := os.Chmod(path, 0o400); err != nil {
		t.Fatal(err)
	}
	if again, err := LoadOrCreateKey(path); err != nil || !bytes.Equal(again, key) {
		t.Errorf("0400 key file: %v", err)
	}

	// The key works as a store key.
	s, err := OpenWith(filepath.Join(dir, "aegis.db"), OpenOptions{Key: key})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

func TestLoadOrCreateKeyRefuses(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("no Unix file modes")
	}
	dir := t.TempDir()
	good := strings.Repeat("ab", KeySize) + "\n"
	for _, tc := range []struct {
		name    string
		content string
		mode    os.FileMode
		want    []string
	}{
		{"world readable", good, 0o644, []string{"mode 0644 lets other users access it", "chmod 600 "}},
		{"group readable", good, 0o640, []string{"mode 0640", "chmod 600 "}},
		{"group writable", good, 0o620, []string{"mode 0620", "chmod 600 "}},
		{"empty", "", 0o600, []string{"0 characters, must be 64 hexadecimal digits"}},
		{"short", "abcd\n", 0o600, []string{"4 characters, must be 64"}},
		{"not hex", strings.Repeat("zz", KeySize), 0o600, []string{"not hexadecimal"}},
		{"raw bytes", string(bytes.Repeat([]byte{0xfe}, KeySize)), 0o600, []string{"32 characters, must be 64"}},
		{"all zeros", strings.Repeat("0", 2*KeySize), 0o600, []string{"all zeros"}},
		{"too large", strings.Repeat("a", 5000), 0o600, []string{"too large for a key file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".key")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tc.mode); err != nil {
				t.Fatal(err)
			}
			key, err := LoadOrCreateKey(path)
			if err == nil {
				t.Fatalf("accepted: %x", key)
			}
			if !strings.HasPrefix(err.Error(), "storage: key file "+path+": ") {
				t.Errorf("error %q does not name the file", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "abab") || strings.Contains(err.Error(), "zz") {
				t.Errorf("error %q quotes the file's content", err)
			}
			// The file is left alone.
			if b, _ := os.ReadFile(path); string(b) != tc.content {
				t.Error("the key file was changed")
			}
		})
	}

	// A directory where the file should be.
	sub := filepath.Join(dir, "a-dir.key")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateKey(sub); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory as key file: %v", err)
	}
	// A regular file where the directory should be.
	if _, err := LoadOrCreateKey(filepath.Join(dir, "empty.key", "x.key")); err == nil {
		t.Error("key file under a regular file created")
	}
	if _, err := LoadOrCreateKey(""); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty path: %v", err)
	}
}

// TestLoadOrCreateKeyConcurrent starts several callers on a missing file at
// once: one creates it, and all of them get its key.
func TestLoadOrCreateKeyConcurrent(t *testing.T) {
	for round := range 5 {
		path := filepath.Join(t.TempDir(), "certificates.key")
		const callers = 8
		keys := make([][]byte, callers)
		errs := make([]error, callers)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				<-start
				keys[i], errs[i] = LoadOrCreateKey(path)
			})
		}
		close(start)
		wg.Wait()
		for i := range callers {
			if errs[i] != nil {
				t.Fatalf("round %d caller %d: %v", round, i, errs[i])
			}
			if !bytes.Equal(keys[i], keys[0]) {
				t.Fatalf("round %d: callers got different keys", round)
			}
		}
		entries, err := os.ReadDir(filepath.Dir(path))
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 1 {
			t.Errorf("round %d: temporary files left: %v", round, entries)
		}
		if again, err := LoadOrCreateKey(path); err != nil || !bytes.Equal(again, keys[0]) {
			t.Errorf("round %d: the file holds another key: %v", round, err)
		}
	}
}

func TestParseKey(t *testing.T) {
	hexKey := "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	want, _ := hex.DecodeString(hexKey)
	for _, in := range []string{hexKey, "  " + hexKey + "\n", strings.ToUpper(hexKey)} {
		key, err := ParseKey(in)
		if err != nil || !bytes.Equal(key, want) {
			t.Errorf("ParseKey(%q) = %x, %v", in, key, err)
		}
	}
	for _, tc := range []struct {
		in, want string
	}{
		{"", "storage: encryption key: 0 characters, must be 64 hexadecimal digits (generate one with: openssl rand -hex 32)"},
		{hexKey[:62], "62 characters"},
		{hexKey + "00", "66 characters"},
		{"g" + hexKey[1:], "storage: encryption key: not hexadecimal: only 0-9 and a-f are allowed"},
		{strings.Repeat("00", KeySize), "all zeros"},
		{strings.Repeat("A", 44), "44 characters"}, // base64 of 32 bytes
	} {
		_, err := ParseKey(tc.in)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseKey(%q) = %v, want ErrInvalid and %q", tc.in, err, tc.want)
		}
		if len(tc.in) > 8 && strings.Contains(err.Error(), tc.in[1:9]) {
			t.Errorf("error %q quotes the key", err)
		}
	}
}

// TestCreateExclusive covers the fallback for file systems without hard
// links: a new file is written whole with mode 0600; an existing one is
// fs.ErrExist and left alone.
func TestCreateExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k")
	if err := createExclusive(path, []byte("first\n")); err != nil {
		t.Fatal(err)
	}
	if err := createExclusive(path, []byte("second\n")); !errors.Is(err, os.ErrExist) {
		t.Errorf("second create: %v, want ErrExist", err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "first\n" {
		t.Errorf("file holds %q, %v", b, err)
	}
	if fi, err := os.Stat(path); err != nil || (runtime.GOOS != "windows" && fi.Mode().Perm() != 0o600) {
		t.Errorf("mode %v, %v", fi.Mode(), err)
	}
}

// TestSealPrivateKey: keys sealed for an export open as a store's do, and
// only with their key and certificate ID.
func TestSealPrivateKey(t *testing.T) {
	s, _ := newKeyedStore(t)
	tc := ecCert(t, "a.example.com")
	c, err := s.CreateCertificate(context.Background(), customCert(tc, "a"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	stored := sealedKey(t, s, c.ID)
	if plain, err := OpenPrivateKey(testKey, c.ID, stored); err != nil || string(plain) != tc.keyPEM {
		t.Fatalf("OpenPrivateKey of the stored key: %v", err)
	}
	sealed, err := SealPrivateKey(testKey, 7, []byte(tc.keyPEM))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(sealed, []byte("PRIVATE KEY")) {
		t.Error("the sealed key holds the key in clear")
	}
	if plain, err := OpenPrivateKey(testKey, 7, sealed); err != nil || string(plain) != tc.keyPEM {
		t.Errorf("round trip: %v", err)
	}
	for _, tc := range []struct {
		key  []byte
		id   int64
		want error
	}{
		{testKey, 8, ErrWrongKey},
		{bytes.Repeat([]byte{7}, KeySize), 7, ErrWrongKey},
		{nil, 7, ErrNoKey},
		{[]byte{1}, 7, ErrInvalid},
	} {
		if _, err := OpenPrivateKey(tc.key, tc.id, sealed); !errors.Is(err, tc.want) {
			t.Errorf("OpenPrivateKey(%d bytes, %d) = %v, want %v", len(tc.key), tc.id, err, tc.want)
		}
	}
	if _, err := SealPrivateKey(nil, 7, []byte(tc.keyPEM)); !errors.Is(err, ErrNoKey) {
		t.Errorf("SealPrivateKey without a key: %v", err)
	}
}
