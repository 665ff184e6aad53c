package storage

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
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
	// kept are the statements prepared on write when the store opened,
	// by query: the connection log's inserts (writeTx.execKept).
	kept map[string]*sql.Stmt
}

var _ Store = (*SQLite)(nil)

// OpenOptions are the settings of OpenWith.
type OpenOptions struct {
	// Key is the AES-256 key that seals the private keys of custom
	// certificates: 32 bytes, as ParseKey or ReadKeyFile return it.
	// OpenWith copies it. Default: none (nil or empty), and the store
	// refuses to write or read a private key with ErrNoKey; everything
	// else works.
	Key []byte

	// KeySource names Key in errors, e.g. "storage_key". Default: "the
	// storage key".
	KeySource string

	// KeyFile, when Key is empty, is the file the key is read from (64
	// hex digits and a newline, mode 0600). A missing file is created
	// with a new random key only if the database holds nothing sealed (no
	// canary, no private key); otherwise OpenWith fails with a *KeyError
	// that names the file, the database and the fix.
	KeyFile string

	// NoKeyCheck opens the store whatever key its private keys are sealed
	// with, and creates a missing KeyFile: for ForgetKeys, and for
	// nothing else. Default: false, and a key that does not open the
	// database's canary (or, in a database written before canaries, its
	// newest sealed private key) is refused with a *KeyError.
	NoKeyCheck bool

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
	if _, err := newSealer(opts.Key); err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	s, err := openPools(path)
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	s.core = core{be: s, reads: sqlConn{s.read}, settingSQL: `json_extract(settings, '$.%s')`,
		node: opts.Node, now: time.Now, logSliced: true}
	if err := migrate(context.Background(), s.write, migrations, version); err != nil {
		s.Close()
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	if version >= connLogPagesVersion {
		if err := s.prepareKept(connLogKept); err != nil {
			s.Close()
			return nil, fmt.Errorf("storage: open %s: %w", path, err)
		}
	}
	if version < canaryVersion {
		opts.NoKeyCheck = true // a database as older versions wrote it, for tests
	}
	if err := s.setKey(context.Background(), opts); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// setKey gives the store the key of opts, read from (or made in) its key
// file if needed, after checking it against the database. Its errors are
// whole: a *KeyError, a key file's error naming the file, or the
// database's naming the database.
func (s *SQLite) setKey(ctx context.Context, opts OpenOptions) error {
	dbErr := func(err error) error { return fmt.Errorf("storage: open %s: %w", s.path, err) }
	key, source := opts.Key, opts.KeySource
	if source == "" {
		source = "the storage key"
	}
	if len(key) == 0 && opts.KeyFile != "" {
		source = "key file " + opts.KeyFile
		var err error
		key, err = ReadKeyFile(opts.KeyFile)
		if errors.Is(err, fs.ErrNotExist) {
			c, cerr := s.keyCheck(ctx, s.reads, s.path)
			if cerr != nil {
				return dbErr(cerr)
			}
			if c.Sealed() && !opts.NoKeyCheck {
				c.KeySource = source
				return c.Missing()
			}
			key, err = loadOrCreateKey(opts.KeyFile)
		}
		if err != nil {
			return err // names the key file
		}
	}
	if len(key) == 0 {
		return nil
	}
	sealer, err := newSealer(key)
	if err != nil {
		return dbErr(err)
	}
	if !opts.NoKeyCheck {
		var ke *KeyError
		if err := s.useKey(ctx, key, source, s.path); errors.As(err, &ke) {
			return err
		} else if err != nil {
			return dbErr(err)
		}
	}
	s.sealer = sealer
	return nil
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
	// A file made by an older version, a copy or a restore may be open
	// to others: made 0600 before SQLite opens it, as SQLite gives the
	// -wal and -shm files it creates the database file's mode.
	if err := ownerOnly(abs); err != nil {
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
	// write transaction. The connection log's writer commits with NORMAL
	// (inTx), many times a second under load: an fsync there
	// held the log writer, and the connections behind it, for half a
	// millisecond each time; a power loss may take their last entries.
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
	// -wal and -shm files left by an older version keep their mode.
	for _, suffix := range []string{"-wal", "-shm"} {
		if err := ownerOnly(abs + suffix); err != nil {
			write.Close()
			return nil, err
		}
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

// ownerOnly makes the file at path (if there is one) readable and
// writable by its owner only, unless it is already.
func ownerOnly(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("%s is open to other users (mode %04o) and cannot be made 0600: %v; run chmod 600 on it as its owner", path, fi.Mode().Perm(), err)
	}
	return nil
}

// DirWarning returns a warning if the directory of the database at path
// lets other users in (group or others may enter it, or write in it), or
// "". The files are 0600 whatever the directory; a directory that others
// may write in lets them replace the files.
func DirWarning(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return ""
	}
	dir := filepath.Dir(abs)
	fi, err := os.Stat(dir)
	if err != nil || fi.Mode().Perm()&0o077 == 0 {
		return ""
	}
	what := "other users may enter it and list its files"
	if fi.Mode().Perm()&0o022 != 0 {
		what = "other users may write in it and replace the database or its key"
	}
	return fmt.Sprintf("the storage directory %s has mode %04o: %s; run chmod 700 on it, or keep the database in a directory of its own", dir, fi.Mode().Perm(), what)
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

// prepareKept prepares the statements of queries on the write pool, for
// execKept: outside any transaction, since a statement prepared on the
// pool takes its one connection.
func (s *SQLite) prepareKept(queries []string) error {
	s.kept = make(map[string]*sql.Stmt, len(queries))
	for _, q := range queries {
		st, err := s.write.Prepare(q)
		if err != nil {
			return fmt.Errorf("preparing %.40q…: %w", q, err)
		}
		s.kept[q] = st
	}
	return nil
}

// Close closes the database. Calls after Close fail.
func (s *SQLite) Close() error {
	var errs []error
	for _, st := range s.kept {
		errs = append(errs, st.Close())
	}
	err := errors.Join(append(errs, s.read.Close(), s.write.Close())...)
	if err != nil {
		return fmt.Errorf("storage: closing %s: %w", s.path, err)
	}
	return nil
}

// inTx runs fn in a write transaction and commits it if fn returns nil. A
// full disk, a file that cannot be written or a lock held elsewhere is an
// *UnavailableError (ErrUnavailable).
//
// The store is one node's: tracked writes are not recorded. The
// LogWriter's transactions commit with synchronous=NORMAL, every other
// with FULL (see openPools).
func (s *SQLite) inTx(ctx context.Context, _ bool, fn func(tx writeTx) error) error {
	// The one write connection, held from its synchronous level to the
	// commit.
	conn, err := s.write.Conn(ctx)
	if err != nil {
		return s.unavailable(fmt.Errorf("beginning transaction: %w", err))
	}
	defer conn.Close()
	level := "PRAGMA synchronous = FULL"
	if isLogWriter(ctx) {
		level = "PRAGMA synchronous = NORMAL"
	}
	if _, err := conn.ExecContext(ctx, level); err != nil {
		return s.unavailable(fmt.Errorf("beginning transaction: %w", err))
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return s.unavailable(fmt.Errorf("beginning transaction: %w", err))
	}
	defer tx.Rollback() // no-op after Commit; runs on a panic in fn too
	if err := fn(sqliteTx{sqlConn: sqlConn{tx}, tx: tx, kept: s.kept, inTx: make(map[*sql.Stmt]*sql.Stmt, 2)}); err != nil {
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
