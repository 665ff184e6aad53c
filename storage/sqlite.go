package storage

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// busyTimeout is how long a statement waits for a lock held by another
// connection (another process on the same file, a checkpoint) before it
// fails with "database is locked".
const busyTimeout = 5 * time.Second

// readConns is the number of connections that serve reads.
const readConns = 4

// SQLite is a Store on an SQLite database file.
//
// It holds two connection pools on the file. Writes go through a pool of
// one connection, so they queue in Go (honouring their context) instead of
// contending for SQLite's single write lock; each write transaction begins
// with BEGIN IMMEDIATE, so it takes that lock first and never has to upgrade
// a read lock, which busy_timeout could not resolve. Reads go through a pool
// of several read-only connections and, in WAL mode, neither wait for nor
// block the writer.
type SQLite struct {
	core
	path  string
	write *sql.DB
	read  *sql.DB
}

var _ Store = (*SQLite)(nil)

// OpenOptions are the settings of OpenWith.
type OpenOptions struct {
	// Key is the AES-256 key that seals the private keys of custom
	// certificates: 32 bytes, as LoadOrCreateKey or ParseKey return it.
	// OpenWith copies it. Default: none (nil or empty), and the store
	// refuses to write or read a private key with ErrNoKey; everything
	// else works.
	Key []byte

	// Node is the node name the store tags connection-log entries with.
	// Default: "".
	Node string
}

// Open opens the SQLite database at path, creating the file and its parent
// directory if they are missing, and migrates its schema to the latest
// version. A database whose schema is newer than this version knows is
// refused with ErrSchemaTooNew.
//
// The store has no key to seal private keys with: see OpenWith.
func Open(path string) (*SQLite, error) {
	return openAt(path, len(migrations), OpenOptions{})
}

// OpenWith is Open with options: use it with OpenOptions.Key to store
// custom certificates. A key that is not 32 bytes is ErrInvalid.
func OpenWith(path string, opts OpenOptions) (*SQLite, error) {
	return openAt(path, len(migrations), opts)
}

// openAt is OpenWith that migrates the schema only up to version. Tests
// use it to build databases as older versions wrote them.
func openAt(path string, version int, opts OpenOptions) (*SQLite, error) {
	sealer, err := newSealer(opts.Key)
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	s, err := openPools(path)
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	s.core = core{be: s, reads: sqlConn{s.read}, nameSQL: `json_extract(settings, '$.name')`,
		node: opts.Node, sealer: sealer, now: time.Now}
	if err := migrate(context.Background(), s.write, migrations, version); err != nil {
		s.Close()
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	return s, nil
}

func openPools(path string) (*SQLite, error) {
	if path == "" {
		return nil, fmt.Errorf("empty path: %w", ErrInvalid)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	// The log holds client addresses: keep the directory and the file (and
	// so the -wal and -shm files, which SQLite creates with the database
	// file's permissions) to the owner.
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}

	// Every connection gets these settings when it is opened, so a
	// connection the pool replaces has them too.
	//
	// synchronous=FULL. In WAL mode, NORMAL would already keep every
	// committed transaction through a crash of this process (kill -9, a
	// panic, the OOM killer): COMMIT returns only after the transaction is
	// written to the -wal file, that data is in the kernel whatever becomes
	// of the process, and the next open replays it. What NORMAL leaves out
	// is an fsync at each commit, so an operating-system crash or a power
	// loss could roll back the last transactions (without corrupting the
	// file). FULL syncs the WAL at every commit, so a host change that the
	// API has acknowledged survives a power loss too. It costs one fsync per
	// write transaction; connection-log entries are written in batches, so
	// that stays at a few per second.
	common := url.Values{}
	common.Set("_busy_timeout", fmt.Sprint(busyTimeout.Milliseconds()))
	common.Set("_foreign_keys", "1")
	common.Set("_synchronous", "FULL")

	wq := cloneValues(common)
	wq.Set("_journal_mode", "WAL")
	wq.Set("_txlock", "immediate")
	write, err := sql.Open("sqlite", fileURI(abs, wq))
	if err != nil {
		return nil, err
	}
	write.SetMaxOpenConns(1)
	write.SetMaxIdleConns(1)
	write.SetConnMaxLifetime(0)
	write.SetConnMaxIdleTime(0)

	// Open the writer first: it switches the file to WAL mode, which the
	// file then keeps, before any reader opens.
	var mode string
	if err := write.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil {
		write.Close()
		return nil, err
	}
	if !strings.EqualFold(mode, "wal") {
		write.Close()
		return nil, fmt.Errorf("journal mode is %q, not WAL (is the file on a file system without shared memory?)", mode)
	}

	rq := cloneValues(common)
	rq.Set("_query_only", "1")
	read, err := sql.Open("sqlite", fileURI(abs, rq))
	if err != nil {
		write.Close()
		return nil, err
	}
	read.SetMaxOpenConns(readConns)
	read.SetMaxIdleConns(readConns)
	read.SetConnMaxIdleTime(5 * time.Minute)
	if err := read.Ping(); err != nil {
		write.Close()
		read.Close()
		return nil, err
	}

	return &SQLite{path: abs, write: write, read: read}, nil
}

// fileURI is the driver's name for the database file at the absolute path
// abs: a file: URI, so that a path holding '?' or '#' is escaped instead of
// being cut at the first '?' as a plain name would be.
func fileURI(abs string, q url.Values) string {
	p := filepath.ToSlash(abs)
	if !strings.HasPrefix(p, "/") {
		p = "/" + p // a Windows drive: file:///C:/...
	}
	u := url.URL{Scheme: "file", Path: p, RawQuery: q.Encode()}
	return u.String()
}

func cloneValues(v url.Values) url.Values {
	c := make(url.Values, len(v))
	for k, vs := range v {
		c[k] = append([]string(nil), vs...)
	}
	return c
}

// Close closes the database. Calls after Close fail.
func (s *SQLite) Close() error {
	err := errors.Join(s.read.Close(), s.write.Close())
	if err != nil {
		return fmt.Errorf("storage: closing %s: %w", s.path, err)
	}
	return nil
}

// inTx runs fn in a write transaction and commits it if fn returns nil. A
// full disk, a file that cannot be written or a lock held elsewhere is an
// *UnavailableError (ErrUnavailable).
//
// The store is one node's: tracked writes are not recorded.
func (s *SQLite) inTx(ctx context.Context, _ bool, fn func(tx writeTx) error) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return s.unavailable(fmt.Errorf("beginning transaction: %w", err))
	}
	defer tx.Rollback() // no-op after Commit; runs on a panic in fn too
	if err := fn(sqliteTx{sqlConn{tx}}); err != nil {
		return s.unavailable(err)
	}
	if err := tx.Commit(); err != nil {
		return s.unavailable(fmt.Errorf("committing: %w", err))
	}
	return nil
}

// millis converts t to Unix milliseconds; the zero time is NULL.
func millis(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
}

// fromMillis converts Unix milliseconds to a UTC time; NULL is the zero
// time.
func fromMillis(v sql.NullInt64) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return time.UnixMilli(v.Int64).UTC()
}

// newID returns id, or NULL for 0: SQLite assigns the next ID
// (AUTOINCREMENT: above every ID the table ever had).
func (s *SQLite) newID(_ context.Context, _ sqlDB, _ string, id int64) (any, error) {
	if id > 0 {
		return id, nil
	}
	return nil, nil
}
