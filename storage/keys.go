package storage

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// KeySize is the size of the key that seals private keys: AES-256.
const KeySize = 32

// maxKeyFileSize bounds what LoadOrCreateKey reads: a key file is 64 hex
// digits and a newline.
const maxKeyFileSize = 1024

// sealer seals and opens certificates' private keys with AES-256-GCM;
// the zero sealer has no key and returns ErrNoKey.
type sealer struct{ aead cipher.AEAD }

// newSealer returns the sealer for key; an empty key gives the zero
// sealer.
func newSealer(key []byte) (sealer, error) {
	if len(key) == 0 {
		return sealer{}, nil
	}
	if len(key) != KeySize {
		return sealer{}, fmt.Errorf("encryption key: %d bytes, must be %d: %w", len(key), KeySize, ErrInvalid)
	}
	block, err := aes.NewCipher(key) // copies the key schedule: key is not kept
	if err != nil {
		return sealer{}, err
	}
	aead, err := cipher.NewGCM(block)
	return sealer{aead}, err
}

// sealAD is the additional data a certificate's private key is sealed with:
// a label and the certificate's ID, so that sealed bytes copied to another
// row, or to another use of the key, do not open.
func sealAD(certID int64) []byte {
	const label = "aegis certificate private key v1\x00"
	return binary.BigEndian.AppendUint64([]byte(label), uint64(certID))
}

// seal encrypts a private key for the certificate certID: a random 12-byte
// nonce followed by the ciphertext and its tag.
func (s sealer) seal(certID int64, plain []byte) ([]byte, error) {
	if s.aead == nil {
		return nil, ErrNoKey
	}
	nonce := make([]byte, s.aead.NonceSize(), s.aead.NonceSize()+len(plain)+s.aead.Overhead())
	rand.Read(nonce) // never fails (crypto/rand crashes the program instead)
	return s.aead.Seal(nonce, nonce, plain, sealAD(certID)), nil
}

// open decrypts what seal returned for certID.
func (s sealer) open(certID int64, sealed []byte) ([]byte, error) {
	if s.aead == nil {
		return nil, ErrNoKey
	}
	n := s.aead.NonceSize()
	if len(sealed) < n+s.aead.Overhead() {
		return nil, ErrWrongKey
	}
	plain, err := s.aead.Open(nil, sealed[:n], sealed[n:], sealAD(certID))
	if err != nil {
		return nil, ErrWrongKey
	}
	return plain, nil
}

// SealPrivateKey seals the private key keyPEM of certificate certID with
// key as the stores seal it: for an export file that must not hold
// private keys in clear. An empty key is ErrNoKey.
func SealPrivateKey(key []byte, certID int64, keyPEM []byte) ([]byte, error) {
	return withSealer(key, certID, "sealing", sealer.seal, keyPEM)
}

// OpenPrivateKey opens what SealPrivateKey, or a store, sealed for
// certificate certID: ErrWrongKey when key or certID is not the one it
// was sealed with, or the bytes were changed.
func OpenPrivateKey(key []byte, certID int64, sealed []byte) ([]byte, error) {
	return withSealer(key, certID, "opening", sealer.open, sealed)
}

// withSealer runs op (seal or open) on in with the sealer of key.
func withSealer(key []byte, certID int64, what string, op func(sealer, int64, []byte) ([]byte, error), in []byte) ([]byte, error) {
	s, err := newSealer(key)
	if err == nil {
		var out []byte
		if out, err = op(s, certID, in); err == nil {
			return out, nil
		}
	}
	return nil, fmt.Errorf("storage: %s the private key of certificate %d: %w", what, certID, err)
}

// ParseKey reads an encryption key given in the configuration or the
// environment: 64 hexadecimal digits (32 bytes), surrounding white space
// ignored; "openssl rand -hex 32" makes one. An all-zero key, a placeholder
// rather than a key, is refused. Errors are ErrInvalid and never quote the
// value.
func ParseKey(s string) ([]byte, error) {
	key, err := parseKey(s)
	if err != nil {
		return nil, fmt.Errorf("storage: encryption key: %w", err)
	}
	return key, nil
}

func parseKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if len(s) != 2*KeySize {
		return nil, fmt.Errorf("%d characters, must be %d hexadecimal digits (generate one with: openssl rand -hex %d): %w",
			len(s), 2*KeySize, KeySize, ErrInvalid)
	}
	key, err := hex.DecodeString(s)
	if err != nil {
		// hex's error would quote the offending character: a key digit.
		return nil, fmt.Errorf("not hexadecimal: only 0-9 and a-f are allowed: %w", ErrInvalid)
	}
	zero := true
	for _, b := range key {
		zero = zero && b == 0
	}
	if zero {
		return nil, fmt.Errorf("all zeros, a placeholder rather than a key: %w", ErrInvalid)
	}
	return key, nil
}

// LoadOrCreateKey returns the encryption key kept in the file at path,
// creating the file with a new random key if there is none.
//
// The file holds the key as 64 hexadecimal digits and a newline (text, so
// that it can be backed up, copied and compared by hand). A new file is
// created with mode 0600, in a directory created with mode 0700 if missing,
// and appears whole or not at all: the key is written to a temporary file
// beside it, synced, then linked to path, which fails if path exists. Two
// processes starting at once therefore agree: the one whose link fails
// reads the other's key. (Where the file system has no hard links, the file
// is created with O_EXCL and written in one write.)
//
// An existing file must be a regular file no other user can read or write
// (mode 0600 or 0400): anything else is refused with an error that says to
// chmod 600 it. This check is skipped on Windows, which has no such modes.
//
// Losing the file loses every custom certificate's private key: back it up
// with the database.
func LoadOrCreateKey(path string) ([]byte, error) {
	if path == "" {
		return nil, fmt.Errorf("storage: key file: empty path: %w", ErrInvalid)
	}
	key, err := readKeyFile(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	key, err = createKeyFile(path)
	switch {
	case errors.Is(err, fs.ErrExist):
		// Another process was first: use its key.
		return readKeyFile(path)
	case err != nil:
		return nil, fmt.Errorf("storage: creating key file %s: %w", path, err)
	}
	return key, nil
}

// readKeyFile reads an existing key file. A missing file is an error that
// is fs.ErrNotExist.
func readKeyFile(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("storage: key file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("storage: key file %s: not a regular file (%v)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); runtime.GOOS != "windows" && perm&0o077 != 0 {
		return nil, fmt.Errorf("storage: key file %s: mode %04o lets other users access it; make it readable by its owner only: chmod 600 %s",
			path, perm, path)
	}
	if fi.Size() > maxKeyFileSize {
		return nil, fmt.Errorf("storage: key file %s: %d bytes, too large for a key file", path, fi.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("storage: key file: %w", err)
	}
	key, err := parseKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("storage: key file %s: %w", path, err)
	}
	return key, nil
}

// createKeyFile makes a new key file at path. If another process made one
// first, the error is fs.ErrExist.
func createKeyFile(path string) ([]byte, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key := make([]byte, KeySize)
	rand.Read(key)
	text := []byte(hex.EncodeToString(key) + "\n")

	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*") // mode 0600
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(text)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}

	err = os.Link(tmp.Name(), path)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		err = createExclusive(path, text)
	}
	if err != nil {
		return nil, err
	}
	if err := syncDir(dir); err != nil {
		return nil, err
	}
	return key, nil
}

// createExclusive writes text to a new file at path, failing if it exists.
func createExclusive(path string, text []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(text)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// syncDir makes a new directory entry in dir durable.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil // directories cannot be opened for syncing
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
