package storage

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// hostColumns are the hosts table's columns in the order scanHost reads
// and hostValues writes them. A stream's settings are in settings, as
// JSON, except those the database indexes or constrains, which have
// columns of their own (settingColumns): a new setting needs no change
// here, nor a migration.
const hostColumns = `id, protocol, listen_address, listen_port, enabled, ssl_cert_id,
	settings, created_at, updated_at, version`

const insertHost = `INSERT INTO hosts (` + hostColumns + `) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id`

const updateHost = `UPDATE hosts SET
	protocol = ?, listen_address = ?, listen_port = ?, enabled = ?, ssl_cert_id = ?,
	settings = ?, created_at = ?, updated_at = ?, version = ?
	WHERE id = ?`

// settingColumns are the JSON names of the settings kept in columns of
// their own, left out of the settings column.
var settingColumns = []string{"id", "protocol", "listen_address", "listen_port", "enabled", "ssl_cert_id"}

func scanHost(r rowScanner) (Stored, error) {
	var (
		h                    Stored
		id                   int64
		protocol, addr       string
		port                 int
		enabled              bool
		certID               int64
		settings             string
		createdAt, updatedAt sql.NullInt64
	)
	err := r.Scan(&id, &protocol, &addr, &port, &enabled, &certID, &settings, &createdAt, &updatedAt, &h.Version)
	if err != nil {
		return Stored{}, err
	}
	if err := json.Unmarshal([]byte(settings), &h.Stream); err != nil {
		return Stored{}, fmt.Errorf("host %d: settings: %v", id, err)
	}
	h.ID, h.Protocol, h.ListenAddress, h.ListenPort, h.Enabled, h.SSLCertID = id, protocol, addr, port, enabled, certID
	h.CreatedAt = fromMillis(createdAt)
	h.UpdatedAt = fromMillis(updatedAt)
	return h, nil
}

// hostValues are h's columns in hostColumns order, without the ID.
func hostValues(h Stored, settings string) []any {
	return []any{h.Protocol, h.ListenAddress, h.ListenPort, h.Enabled, h.SSLCertID,
		settings, millis(h.CreatedAt), millis(h.UpdatedAt), h.Version}
}

// encodeSettings is the settings column of s: its JSON without the
// settings that have columns of their own, the keys sorted.
func encodeSettings(s spec.Stream) (string, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return "", err
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return "", err
	}
	for _, k := range settingColumns {
		delete(m, k)
	}
	b, err = json.Marshal(m)
	return string(b), err
}

// normalized is s as it reads back from the database, and its settings
// column: its own copies of the lists, nil when empty.
func normalized(s spec.Stream) (spec.Stream, string, error) {
	settings, err := encodeSettings(s)
	if err != nil {
		return spec.Stream{}, "", fmt.Errorf("encoding the settings: %v", err)
	}
	var out spec.Stream
	if err := json.Unmarshal([]byte(settings), &out); err != nil {
		return spec.Stream{}, "", fmt.Errorf("decoding the settings: %v", err)
	}
	out.ID, out.Protocol, out.ListenAddress, out.ListenPort, out.Enabled, out.SSLCertID =
		s.ID, s.Protocol, s.ListenAddress, s.ListenPort, s.Enabled, s.SSLCertID
	return out, settings, nil
}

// ListHosts returns every host, ordered by ID.
func (s *core) ListHosts(ctx context.Context) ([]Stored, error) {
	var hosts []Stored
	err := s.reads.queryEach(ctx, `SELECT `+hostColumns+` FROM hosts ORDER BY id`, nil, func(r rowScanner) error {
		h, err := scanHost(r)
		hosts = append(hosts, h)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("storage: listing hosts: %w", err)
	}
	return hosts, nil
}

// GetHost returns the host with the given ID, or ErrNotFound.
func (s *core) GetHost(ctx context.Context, id int64) (Stored, error) {
	h, err := getHost(ctx, s.reads, id)
	if err != nil {
		return Stored{}, fmt.Errorf("storage: getting host %d: %w", id, err)
	}
	return h, nil
}

func getHost(ctx context.Context, q sqlDB, id int64) (Stored, error) {
	h, err := scanHost(q.queryRow(ctx, `SELECT `+hostColumns+` FROM hosts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Stored{}, ErrNotFound
	}
	return h, err
}

// CreateHost stores a new host; see Store.
func (s *core) CreateHost(ctx context.Context, st spec.Stream, apply func(h Stored) error) (Stored, error) {
	if st.ID < 0 || st.ID > maxID {
		return Stored{}, fmt.Errorf("storage: creating host %d: id must be from 0 to %d: %w", st.ID, int64(maxID), ErrInvalid)
	}
	var h Stored
	var settings string
	var err error
	if h.Stream, settings, err = normalized(st); err != nil {
		return Stored{}, fmt.Errorf("storage: creating host: %w", err)
	}
	err = s.be.inTx(ctx, true, func(tx writeTx) error {
		if err := checkFreeID(ctx, tx, "hosts", h.ID); err != nil {
			return err
		}
		h.CreatedAt = s.nowMillis()
		h.UpdatedAt = h.CreatedAt
		var err error
		if h.Version, err = nextHostVersion(ctx, tx); err != nil {
			return err
		}
		id, err := s.be.newID(ctx, tx, "hosts", h.ID)
		if err != nil {
			return err
		}
		if err := tx.queryRow(ctx, insertHost, append([]any{id}, hostValues(h, settings)...)...).Scan(&h.ID); err != nil {
			return fmt.Errorf("inserting: %w", err)
		}
		// A new stream's log starts empty. A stream deleted under this ID
		// may have left entries: those of its connections that its
		// deletion closed, and those queued to the LogWriter, are written
		// after its log was deleted.
		if _, err := tx.exec(ctx, connLogLock); err != nil {
			return fmt.Errorf("emptying the connection log: %w", err)
		}
		if _, err := tx.exec(ctx, `DELETE FROM conn_log_pages WHERE stream_id = ?`, h.ID); err != nil {
			return fmt.Errorf("emptying the connection log: %w", err)
		}
		if err := tx.changed(ctx, ChangeStream, OpCreate, h.ID); err != nil {
			return err
		}
		if err := s.audit(ctx, tx, AuditEntry{Action: AuditCreate, StreamID: h.ID, Name: h.Name,
			Changes: streamChanges(nil, &h.Stream)}); err != nil {
			return err
		}
		if apply != nil {
			return apply(h.clone())
		}
		return nil
	})
	if err != nil {
		if h.ID == 0 { // failed before the store assigned one
			return Stored{}, fmt.Errorf("storage: creating host: %w", err)
		}
		return Stored{}, fmt.Errorf("storage: creating host %d: %w", h.ID, err)
	}
	return h, nil
}

// UpdateHost replaces a host; see Store.
func (s *core) UpdateHost(ctx context.Context, st spec.Stream, apply func(old, new Stored) error) (Stored, error) {
	var h Stored
	var settings string
	var err error
	if h.Stream, settings, err = normalized(st); err != nil {
		return Stored{}, fmt.Errorf("storage: updating host %d: %w", st.ID, err)
	}
	err = s.be.inTx(ctx, true, func(tx writeTx) error {
		old, err := getHost(ctx, tx, h.ID)
		if err != nil {
			return err
		}
		h.CreatedAt = old.CreatedAt
		h.UpdatedAt = s.nowMillis()
		if h.Version, err = nextHostVersion(ctx, tx); err != nil {
			return err
		}
		if _, err := tx.exec(ctx, updateHost, append(hostValues(h, settings), h.ID)...); err != nil {
			return fmt.Errorf("updating: %w", err)
		}
		if err := tx.changed(ctx, ChangeStream, OpUpdate, h.ID); err != nil {
			return err
		}
		// A write that changes nothing (enabling an enabled stream) is no
		// change to audit.
		if _, ok := auditFrom(ctx); ok {
			if changes := streamChanges(&old.Stream, &h.Stream); len(changes) > 0 {
				if err := s.audit(ctx, tx, AuditEntry{Action: updateAction(changes), StreamID: h.ID, Name: h.Name,
					Changes: changes}); err != nil {
					return err
				}
			}
		}
		if apply != nil {
			return apply(old, h.clone())
		}
		return nil
	})
	if err != nil {
		return Stored{}, fmt.Errorf("storage: updating host %d: %w", h.ID, err)
	}
	return h, nil
}

// clone is h with its own copies of the lists, for a callback that may
// keep them.
func (h Stored) clone() Stored {
	h.WhitelistCIDRs = slices.Clone(h.WhitelistCIDRs)
	h.BlacklistCIDRs = slices.Clone(h.BlacklistCIDRs)
	return h
}

// nextHostVersion takes the next host version, in the write transaction
// tx: it is above every version handed out before, whichever the host.
func nextHostVersion(ctx context.Context, tx sqlDB) (int64, error) {
	var v int64
	err := tx.queryRow(ctx, `UPDATE host_version SET last = last + 1 WHERE id = 1 RETURNING last`).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("taking the next host version: %w", err)
	}
	return v, nil
}

// DeleteHost deletes a host and its connection log; see Store.
func (s *core) DeleteHost(ctx context.Context, id int64, apply func(old Stored) error) error {
	err := s.be.inTx(ctx, true, func(tx writeTx) error {
		old, err := getHost(ctx, tx, id)
		if err != nil {
			return err
		}
		if _, err := tx.exec(ctx, connLogLock); err != nil {
			return fmt.Errorf("deleting connection log: %w", err)
		}
		if _, err := tx.exec(ctx, `DELETE FROM conn_log_pages WHERE stream_id = ?`, id); err != nil {
			return fmt.Errorf("deleting connection log: %w", err)
		}
		if _, err := tx.exec(ctx, `DELETE FROM hosts WHERE id = ?`, id); err != nil {
			return fmt.Errorf("deleting: %w", err)
		}
		if err := tx.changed(ctx, ChangeStream, OpDelete, id); err != nil {
			return err
		}
		if err := s.audit(ctx, tx, AuditEntry{Action: AuditDelete, StreamID: id, Name: old.Name}); err != nil {
			return err
		}
		if apply != nil {
			return apply(old)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: deleting host %d: %w", id, err)
	}
	return nil
}

// checkFreeID returns ErrConflict if a row of table (hosts or
// certificates) has the ID id > 0.
func checkFreeID(ctx context.Context, tx sqlDB, table string, id int64) error {
	if id <= 0 {
		return nil
	}
	var n int
	if err := tx.queryRow(ctx, `SELECT COUNT(*) FROM `+table+` WHERE id = ?`, id).Scan(&n); err != nil {
		return err
	}
	if n > 0 {
		return ErrConflict
	}
	return nil
}

// HighestHostID is the highest host ID ever stored, deleted hosts included,
// or 0 before the first: a caller that picks IDs itself stays above it, so
// that an ID, and the connection log kept under it, is never reused.
func (s *SQLite) HighestHostID(ctx context.Context) (int64, error) {
	var seq sql.NullInt64
	err := s.read.QueryRowContext(ctx, `SELECT seq FROM sqlite_sequence WHERE name = 'hosts'`).Scan(&seq)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("storage: reading the highest host id: %w", err)
	}
	return seq.Int64, nil
}
