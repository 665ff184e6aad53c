package storage

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// hostColumns are the hosts table's columns in the order scanHost reads
// and hostValues writes them.
const hostColumns = `id, name, protocol, listen_address, listen_port,
	upstream_host, upstream_port, enabled, max_connections,
	connection_timeout_seconds, idle_timeout_seconds, proxy_protocol_version,
	whitelist_cidrs, blacklist_cidrs, ssl_enabled, ssl_cert_id,
	upload_rate_bytes, download_rate_bytes, health_check_enabled,
	health_check_interval_seconds, log_connections, notes,
	half_close, created_at, updated_at, version`

const insertHost = `INSERT INTO hosts (` + hostColumns + `)
	VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`

const updateHost = `UPDATE hosts SET
	name = ?, protocol = ?, listen_address = ?, listen_port = ?,
	upstream_host = ?, upstream_port = ?, enabled = ?, max_connections = ?,
	connection_timeout_seconds = ?, idle_timeout_seconds = ?, proxy_protocol_version = ?,
	whitelist_cidrs = ?, blacklist_cidrs = ?, ssl_enabled = ?, ssl_cert_id = ?,
	upload_rate_bytes = ?, download_rate_bytes = ?, health_check_enabled = ?,
	health_check_interval_seconds = ?, log_connections = ?, notes = ?,
	half_close = ?, created_at = ?, updated_at = ?, version = ?
	WHERE id = ?`

type rowScanner interface {
	Scan(dest ...any) error
}

func scanHost(r rowScanner) (Host, error) {
	var (
		h                    Host
		white, black         string
		createdAt, updatedAt sql.NullInt64
	)
	err := r.Scan(&h.ID, &h.Name, &h.Protocol, &h.ListenAddress, &h.ListenPort,
		&h.UpstreamHost, &h.UpstreamPort, &h.Enabled, &h.MaxConnections,
		&h.ConnectionTimeoutSeconds, &h.IdleTimeoutSeconds, &h.ProxyProtocolVersion,
		&white, &black, &h.SSLEnabled, &h.SSLCertID,
		&h.UploadRateBytes, &h.DownloadRateBytes, &h.HealthCheckEnabled,
		&h.HealthCheckIntervalSeconds, &h.LogConnections, &h.Notes,
		&h.HalfClose, &createdAt, &updatedAt, &h.Version)
	if err != nil {
		return Host{}, err
	}
	if h.WhitelistCIDRs, err = decodeList(white); err != nil {
		return Host{}, fmt.Errorf("host %d: whitelist_cidrs: %v", h.ID, err)
	}
	if h.BlacklistCIDRs, err = decodeList(black); err != nil {
		return Host{}, fmt.Errorf("host %d: blacklist_cidrs: %v", h.ID, err)
	}
	h.CreatedAt = fromMillis(createdAt)
	h.UpdatedAt = fromMillis(updatedAt)
	return h, nil
}

// hostValues are h's columns in hostColumns order, without the ID.
func hostValues(h Host) ([]any, error) {
	white, err := encodeList(h.WhitelistCIDRs)
	if err != nil {
		return nil, fmt.Errorf("whitelist_cidrs: %v", err)
	}
	black, err := encodeList(h.BlacklistCIDRs)
	if err != nil {
		return nil, fmt.Errorf("blacklist_cidrs: %v", err)
	}
	return []any{h.Name, h.Protocol, h.ListenAddress, h.ListenPort,
		h.UpstreamHost, h.UpstreamPort, h.Enabled, h.MaxConnections,
		h.ConnectionTimeoutSeconds, h.IdleTimeoutSeconds, h.ProxyProtocolVersion,
		white, black, h.SSLEnabled, h.SSLCertID,
		h.UploadRateBytes, h.DownloadRateBytes, h.HealthCheckEnabled,
		h.HealthCheckIntervalSeconds, h.LogConnections, h.Notes,
		h.HalfClose, millis(h.CreatedAt), millis(h.UpdatedAt), h.Version}, nil
}

// encodeList stores a list as a JSON array; nil is [].
func encodeList(l []string) (string, error) {
	if len(l) == 0 {
		return "[]", nil
	}
	b, err := json.Marshal(l)
	return string(b), err
}

// decodeList reads a JSON array; an empty one is nil.
func decodeList(s string) ([]string, error) {
	var l []string
	if err := json.Unmarshal([]byte(s), &l); err != nil {
		return nil, err
	}
	if len(l) == 0 {
		return nil, nil
	}
	return l, nil
}

// normalized is h as it reads back from the database: its own copies of
// the lists, nil when empty.
func normalized(h Host) Host {
	h.WhitelistCIDRs = slices.Clip(slices.Clone(h.WhitelistCIDRs))
	h.BlacklistCIDRs = slices.Clip(slices.Clone(h.BlacklistCIDRs))
	if len(h.WhitelistCIDRs) == 0 {
		h.WhitelistCIDRs = nil
	}
	if len(h.BlacklistCIDRs) == 0 {
		h.BlacklistCIDRs = nil
	}
	return h
}

// ListHosts returns every host, ordered by ID.
func (s *SQLite) ListHosts(ctx context.Context) ([]Host, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT `+hostColumns+` FROM hosts ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("storage: listing hosts: %w", err)
	}
	defer rows.Close()
	var hosts []Host
	for rows.Next() {
		h, err := scanHost(rows)
		if err != nil {
			return nil, fmt.Errorf("storage: listing hosts: %w", err)
		}
		hosts = append(hosts, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("storage: listing hosts: %w", err)
	}
	return hosts, nil
}

// GetHost returns the host with the given ID, or ErrNotFound.
func (s *SQLite) GetHost(ctx context.Context, id int64) (Host, error) {
	h, err := getHost(ctx, s.read, id)
	if err != nil {
		return Host{}, fmt.Errorf("storage: getting host %d: %w", id, err)
	}
	return h, nil
}

func getHost(ctx context.Context, q queryRower, id int64) (Host, error) {
	h, err := scanHost(q.QueryRowContext(ctx, `SELECT `+hostColumns+` FROM hosts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return Host{}, ErrNotFound
	}
	return h, err
}

// CreateHost stores a new host; see Store.
func (s *SQLite) CreateHost(ctx context.Context, h Host, apply func(h Host) error) (Host, error) {
	if h.ID < 0 {
		return Host{}, fmt.Errorf("storage: creating host %d: id must be >= 0: %w", h.ID, ErrInvalid)
	}
	h = normalized(h)
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		if h.ID > 0 {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM hosts WHERE id = ?`, h.ID).Scan(&n); err != nil {
				return err
			}
			if n > 0 {
				return ErrConflict
			}
		}
		h.CreatedAt = s.nowMillis()
		h.UpdatedAt = h.CreatedAt
		var err error
		if h.Version, err = nextHostVersion(ctx, tx); err != nil {
			return err
		}
		vals, err := hostValues(h)
		if err != nil {
			return err
		}
		var id any // NULL lets SQLite assign the ID
		if h.ID > 0 {
			id = h.ID
		}
		res, err := tx.ExecContext(ctx, insertHost, append([]any{id}, vals...)...)
		if err != nil {
			return fmt.Errorf("inserting: %w", err)
		}
		if h.ID, err = res.LastInsertId(); err != nil {
			return err
		}
		if apply != nil {
			return apply(normalized(h))
		}
		return nil
	})
	if err != nil {
		if h.ID == 0 { // failed before the store assigned one
			return Host{}, fmt.Errorf("storage: creating host: %w", err)
		}
		return Host{}, fmt.Errorf("storage: creating host %d: %w", h.ID, err)
	}
	return h, nil
}

// UpdateHost replaces a host; see Store.
func (s *SQLite) UpdateHost(ctx context.Context, h Host, apply func(old, new Host) error) (Host, error) {
	h = normalized(h)
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		old, err := getHost(ctx, tx, h.ID)
		if err != nil {
			return err
		}
		h.CreatedAt = old.CreatedAt
		h.UpdatedAt = s.nowMillis()
		if h.Version, err = nextHostVersion(ctx, tx); err != nil {
			return err
		}
		vals, err := hostValues(h)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, updateHost, append(vals, h.ID)...); err != nil {
			return fmt.Errorf("updating: %w", err)
		}
		if apply != nil {
			return apply(old, normalized(h))
		}
		return nil
	})
	if err != nil {
		return Host{}, fmt.Errorf("storage: updating host %d: %w", h.ID, err)
	}
	return h, nil
}

// nextHostVersion takes the next host version, in the write transaction
// tx: it is above every version handed out before, whichever the host.
func nextHostVersion(ctx context.Context, tx *sql.Tx) (int64, error) {
	var v int64
	err := tx.QueryRowContext(ctx, `UPDATE host_version SET last = last + 1 WHERE id = 1 RETURNING last`).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("taking the next host version: %w", err)
	}
	return v, nil
}

// DeleteHost deletes a host and its connection log; see Store.
func (s *SQLite) DeleteHost(ctx context.Context, id int64, apply func(old Host) error) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		old, err := getHost(ctx, tx, id)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM conn_log WHERE stream_id = ?`, id); err != nil {
			return fmt.Errorf("deleting connection log: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM hosts WHERE id = ?`, id); err != nil {
			return fmt.Errorf("deleting: %w", err)
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
