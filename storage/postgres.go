package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Defaults of PostgresOptions.
const (
	// DefaultKeepChanges is the default of PostgresOptions.KeepChanges.
	DefaultKeepChanges = 10000
	// DefaultConnectTimeout is the default of
	// PostgresOptions.ConnectTimeout.
	DefaultConnectTimeout = 5 * time.Second
)

// ChangesChannel is the PostgreSQL notification channel every committed
// change is announced on; the payload is the change's ID in decimal.
const ChangesChannel = "aegis_changes"

// Advisory lock keys, (lockClass, key) pairs of the two-int form: one for
// migrations, one that serializes the writes of hosts and certificates
// cluster-wide; node names are locked as (nodeLockClass, hashtext(name)).
const (
	lockClass     = 0x41454749 // "AEGI"
	nodeLockClass = lockClass + 1
	migrateLock   = 1
	writeLock     = 2
)

// PostgresOptions are the settings of OpenPostgres.
type PostgresOptions struct {
	// Key seals the private keys of custom certificates, as
	// OpenOptions.Key; every node must have the same one. Default: none.
	Key []byte

	// Node is this node's name: connection-log entries, changes and
	// heartbeats carry it, and ClaimNode holds it. Required.
	Node string

	// KeepChanges is how many of the newest changes are kept; older ones
	// are pruned, and ChangesAfter an ID before them is
	// ErrHistoryPruned. Default: 0, meaning DefaultKeepChanges.
	KeepChanges int

	// ConnectTimeout bounds each connection attempt when the DSN sets no
	// connect_timeout. Default: 0, meaning DefaultConnectTimeout.
	ConnectTimeout time.Duration

	// OnListenError, when set, is called with the errors Listen gets
	// while it (re)connects (an *UnavailableError while the database is
	// unreachable). Default: nil.
	OnListenError func(error)

	// KeySource names Key in errors, e.g. "storage_key". Default: "the
	// storage key".
	KeySource string

	// NoKeyCheck uses Key whatever key the database's private keys are
	// sealed with: for ForgetKeys, and for nothing else. Default: false,
	// and a Key that does not open the database's canary (or, in a
	// database without one, a sealed private key) is refused with a
	// *KeyError, at open or, with OpenUnreachable, once the database is
	// reached; a database without either gets a canary sealed with Key.
	NoKeyCheck bool

	// OpenUnreachable makes OpenPostgres return the store even when the
	// database cannot be reached, for a node that starts meanwhile (from
	// a snapshot): its methods then return *UnavailableError until the
	// database is back, and the first one that reaches it checks and
	// migrates the schema (so ErrSchemaTooNew may come from there).
	// Default: false, and OpenPostgres returns the *UnavailableError.
	OpenUnreachable bool
}

// Postgres is a Store and a Cluster on a PostgreSQL database that several
// Aegis nodes share.
//
// Reads and the connection log go through a pool of connections. The
// writes of hosts and certificates are one at a time in a store (so that
// a node's own writes never find each other stale), and cluster-wide
// under a transaction-level advisory lock: each checks that no change was
// committed after the one this node applied last (ErrStale otherwise),
// writes, appends its Change to the changes table and notifies
// ChangesChannel, all in the one transaction.
//
// While the database cannot be reached, every method returns an
// *UnavailableError that names it, and the same store works again once it
// is back: there is nothing to reopen.
type Postgres struct {
	core
	pool          *pgxpool.Pool
	conn          *pgx.ConnConfig // for the connections outside the pool
	where         string          // host:port, for errors
	secret        string          // the DSN's password, kept out of errors
	keep          int64
	onListenError func(error)

	key       []byte // to check against the database's canary; nil once checked
	keySource string

	writing chan struct{} // holds a token during a tracked write
	applied atomic.Int64

	// ready is set once the schema was checked and migrated.
	ready     atomic.Bool
	migrating chan struct{} // holds a token while one call migrates

	life    context.Context // done on Close: ends Listen
	stop    context.CancelFunc
	listens sync.WaitGroup

	claimMu sync.Mutex
	claim   *pgx.Conn // holds the node name's lock

	closeOnce sync.Once
}

var (
	_ Store   = (*Postgres)(nil)
	_ Cluster = (*Postgres)(nil)
)

// OpenPostgres connects to the PostgreSQL database of dsn (a URL or
// key=value string, as libpq takes) and creates or migrates its schema,
// one node at a time under an advisory lock. A schema newer than this
// version knows is refused with ErrSchemaTooNew; a database that cannot be
// reached is an *UnavailableError; a bad DSN, key or node name is
// ErrInvalid. Errors never hold the DSN's password.
func OpenPostgres(ctx context.Context, dsn string, opts PostgresOptions) (*Postgres, error) {
	if opts.Node == "" {
		return nil, fmt.Errorf("storage: PostgreSQL: the node name is empty: %w", ErrInvalid)
	}
	sealer, err := newSealer(opts.Key)
	if err != nil {
		return nil, fmt.Errorf("storage: PostgreSQL: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgconn's error quotes the DSN with its password redacted.
		return nil, fmt.Errorf("storage: PostgreSQL DSN: %v: %w", err, ErrInvalid)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = opts.ConnectTimeout
		if cfg.ConnConfig.ConnectTimeout <= 0 {
			cfg.ConnConfig.ConnectTimeout = DefaultConnectTimeout
		}
	}
	cfg.MaxConnIdleTime = 5 * time.Minute
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("storage: PostgreSQL: %v: %w", err, ErrInvalid)
	}
	p := &Postgres{
		pool:          pool,
		conn:          cfg.ConnConfig,
		where:         net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))),
		secret:        cfg.ConnConfig.Password,
		keep:          int64(opts.KeepChanges),
		onListenError: opts.OnListenError,
		writing:       make(chan struct{}, 1),
		migrating:     make(chan struct{}, 1),
	}
	if p.keep <= 0 {
		p.keep = DefaultKeepChanges
	}
	if len(opts.Key) > 0 && !opts.NoKeyCheck {
		p.key, p.keySource = bytes.Clone(opts.Key), opts.KeySource
		if p.keySource == "" {
			p.keySource = "the storage key"
		}
	}
	p.life, p.stop = context.WithCancel(context.Background())
	p.core = core{be: p, reads: pgConn{q: pool, p: p}, settingSQL: `(settings->>'%s')`,
		node: opts.Node, sealer: sealer, now: time.Now}
	if err := p.schema(ctx); err != nil {
		if opts.OpenUnreachable && errors.Is(err, ErrUnavailable) {
			return p, nil
		}
		p.Close()
		var ke *KeyError
		switch {
		case errors.As(err, &ke): // names the database and the fix
			return nil, err
		case errors.Is(err, ErrUnavailable): // names the database already
			return nil, fmt.Errorf("storage: opening PostgreSQL: %w", err)
		}
		return nil, fmt.Errorf("storage: opening PostgreSQL at %s: %w", p.where, err)
	}
	return p, nil
}

// schema makes sure the schema was checked and migrated, which
// OpenPostgres may have left for later (OpenUnreachable).
func (p *Postgres) schema(ctx context.Context) error {
	if p.ready.Load() {
		return nil
	}
	select {
	case p.migrating <- struct{}{}:
		defer func() { <-p.migrating }()
	case <-ctx.Done():
		return ctx.Err()
	}
	switch {
	case p.ready.Load():
		return nil
	case p.life.Err() != nil:
		return errors.New("the store is closed")
	}
	if err := p.migrate(ctx, pgMigrations); err != nil {
		return err
	}
	if err := p.checkKey(ctx); err != nil {
		return err
	}
	p.ready.Store(true)
	return nil
}

// begin begins a transaction, and returns the function that ends it:
// a rollback, a no-op after Commit, bounded, since the connection may be
// gone.
func (p *Postgres) begin(ctx context.Context) (pgx.Tx, func(), error) {
	tx, err := p.pool.Begin(ctx)
	if err != nil {
		return nil, nil, p.unavailable(fmt.Errorf("beginning transaction: %w", err))
	}
	return tx, func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		tx.Rollback(rctx)
		cancel()
	}, nil
}

// checkKey checks the store's key against the database's canary (see
// KeyCheck) and writes the canary if there is none, under the migration
// lock, so that two nodes starting with different keys on a new database
// cannot both pass. The caller holds p.migrating.
func (p *Postgres) checkKey(ctx context.Context) error {
	if p.key == nil {
		return nil
	}
	tx, end, err := p.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, $2)`, lockClass, migrateLock); err != nil {
		return p.unavailable(fmt.Errorf("taking the migration lock: %w", err))
	}
	if err := p.verifyKey(ctx, &pgTx{pgConn: pgConn{q: tx, p: p, inSchema: true}}, p.key, p.keySource, "PostgreSQL at "+p.where, true); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return p.unavailable(fmt.Errorf("committing: %w", err))
	}
	p.key = nil
	return nil
}

// Close closes every connection of the store and ends Listen. Calls after
// Close fail.
func (p *Postgres) Close() error {
	p.closeOnce.Do(func() {
		p.stop()
		p.listens.Wait()
		p.claimMu.Lock()
		if p.claim != nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			p.claim.Close(ctx)
			cancel()
			p.claim = nil
		}
		p.claimMu.Unlock()
		p.pool.Close()
	})
	return nil
}

// Node returns this node's name.
func (p *Postgres) Node() string { return p.node }

// unavailable returns err as an *UnavailableError when it says the
// database could not be reached in time (or went away, or refuses
// connections), and err as it is otherwise: an SQL error, no rows, a
// cancelled context.
func (p *Postgres) unavailable(err error) error {
	var ue *UnavailableError
	switch {
	case err == nil || errors.As(err, &ue):
		return err
	case p.life.Err() != nil:
		return fmt.Errorf("the store is closed: %w", err)
	case !unreachable(err):
		return err
	}
	if p.secret != "" && strings.Contains(err.Error(), p.secret) {
		err = redacted{err, p.secret}
	}
	return &UnavailableError{
		Problem: "PostgreSQL at " + p.where + " is unreachable",
		Fix:     "nothing was changed",
		Err:     err,
	}
}

func unreachable(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		// connection exceptions, the server shutting down or starting,
		// too many connections
		return strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57P") || pe.Code == "53300"
	}
	var (
		ce *pgconn.ConnectError
		ne net.Error
	)
	return errors.As(err, &ce) || errors.As(err, &ne) || pgconn.Timeout(err) ||
		errors.Is(err, pgconn.ErrConnClosed) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, context.DeadlineExceeded)
}

// redacted is an error whose text has the password replaced.
type redacted struct {
	err    error
	secret string
}

func (r redacted) Error() string { return strings.ReplaceAll(r.err.Error(), r.secret, "xxxxx") }
func (r redacted) Unwrap() error { return r.err }

// inTx runs fn in a transaction; see backend. A tracked write waits for
// this store's previous one, takes the cluster-wide write lock, and is
// ErrStale if a change was committed after the one this node applied.
func (p *Postgres) inTx(ctx context.Context, tracked bool, fn func(tx writeTx) error) error {
	if tracked {
		select {
		case p.writing <- struct{}{}:
			defer func() { <-p.writing }()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := p.schema(ctx); err != nil {
		return err
	}
	tx, end, err := p.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	t := &pgTx{pgConn: pgConn{q: tx, p: p}}
	if tracked {
		if err := t.lockAndCheck(ctx); err != nil {
			return err
		}
	}
	if err := fn(t); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return p.unavailable(fmt.Errorf("committing: %w", err))
	}
	if t.change > 0 {
		p.SetApplied(t.change)
	}
	return nil
}

// newID takes the next ID of table from counters, or records that id
// was used: a counter only grows, so no ID is given out twice.
func (p *Postgres) newID(ctx context.Context, tx sqlDB, table string, id int64) (any, error) {
	if id > 0 {
		_, err := tx.exec(ctx, `UPDATE counters SET last = GREATEST(last, ?) WHERE name = ?`, id, table)
		return id, err
	}
	err := tx.queryRow(ctx, `UPDATE counters SET last = last + 1 WHERE name = ? RETURNING last`, table).Scan(&id)
	return id, err
}

// HighestHostID is the highest host ID ever stored, deleted hosts
// included, or 0 before the first; see SQLite.HighestHostID.
func (p *Postgres) HighestHostID(ctx context.Context) (int64, error) {
	var id int64
	if err := p.reads.queryRow(ctx, `SELECT last FROM counters WHERE name = 'hosts'`).Scan(&id); err != nil {
		return 0, fmt.Errorf("storage: reading the highest host id: %w", err)
	}
	return id, nil
}

// pgConn runs statements on the pool or in a transaction, numbering the ?
// placeholders and turning connection failures into *UnavailableError.
type pgConn struct {
	q interface {
		QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
		Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
		Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	}
	p *Postgres
	// inSchema is set for the statements schema runs itself, which must
	// not wait for it.
	inSchema bool
}

// ready makes sure the schema was checked and migrated.
func (c pgConn) ready(ctx context.Context) error {
	if c.inSchema {
		return nil
	}
	return c.p.schema(ctx)
}

func (c pgConn) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	if err := c.ready(ctx); err != nil {
		return errRow{err}
	}
	return pgRow{c.q.QueryRow(ctx, numbered(query), args...), c.p}
}

// errRow is a row that could not be read.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

type pgRow struct {
	r pgx.Row
	p *Postgres
}

func (r pgRow) Scan(dest ...any) error { return r.p.unavailable(r.r.Scan(dest...)) }

func (c pgConn) queryEach(ctx context.Context, query string, args []any, fn func(r rowScanner) error) error {
	if err := c.ready(ctx); err != nil {
		return err
	}
	rows, err := c.q.Query(ctx, numbered(query), args...)
	if err != nil {
		return c.p.unavailable(err)
	}
	defer rows.Close()
	for rows.Next() {
		if err := fn(rows); err != nil {
			return err
		}
	}
	return c.p.unavailable(rows.Err())
}

func (c pgConn) exec(ctx context.Context, query string, args ...any) (int64, error) {
	return c.execNumbered(ctx, numbered(query), args...)
}

// execNumbered is exec of a query whose placeholders are numbered.
func (c pgConn) execNumbered(ctx context.Context, query string, args ...any) (int64, error) {
	if err := c.ready(ctx); err != nil {
		return 0, err
	}
	tag, err := c.q.Exec(ctx, query, args...)
	return tag.RowsAffected(), c.p.unavailable(err)
}

// keptNumbered holds the numbered text of the queries run with execKept.
var keptNumbered sync.Map // query → numbered(query)

// execKept is exec of one of the core's fixed statements: pgx keeps the
// statements it runs prepared on each connection, by their text, and the
// numbered text is kept here, so that neither is made again per batch.
func (t *pgTx) execKept(ctx context.Context, query string, args ...any) (int64, error) {
	return t.execNumbered(ctx, keptText(query), args...)
}

// queryRowKept is queryRow as execKept runs its statement.
func (t *pgTx) queryRowKept(ctx context.Context, query string, args ...any) rowScanner {
	if err := t.ready(ctx); err != nil {
		return errRow{err}
	}
	return pgRow{t.q.QueryRow(ctx, keptText(query), args...), t.p}
}

// keptText is the numbered text of a query run with execKept.
func keptText(query string) string {
	n, ok := keptNumbered.Load(query)
	if !ok {
		n, _ = keptNumbered.LoadOrStore(query, numbered(query))
	}
	return n.(string)
}

// numbered is query with its ? placeholders numbered, as PostgreSQL
// takes them: $1, $2, …
func numbered(query string) string {
	n := strings.Count(query, "?")
	if n == 0 {
		return query
	}
	var b strings.Builder
	b.Grow(len(query) + 3*n)
	i := 0
	for _, r := range query {
		if r == '?' {
			i++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(i))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
