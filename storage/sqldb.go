package storage

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// The two stores, SQLite and Postgres, share their logic (hosts,
// certificates, the connection log's queries): it is written once, on
// core, over the little that differs between them: how statements run
// (sqlDB), how a write transaction is begun and committed, and how a new
// row gets its ID (backend). Statements are written with ? placeholders;
// the PostgreSQL side numbers them.

// maxID is the highest ID of a host, a certificate or a change: IDs go to
// JavaScript as numbers.
const maxID = 1<<53 - 1

// sqlDB runs statements, in a transaction or outside one.
type sqlDB interface {
	queryRow(ctx context.Context, query string, args ...any) rowScanner
	// queryEach calls fn for each row the query returns.
	queryEach(ctx context.Context, query string, args []any, fn func(r rowScanner) error) error
	// exec returns the number of rows the statement changed.
	exec(ctx context.Context, query string, args ...any) (int64, error)
}

type rowScanner interface {
	Scan(dest ...any) error
}

// writeTx is a write transaction of a store.
type writeTx interface {
	sqlDB
	// changed records a write of a stream or certificate (kind, op: see
	// Change) for the other nodes; the SQLite store has no one to tell.
	changed(ctx context.Context, kind, op string, objectID int64) error
	// execKept is exec for one of the few fixed statements the core runs
	// for every batch (connLogKept), which the store keeps prepared from
	// one transaction to the next.
	execKept(ctx context.Context, query string, args ...any) (int64, error)
	// queryRowKept is queryRow for such a statement.
	queryRowKept(ctx context.Context, query string, args ...any) rowScanner
}

// backend is what a store does its own way.
type backend interface {
	// inTx runs fn in a write transaction and commits it if fn returns
	// nil. tracked is true for the writes of hosts and certificates,
	// which the Postgres store serializes cluster-wide and records as
	// changes.
	inTx(ctx context.Context, tracked bool, fn func(tx writeTx) error) error

	// newID returns the ID column's value for a new row of table (hosts
	// or certificates): id when > 0, else a new one, or nil when the
	// database assigns it on insert. The row's ID is read back with
	// RETURNING id.
	newID(ctx context.Context, tx sqlDB, table string, id int64) (any, error)
}

// core is the logic the stores share; each embeds one.
type core struct {
	be    backend
	reads sqlDB // outside transactions

	// settingSQL is the SQL expression of one of a host's settings, as
	// text, with %s for its JSON key (see setting).
	settingSQL string

	// node is the node name the store tags connection-log entries with.
	node string

	// logSliced: the store's statements run on this process's goroutine
	// (SQLite), so the connection log is written and pruned in slices with
	// the LogWriter's pauses between (connLogSlice, connLogPrunes).
	// PostgreSQL's run on the server while the goroutine waits on the
	// network, which lets the rest of the process run: slices would only
	// add round trips.
	logSliced bool

	sealer sealer
	now    func() time.Time
}

// setting is the SQL expression of the host setting key, as text.
func (c *core) setting(key string) string { return fmt.Sprintf(c.settingSQL, key) }

// nowMillis is the current time as stored: UTC, to the millisecond.
func (c *core) nowMillis() time.Time {
	return time.UnixMilli(c.now().UnixMilli()).UTC()
}

// sqlConn runs statements on a database/sql pool or transaction.
type sqlConn struct {
	q interface {
		QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
		QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
		ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	}
}

func (c sqlConn) queryRow(ctx context.Context, query string, args ...any) rowScanner {
	return c.q.QueryRowContext(ctx, query, args...)
}

func (c sqlConn) queryEach(ctx context.Context, query string, args []any, fn func(r rowScanner) error) error {
	rows, err := c.q.QueryContext(ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := fn(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

func (c sqlConn) exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := c.q.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// sqliteTx is a write transaction of the SQLite store.
type sqliteTx struct {
	sqlConn
	tx   *sql.Tx
	kept map[string]*sql.Stmt // the store's prepared statements, by query
	// inTx holds kept's statements bound to tx, made at their first use
	// in it; the transaction's end closes them.
	inTx map[*sql.Stmt]*sql.Stmt
}

func (sqliteTx) changed(context.Context, string, string, int64) error { return nil }

// execKept runs query's statement prepared when the store opened, on the
// write pool's one connection; database/sql prepares it again if that
// connection was replaced.
//
// The statement runs without ctx's deadline: for a context that can end,
// the driver starts a goroutine per statement to interrupt it (in
// modernc.org/sqlite's stmt.exec), one per slice of two entries for the
// LogWriter (about 4% of its CPU time under load). The transaction's
// begin still honours ctx, and a statement that waits for a lock gives
// up after busyTimeout.
func (t sqliteTx) execKept(ctx context.Context, query string, args ...any) (int64, error) {
	ctx = context.WithoutCancel(ctx)
	st := t.keptStmt(ctx, query)
	if st == nil {
		return t.exec(ctx, query, args...)
	}
	res, err := st.ExecContext(ctx, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// queryRowKept is queryRow as execKept runs its statement.
func (t sqliteTx) queryRowKept(ctx context.Context, query string, args ...any) rowScanner {
	ctx = context.WithoutCancel(ctx)
	st := t.keptStmt(ctx, query)
	if st == nil {
		return t.queryRow(ctx, query, args...)
	}
	return st.QueryRowContext(ctx, args...)
}

// keptStmt is the store's statement of query bound to the transaction,
// or nil when the store keeps none.
func (t sqliteTx) keptStmt(ctx context.Context, query string) *sql.Stmt {
	st, ok := t.kept[query]
	if !ok {
		return nil
	}
	ts, ok := t.inTx[st]
	if !ok {
		ts = t.tx.StmtContext(ctx, st)
		t.inTx[st] = ts
	}
	return ts
}
