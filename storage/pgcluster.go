package storage

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgxlisten"
)

// The Cluster half of Postgres: the changes table, notifications, node
// names and heartbeats.

// pgTx is a write transaction of the Postgres store.
type pgTx struct {
	pgConn
	change int64 // the ID of the change it recorded, if any
}

// lockAndCheck takes the cluster-wide write lock, held until the
// transaction ends, and then returns ErrStale if a change newer than the
// one this node applied was committed.
func (t *pgTx) lockAndCheck(ctx context.Context) error {
	if _, err := t.exec(ctx, `SELECT pg_advisory_xact_lock(?, ?)`, lockClass, writeLock); err != nil {
		return fmt.Errorf("taking the write lock: %w", err)
	}
	var last int64
	if err := t.queryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM changes`).Scan(&last); err != nil {
		return fmt.Errorf("reading the last change: %w", err)
	}
	if applied := t.p.Applied(); last > applied {
		return fmt.Errorf("change %d is newer than change %d, the last this node applied: %w", last, applied, ErrStale)
	}
	return nil
}

// changed appends the change, notifies ChangesChannel (both take effect at
// commit) and prunes the changes beyond the newest KeepChanges.
func (t *pgTx) changed(ctx context.Context, kind, op string, objectID int64) error {
	err := t.queryRow(ctx, `WITH c AS (
		INSERT INTO changes (kind, op, object_id, node) VALUES (?, ?, ?, ?) RETURNING id)
		SELECT id, pg_notify(?, id::text) FROM c`,
		kind, op, objectID, t.p.node, ChangesChannel).Scan(&t.change, nil)
	if err != nil {
		return fmt.Errorf("recording the change: %w", err)
	}
	if cut := t.change - t.p.keep; cut > 0 {
		_, err := t.exec(ctx, `WITH gone AS (DELETE FROM changes WHERE id <= ?)
			UPDATE counters SET last = ? WHERE name = 'changes pruned' AND last < ?`, cut, cut, cut)
		if err != nil {
			return fmt.Errorf("pruning old changes: %w", err)
		}
	}
	return nil
}

// SetApplied records that this node applied every change up to id. It
// never lowers the ID: a node's own writes may have raised it meanwhile.
func (p *Postgres) SetApplied(id int64) {
	for {
		old := p.applied.Load()
		if id <= old || p.applied.CompareAndSwap(old, id) {
			return
		}
	}
}

// Applied returns the ID of the last change this node applied.
func (p *Postgres) Applied() int64 { return p.applied.Load() }

// LastChange returns the ID of the newest change, or 0.
func (p *Postgres) LastChange(ctx context.Context) (int64, error) {
	var id int64
	if err := p.reads.queryRow(ctx, `SELECT COALESCE(MAX(id), 0) FROM changes`).Scan(&id); err != nil {
		return 0, fmt.Errorf("storage: reading the last change: %w", err)
	}
	return id, nil
}

// DefaultChangesLimit is the most changes ChangesAfter returns when its
// limit is 0.
const DefaultChangesLimit = 1000

// ChangesAfter returns at most limit (0: DefaultChangesLimit) changes
// with IDs above after, oldest first, or ErrHistoryPruned.
func (p *Postgres) ChangesAfter(ctx context.Context, after int64, limit int) ([]Change, error) {
	if limit < 0 || after < 0 {
		return nil, fmt.Errorf("storage: reading changes after %d: limit %d: both must be >= 0: %w", after, limit, ErrInvalid)
	}
	if limit == 0 {
		limit = DefaultChangesLimit
	}
	var out []Change
	err := p.reads.queryEach(ctx, `SELECT id, kind, op, object_id, node, at FROM changes
		WHERE id > ? ORDER BY id LIMIT ?`, []any{after, limit}, func(r rowScanner) error {
		var c Change
		err := r.Scan(&c.ID, &c.Kind, &c.Op, &c.ObjectID, &c.Node, &c.At)
		c.At = c.At.UTC()
		out = append(out, c)
		return err
	})
	// Read after the changes: a prune in between is seen, and reported.
	var pruned int64
	if err == nil {
		err = p.reads.queryRow(ctx, `SELECT last FROM counters WHERE name = 'changes pruned'`).Scan(&pruned)
	}
	if err != nil {
		return nil, fmt.Errorf("storage: reading changes after %d: %w", after, err)
	}
	if after < pruned {
		return nil, fmt.Errorf("storage: reading changes after %d: changes up to %d were pruned: %w", after, pruned, ErrHistoryPruned)
	}
	return out, nil
}

// Listen calls notify with each notification's change ID, and with 0
// after every (re)connect, until ctx is done or the store is closed; then
// it returns nil. It retries a lost connection every second.
// Notifications are handled one at a time: notify should be quick, and
// must not call Close, which waits for Listen to return.
func (p *Postgres) Listen(ctx context.Context, notify func(changeID int64)) error {
	p.listens.Add(1)
	defer p.listens.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(p.life, cancel)()
	l := &pgxlisten.Listener{
		Connect: func(ctx context.Context) (*pgx.Conn, error) {
			return pgx.ConnectConfig(ctx, p.conn.Copy())
		},
		ReconnectDelay: time.Second,
		LogError: func(ctx context.Context, err error) {
			if p.onListenError == nil || ctx.Err() != nil {
				return
			}
			if !errors.Is(err, errBadPayload) {
				err = p.unavailable(err)
			}
			p.onListenError(fmt.Errorf("storage: listening for changes: %w", err))
		},
	}
	l.Handle(ChangesChannel, listenHandler(notify))
	err := l.Listen(ctx)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// listenHandler passes notifications, and reconnects, to notify.
type listenHandler func(changeID int64)

func (h listenHandler) HandleNotification(_ context.Context, n *pgconn.Notification, _ *pgx.Conn) error {
	id, err := parseChangePayload(n.Payload)
	if err != nil {
		return err
	}
	h(id)
	return nil
}

// HandleBacklog runs after each (re)connect, once LISTEN is in effect.
func (h listenHandler) HandleBacklog(context.Context, string, *pgx.Conn) error {
	h(0)
	return nil
}

// errBadPayload is the error of a notification that is not a change ID.
var errBadPayload = errors.New("not a change id")

// parseChangePayload reads a notification's payload: a change ID in
// decimal, > 0, without sign, leading zeros or anything else.
func parseChangePayload(s string) (int64, error) {
	if len(s) == 0 || len(s) > 16 || s[0] == '0' {
		return 0, fmt.Errorf("change notification %.40q: %w", s, errBadPayload)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("change notification %.40q: %w", s, errBadPayload)
		}
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id > maxID {
		return 0, fmt.Errorf("change notification %.40q: %w", s, errBadPayload)
	}
	return id, nil
}

// ClaimNode holds this node's name until Close, with a session-level
// advisory lock on a connection of its own: it goes away with the node.
// Another holder is ErrNodeNameTaken. Calling it again while the name is
// held does nothing; after the connection was lost (the database
// restarted) it claims the name again. Heartbeat does that by itself.
// The lock's key is the name's hashtext: two names that hash alike (one
// chance in 2^32) would also refuse each other.
func (p *Postgres) ClaimNode(ctx context.Context) error {
	p.claimMu.Lock()
	defer p.claimMu.Unlock()
	if p.life.Err() != nil {
		return fmt.Errorf("storage: claiming node name %q: the store is closed", p.node)
	}
	if p.claim != nil {
		if p.claim.Ping(ctx) == nil {
			return nil
		}
		p.claim.Close(ctx)
		p.claim = nil
	}
	conn, err := pgx.ConnectConfig(ctx, p.conn.Copy())
	if err != nil {
		return fmt.Errorf("storage: claiming node name %q: %w", p.node, p.unavailable(err))
	}
	var ok bool
	err = p.unavailable(conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, nodeLockClass, p.node).Scan(&ok))
	if err == nil && !ok {
		err = fmt.Errorf("%w: stop it, or give this node another name", ErrNodeNameTaken)
	}
	if err != nil {
		conn.Close(ctx)
		return fmt.Errorf("storage: claiming node name %q: %w", p.node, err)
	}
	p.claim = conn
	return nil
}

// Heartbeat stores this node's status under its name (s.Name is not
// used); the database sets LastSeen. If ClaimNode claimed the name
// before, it claims it again when its connection was lost.
func (p *Postgres) Heartbeat(ctx context.Context, s NodeStatus) error {
	p.claimMu.Lock()
	claimed := p.claim != nil
	p.claimMu.Unlock()
	if claimed {
		if err := p.ClaimNode(ctx); err != nil {
			return err
		}
	}
	var streams any
	if len(s.Streams) > 0 {
		streams = string(s.Streams)
	}
	_, err := p.reads.exec(ctx, `INSERT INTO nodes (name, address, version, applied_change, snapshot, streams, last_seen)
		VALUES (?, ?, ?, ?, ?, ?, now())
		ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, version = EXCLUDED.version,
			applied_change = EXCLUDED.applied_change, snapshot = EXCLUDED.snapshot,
			streams = EXCLUDED.streams, last_seen = now()`,
		p.node, s.Address, s.Version, s.AppliedChange, s.Snapshot, streams)
	if err != nil {
		return fmt.Errorf("storage: storing the heartbeat of node %q: %w", p.node, err)
	}
	return nil
}

// Nodes returns every node that has sent a heartbeat, by name.
func (p *Postgres) Nodes(ctx context.Context) ([]NodeStatus, error) {
	var out []NodeStatus
	err := p.reads.queryEach(ctx, `SELECT name, address, version, applied_change, snapshot, streams, last_seen
		FROM nodes ORDER BY name`, nil, func(r rowScanner) error {
		var (
			n       NodeStatus
			streams []byte
		)
		err := r.Scan(&n.Name, &n.Address, &n.Version, &n.AppliedChange, &n.Snapshot, &streams, &n.LastSeen)
		n.Streams = streams
		n.LastSeen = n.LastSeen.UTC()
		out = append(out, n)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("storage: reading the nodes: %w", err)
	}
	return out, nil
}
