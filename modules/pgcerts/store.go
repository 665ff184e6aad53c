package pgcerts

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	mrand "math/rand/v2"
	"net"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// Defaults of a Store's locks.
const (
	// DefaultLockTTL is how long a lock lasts unless its holder refreshes
	// it: a holder that died (kill -9, a lost network) loses its locks
	// this long after its last refresh.
	DefaultLockTTL = 60 * time.Second

	// lockPoll is how often Lock tries again while another holds the
	// lock (with up to a quarter more at random, so that waiters spread).
	lockPoll = time.Second
)

// schemaLock is the PostgreSQL advisory lock under which a Store creates
// its tables, so that nodes starting together do it one at a time.
const schemaLock int64 = 0x6165676973636d31 // "aegiscm1"

// schema is the tables a Store keeps its keys and locks in. The keys sort
// in the C collation, so that the children of a prefix p are the range
// [p+"/", p+"0") ('0' follows '/') and use the primary key's index.
var schema = []string{
	`CREATE TABLE IF NOT EXISTS aegis_certmagic_data (
	key      TEXT COLLATE "C" PRIMARY KEY,
	value    BYTEA       NOT NULL,
	modified TIMESTAMPTZ NOT NULL DEFAULT now()
)`,
	`CREATE TABLE IF NOT EXISTS aegis_certmagic_locks (
	name    TEXT PRIMARY KEY,
	token   TEXT        NOT NULL,
	expires TIMESTAMPTZ NOT NULL
)`,
}

// Store is certmagic's Storage, Locker, TryLocker and LockLeaseRenewer on
// a PostgreSQL database: keys, values and locks in its own two tables,
// created when first needed. Keys behave as certmagic.FileStorage's paths
// do (see List, Stat, Delete). A lock lasts LockTTL unless its holder
// refreshes it, which it does every third of that while it holds it; time
// is the database's, so nodes' clocks need not agree.
//
// Methods are safe for concurrent use.
type Store struct {
	pool *pgxpool.Pool
	name string // host:port/database, for messages; never the password
	log  *zap.Logger

	// LockTTL is how long a lock lasts without a refresh. Set it before
	// the first Lock. Default: DefaultLockTTL.
	LockTTL time.Duration

	schemaMu sync.Mutex
	schemaOK bool

	mu   sync.Mutex
	held map[string]*heldLock // the locks this Store holds, by name
}

// heldLock is a lock this Store holds, and its refresher.
type heldLock struct {
	token string
	stop  chan struct{}
	done  chan struct{}
}

// Open returns a Store on the database at dsn (a postgres:// URL or
// key=value settings). It does not connect yet: the database may be down
// at start, and each call connects as needed. log may be nil.
func Open(dsn string, log *zap.Logger) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx's error does not quote the password.
		return nil, fmt.Errorf("dsn: %v", err)
	}
	cfg.MaxConns = 4
	if cfg.ConnConfig.ConnectTimeout == 0 {
		// certmagic's calls may have no deadline: an unreachable
		// database must still fail, not hang.
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("dsn: %v", err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	c := cfg.ConnConfig
	name := "PostgreSQL at " + net.JoinHostPort(c.Host, fmt.Sprint(c.Port)) + "/" + c.Database
	return &Store{pool: pool, name: name, log: log, LockTTL: DefaultLockTTL, held: map[string]*heldLock{}}, nil
}

// String names the database, without the password.
func (s *Store) String() string { return "aegis_postgres storage, " + s.name }

// Close stops refreshing the locks this Store holds (they expire) and
// closes its connections.
func (s *Store) Close() {
	s.mu.Lock()
	held := s.held
	s.held = map[string]*heldLock{}
	s.mu.Unlock()
	for _, h := range held {
		close(h.stop)
		<-h.done
	}
	s.pool.Close()
}

// fail says which database failed and how.
func (s *Store) fail(op string, err error) error {
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return fmt.Errorf("%s: %s: %w", s.name, op, err)
}

// ready creates the tables once, under the advisory lock.
func (s *Store) ready(ctx context.Context) error {
	s.schemaMu.Lock()
	defer s.schemaMu.Unlock()
	if s.schemaOK {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, schemaLock); err != nil {
			return err
		}
		for _, stmt := range schema {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return s.fail("creating the certificate storage tables", err)
	}
	s.schemaOK = true
	return nil
}

// cleanKey is key as a clean path without leading or trailing slashes, as
// FileStorage's filepath.Join makes it; "" is the root.
func cleanKey(key string) string {
	return strings.Trim(path.Clean("/"+key), "/")
}

// under returns the range [lo, hi) of the keys below prefix p; for the
// root, "" and "" (no bound: every key), as the queries read it.
func under(p string) (lo, hi string) {
	if p == "" {
		return "", ""
	}
	return p + "/", p + "0"
}

func notExist(key string) error { return fmt.Errorf("%w: key %q", fs.ErrNotExist, key) }

// Store puts value at key, replacing what was there.
func (s *Store) Store(ctx context.Context, key string, value []byte) error {
	key = cleanKey(key)
	if key == "" {
		return errors.New("aegis_postgres: storing: empty key")
	}
	if err := s.ready(ctx); err != nil {
		return err
	}
	if value == nil {
		value = []byte{}
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO aegis_certmagic_data (key, value, modified) VALUES ($1, $2, now())
		ON CONFLICT (key) DO UPDATE SET value = excluded.value, modified = excluded.modified`, key, value)
	return s.fail("storing "+key, err)
}

// Load returns the value at key, or an error that is fs.ErrNotExist.
func (s *Store) Load(ctx context.Context, key string) ([]byte, error) {
	key = cleanKey(key)
	if err := s.ready(ctx); err != nil {
		return nil, err
	}
	var v []byte
	err := s.pool.QueryRow(ctx, `SELECT value FROM aegis_certmagic_data WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, notExist(key)
	}
	if err != nil {
		return nil, s.fail("loading "+key, err)
	}
	return v, nil
}

// Delete deletes key and every key below it; "" deletes every key, as
// FileStorage removes its whole directory. A missing key is no error.
func (s *Store) Delete(ctx context.Context, key string) error {
	key = cleanKey(key)
	if err := s.ready(ctx); err != nil {
		return err
	}
	lo, hi := under(key)
	_, err := s.pool.Exec(ctx, `DELETE FROM aegis_certmagic_data WHERE key = $1 OR (key >= $2 AND ($3 = '' OR key < $3))`, key, lo, hi)
	return s.fail("deleting "+key, err)
}

// Exists reports whether key has a value or keys below it. An error
// reads as false.
func (s *Store) Exists(ctx context.Context, key string) bool {
	key = cleanKey(key)
	if s.ready(ctx) != nil {
		return false
	}
	lo, hi := under(key)
	var ok bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM aegis_certmagic_data WHERE key = $1 OR (key >= $2 AND ($3 = '' OR key < $3)))`,
		key, lo, hi).Scan(&ok)
	return err == nil && ok
}

// Stat describes key: a terminal key with its size and time, or a
// directory (keys below it, no value) with the newest time below it.
// Neither is an error that is fs.ErrNotExist.
func (s *Store) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = cleanKey(key)
	if err := s.ready(ctx); err != nil {
		return certmagic.KeyInfo{}, err
	}
	info := certmagic.KeyInfo{Key: key, IsTerminal: true}
	err := s.pool.QueryRow(ctx, `SELECT length(value), modified FROM aegis_certmagic_data WHERE key = $1`, key).Scan(&info.Size, &info.Modified)
	if err == nil {
		return info, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return certmagic.KeyInfo{}, s.fail("reading "+key, err)
	}
	lo, hi := under(key)
	var newest *time.Time
	if err := s.pool.QueryRow(ctx, `SELECT max(modified) FROM aegis_certmagic_data WHERE key >= $1 AND ($2 = '' OR key < $2)`, lo, hi).Scan(&newest); err != nil {
		return certmagic.KeyInfo{}, s.fail("reading "+key, err)
	}
	if newest == nil {
		return certmagic.KeyInfo{}, notExist(key)
	}
	return certmagic.KeyInfo{Key: key, Modified: *newest, IsTerminal: false}, nil
}

// List returns the keys below prefix as FileStorage does: with recursive,
// every key and directory below it, at any depth; without, those one level
// below it. They come in FileStorage's order (depth first, each level
// sorted). A prefix that is a key without keys below it has none; a prefix
// that is neither is an error that is fs.ErrNotExist.
func (s *Store) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	prefix = cleanKey(prefix)
	if err := s.ready(ctx); err != nil {
		return nil, err
	}
	lo, hi := under(prefix)
	rows, err := s.pool.Query(ctx, `SELECT key FROM aegis_certmagic_data WHERE key = $1 OR (key >= $2 AND ($3 = '' OR key < $3))`, prefix, lo, hi)
	if err != nil {
		return nil, s.fail("listing "+prefix, err)
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, s.fail("listing "+prefix, err)
	}
	if len(keys) == 0 && prefix != "" {
		return nil, notExist(prefix)
	}
	seen := map[string]bool{}
	var out []string
	for _, k := range keys {
		if k == prefix {
			continue
		}
		rel := k
		if prefix != "" {
			rel = k[len(prefix)+1:]
		}
		parts := strings.Split(rel, "/")
		n := 1
		if recursive {
			n = len(parts)
		}
		for i := 1; i <= n; i++ {
			p := path.Join(prefix, strings.Join(parts[:i], "/"))
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	slices.SortFunc(out, walkOrder)
	return out, nil
}

// walkOrder orders paths as filepath.Walk visits them: component by
// component, a directory before what is below it.
func walkOrder(a, b string) int {
	for {
		ha, ta, moreA := strings.Cut(a, "/")
		hb, tb, moreB := strings.Cut(b, "/")
		if c := strings.Compare(ha, hb); c != 0 {
			return c
		}
		switch {
		case !moreA && !moreB:
			return 0
		case !moreA:
			return -1
		case !moreB:
			return 1
		}
		a, b = ta, tb
	}
}

// Lock takes the lock name, waiting while another holds it (until it is
// unlocked or expires), or until ctx is done.
func (s *Store) Lock(ctx context.Context, name string) error {
	for {
		ok, err := s.TryLock(ctx, name)
		if ok || err != nil {
			return err
		}
		wait := lockPoll + mrand.N(lockPoll/4)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// TryLock takes the lock name if nobody holds it, or its holder let it
// expire, and reports whether it did. While held, it is refreshed every
// third of LockTTL until Unlock.
func (s *Store) TryLock(ctx context.Context, name string) (bool, error) {
	if err := s.ready(ctx); err != nil {
		return false, err
	}
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand crashes the program instead)
	token := hex.EncodeToString(b[:])
	ttl := s.LockTTL
	tag, err := s.pool.Exec(ctx, `INSERT INTO aegis_certmagic_locks (name, token, expires)
		VALUES ($1, $2, now() + $3 * interval '1 millisecond')
		ON CONFLICT (name) DO UPDATE SET token = excluded.token, expires = excluded.expires
		WHERE aegis_certmagic_locks.expires < now()`, name, token, ttl.Milliseconds())
	if err != nil {
		return false, s.fail("taking lock "+name, err)
	}
	if tag.RowsAffected() != 1 {
		return false, nil
	}
	h := &heldLock{token: token, stop: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	old := s.held[name]
	s.held[name] = h
	s.mu.Unlock()
	if old != nil {
		// Ours before, expired (the refresher could not reach the
		// database) and taken again.
		close(old.stop)
		<-old.done
	}
	go s.refresh(name, h, ttl)
	return true, nil
}

// refresh extends lock name every third of ttl until h is stopped, or
// until the lock turns out lost.
func (s *Store) refresh(name string, h *heldLock, ttl time.Duration) {
	defer close(h.done)
	t := time.NewTicker(ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), ttl/3)
		tag, err := s.pool.Exec(ctx, `UPDATE aegis_certmagic_locks SET expires = greatest(expires, now() + $3 * interval '1 millisecond')
			WHERE name = $1 AND token = $2`, name, h.token, ttl.Milliseconds())
		cancel()
		switch {
		case err != nil:
			s.log.Warn("refreshing a certificate storage lock", zap.String("lock", name), zap.String("database", s.name), zap.Error(err))
		case tag.RowsAffected() == 0:
			s.log.Error("a certificate storage lock expired while held, and another took it", zap.String("lock", name), zap.String("database", s.name))
			return
		}
	}
}

// Unlock releases the lock name, which this Store must hold.
func (s *Store) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("aegis_postgres: unlocking %q: not locked by this storage", name)
	}
	close(h.stop)
	<-h.done
	_, err := s.pool.Exec(ctx, `DELETE FROM aegis_certmagic_locks WHERE name = $1 AND token = $2`, name, h.token)
	return s.fail("releasing lock "+name, err)
}

// RenewLockLease makes the lock name, which this Store holds, last lease
// from now.
func (s *Store) RenewLockLease(ctx context.Context, name string, lease time.Duration) error {
	s.mu.Lock()
	h := s.held[name]
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("aegis_postgres: renewing %q: not locked by this storage", name)
	}
	tag, err := s.pool.Exec(ctx, `UPDATE aegis_certmagic_locks SET expires = now() + $3 * interval '1 millisecond'
		WHERE name = $1 AND token = $2`, name, h.token, lease.Milliseconds())
	if err != nil {
		return s.fail("renewing lock "+name, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("aegis_postgres: renewing %q: the lock expired and another holder took it", name)
	}
	return nil
}

// Interface guards.
var (
	_ certmagic.Storage          = (*Store)(nil)
	_ certmagic.TryLocker        = (*Store)(nil)
	_ certmagic.LockLeaseRenewer = (*Store)(nil)
)
