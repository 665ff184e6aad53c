package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// A store keeps a canary: a known text sealed with the key that seals its
// private keys. At open a key that does not open the canary is refused, so
// that a lost or replaced key never leaves the store with private keys
// sealed under two keys. KeyCheck is the one place that decides; the
// SQLite store and the PostgreSQL store both fill one at open and call
// KeyCheck.Verify.

// canaryVersion is the schema version that adds the key_canary table.
const canaryVersion = 9

// canaryText is what the canary holds, and canaryAD the additional data it
// is sealed with: not a certificate's, so that neither opens as the other.
const (
	canaryText = "aegis storage key canary v1"
	canaryAD   = "aegis storage key canary v1\x00"
)

// SealCanary returns a new canary sealed with key, for a store to keep
// (KeyCheck.Verify returns one when the store has none).
func SealCanary(key []byte) ([]byte, error) {
	s, err := newSealer(key)
	if err != nil {
		return nil, err
	}
	if s.aead == nil {
		return nil, ErrNoKey
	}
	return sealCanary(s), nil
}

func sealCanary(s sealer) []byte {
	aead := s.aead
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(canaryText)+aead.Overhead())
	rand.Read(nonce) // never fails (crypto/rand crashes the program instead)
	return aead.Seal(nonce, nonce, []byte(canaryText), []byte(canaryAD))
}

// opensCanary reports whether key opens the sealed canary.
func opensCanary(key, sealed []byte) bool {
	s, err := newSealer(key)
	if err != nil || s.aead == nil {
		return false
	}
	aead := s.aead
	n := aead.NonceSize()
	if len(sealed) < n+aead.Overhead() {
		return false
	}
	plain, err := aead.Open(nil, sealed[:n], sealed[n:], []byte(canaryAD))
	return err == nil && bytes.Equal(plain, []byte(canaryText))
}

// KeyCheck is what a store holds that shows which key seals its private
// keys, and the names its errors give the database and the key.
type KeyCheck struct {
	// Database names the database in errors: a file's path, or
	// "PostgreSQL at host:port/name".
	Database string

	// KeySource names the key in errors: "key file /path/streams.key",
	// or "storage_key" for a key given in the config.
	KeySource string

	// Shared says several nodes share the database, each with its copy
	// of the key: the errors then say to take it from another node.
	Shared bool

	// Canary is the sealed canary the store holds; nil if none.
	Canary []byte

	// CertID and SealedKey are one certificate's sealed private key, for
	// a store written before canaries: a key that opens it is the right
	// one. 0 and nil if the store holds none (or has a canary).
	CertID    int64
	SealedKey []byte
}

// Sealed reports whether the store holds anything sealed with a key (a
// canary or a private key): then no new key may be made for it.
func (c KeyCheck) Sealed() bool { return len(c.Canary) > 0 || len(c.SealedKey) > 0 }

// Verify checks that key is the one the store's private keys are sealed
// with. With a canary, key must open it. Without one (a new store, or one
// written before canaries), key must open the one sealed private key given,
// if any; Verify then returns a new canary sealed with key, which the store
// writes (only if it still has none, in the transaction that read c). A
// key that fails is a *KeyError (errors.Is ErrWrongKey).
func (c KeyCheck) Verify(key []byte) (canary []byte, err error) {
	if len(c.Canary) > 0 {
		if opensCanary(key, c.Canary) {
			return nil, nil
		}
		return nil, &KeyError{Database: c.Database, KeySource: c.KeySource, Shared: c.Shared}
	}
	if len(c.SealedKey) > 0 {
		if _, err := OpenPrivateKey(key, c.CertID, c.SealedKey); errors.Is(err, ErrWrongKey) {
			return nil, &KeyError{Database: c.Database, KeySource: c.KeySource, Shared: c.Shared}
		} else if err != nil {
			return nil, err
		}
	}
	return SealCanary(key)
}

// Missing is the error for a store that holds sealed keys (Sealed) while
// its key file is missing: a new key would split them.
func (c KeyCheck) Missing() error {
	return &KeyError{Database: c.Database, KeySource: c.KeySource, Missing: true}
}

// KeyError says that a store's private keys are sealed with another key
// than the one given, or that its key file is missing, and what to do.
// errors.Is(err, ErrWrongKey) holds for it. Its message never holds a key.
type KeyError struct {
	Database  string // as KeyCheck.Database
	KeySource string // as KeyCheck.KeySource
	Missing   bool   // the key file is missing
	Shared    bool   // as KeyCheck.Shared
}

// ForgetKeysCommand is the command that makes a store usable with a new
// key, named in KeyError's message.
const ForgetKeysCommand = "aegis streams forget-keys --config <your config>"

func (e *KeyError) Error() string {
	if e.Missing {
		return fmt.Sprintf("storage: %s is missing, but the database %s holds private keys sealed with a key; "+
			"restore %s from your backup, or run `%s` to make a new key and delete the private keys sealed with the lost one "+
			"(it lists the certificates that then need a new upload); a new key is never made while sealed keys are stored",
			e.KeySource, e.Database, e.KeySource, ForgetKeysCommand)
	}
	restore := "restore the key from your backup"
	if e.Shared {
		restore = "every node needs the same key: copy it from a running node, or restore it from your backup"
	}
	return fmt.Sprintf("storage: %s is not the key that sealed the private keys in the database %s; "+
		"%s, or run `%s` to delete the private keys this key cannot open "+
		"(it lists the certificates that then need a new upload)",
		e.KeySource, e.Database, restore, ForgetKeysCommand)
}

// Is reports whether target is ErrWrongKey.
func (e *KeyError) Is(target error) bool { return target == ErrWrongKey }

// keyCheck reads what the database holds of its key: the canary or, if
// none, the newest sealed private key. database names it in errors.
func (c *core) keyCheck(ctx context.Context, q sqlDB, database string) (KeyCheck, error) {
	k := KeyCheck{Database: database}
	err := q.queryRow(ctx, `SELECT sealed FROM key_canary WHERE id = 1`).Scan(&k.Canary)
	if err == nil {
		return k, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("reading the key canary: %w", err)
	}
	err = q.queryRow(ctx, `SELECT id, key_sealed FROM certificates
		WHERE key_sealed IS NOT NULL AND length(key_sealed) > 0 ORDER BY id DESC LIMIT 1`).Scan(&k.CertID, &k.SealedKey)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("reading a sealed private key: %w", err)
	}
	return k, nil
}

// verifyKey checks key against what q's database holds and writes the
// canary if it has none; q is a write transaction.
func (c *core) verifyKey(ctx context.Context, q sqlDB, key []byte, source, database string, shared bool) error {
	k, err := c.keyCheck(ctx, q, database)
	if err != nil {
		return err
	}
	k.KeySource, k.Shared = source, shared
	canary, err := k.Verify(key)
	if err != nil || canary == nil {
		return err
	}
	_, err = q.exec(ctx, `INSERT INTO key_canary (id, sealed) VALUES (1, ?) ON CONFLICT (id) DO NOTHING`, canary)
	return err
}

// useKey is verifyKey in a transaction of its own.
func (c *core) useKey(ctx context.Context, key []byte, source, database string) error {
	return c.be.inTx(ctx, false, func(tx writeTx) error {
		return c.verifyKey(ctx, tx, key, source, database, false)
	})
}

// KeylessCert is a custom certificate that ForgetKeys left without a
// private key, and the hosts that use it.
type KeylessCert struct {
	Certificate spec.Certificate

	// Forgotten is true when this ForgetKeys deleted its key, false when
	// it had none before (an earlier ForgetKeys).
	Forgotten bool

	// StreamIDs and StreamNames are the stored hosts that use it, as
	// InUseError has them.
	StreamIDs   []int64
	StreamNames []string
}

// KeyForgetter is a Store that can drop the private keys its key does not
// open; `aegis streams forget-keys` uses it on a store opened without the
// key check (OpenOptions.NoKeyCheck).
type KeyForgetter interface {
	ForgetKeys(ctx context.Context) ([]KeylessCert, error)
}

var (
	_ KeyForgetter = (*SQLite)(nil)
	_ KeyForgetter = (*Postgres)(nil)
)

// ForgetKeys deletes every private key that the store's key does not open,
// replaces the canary with one sealed with that key, and returns every
// custom certificate left without a private key (the ones it deleted, and
// any that had none already), with the hosts that use them, ordered by ID.
// It is one transaction, and running it again changes nothing more. The
// certificates stay, with their chains: uploading a key pair for one
// (UpdateCertificate) makes it usable again. ErrNoKey without a store key.
func (s *core) ForgetKeys(ctx context.Context) ([]KeylessCert, error) {
	if s.sealer.aead == nil {
		return nil, fmt.Errorf("storage: forgetting private keys: %w", ErrNoKey)
	}
	var out []KeylessCert
	err := s.be.inTx(ctx, false, func(tx writeTx) error {
		type row struct {
			id     int64
			sealed []byte
		}
		var custom []row
		err := tx.queryEach(ctx, `SELECT id, key_sealed FROM certificates WHERE source = ? ORDER BY id`,
			[]any{spec.SourceCustom}, func(r rowScanner) error {
				var c row
				err := r.Scan(&c.id, &c.sealed)
				custom = append(custom, c)
				return err
			})
		if err != nil {
			return err
		}
		for _, r := range custom {
			k := KeylessCert{}
			if len(r.sealed) > 0 {
				if _, err := s.sealer.open(r.id, r.sealed); err == nil {
					continue
				}
				if _, err := tx.exec(ctx, `UPDATE certificates SET key_sealed = NULL WHERE id = ?`, r.id); err != nil {
					return fmt.Errorf("deleting the private key of certificate %d: %w", r.id, err)
				}
				k.Forgotten = true
			}
			if k.Certificate, err = getCert(ctx, tx, r.id); err != nil {
				return err
			}
			var inUse *InUseError
			if err := s.certInUse(ctx, tx, r.id); errors.As(err, &inUse) {
				k.StreamIDs, k.StreamNames = inUse.StreamIDs, inUse.StreamNames
			} else if err != nil {
				return err
			}
			out = append(out, k)
		}
		_, err = tx.exec(ctx, `INSERT INTO key_canary (id, sealed) VALUES (1, ?)
			ON CONFLICT (id) DO UPDATE SET sealed = excluded.sealed`, sealCanary(s.sealer))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("storage: forgetting private keys: %w", err)
	}
	return out, nil
}
