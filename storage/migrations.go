package storage

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// A migration moves the schema from version-1 to version. Each runs in its
// own transaction, together with the schema_migrations row that records it.
type migration struct {
	version int
	name    string
	stmts   []string
}

// migrations is the schema's history, oldest first; the last one is the
// version this code reads and writes. Only ever append: a released
// migration has run on databases out there and must not change.
//
// Timestamps are INTEGER Unix milliseconds (UTC). Tables are STRICT, so a
// value of the wrong type is an error instead of being stored as it comes.
var migrations = []migration{
	{
		version: 1,
		name:    "create hosts",
		stmts: []string{`
CREATE TABLE hosts (
	id                            INTEGER PRIMARY KEY AUTOINCREMENT CHECK (id > 0),
	name                          TEXT    NOT NULL DEFAULT '',
	protocol                      TEXT    NOT NULL DEFAULT '',
	listen_address                TEXT    NOT NULL DEFAULT '',
	listen_port                   INTEGER NOT NULL DEFAULT 0,
	upstream_host                 TEXT    NOT NULL DEFAULT '',
	upstream_port                 INTEGER NOT NULL DEFAULT 0,
	enabled                       INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
	max_connections               INTEGER NOT NULL DEFAULT 0,
	connection_timeout_seconds    INTEGER NOT NULL DEFAULT 0,
	idle_timeout_seconds          INTEGER NOT NULL DEFAULT 0,
	proxy_protocol_version        INTEGER NOT NULL DEFAULT 0,
	whitelist_cidrs               TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(whitelist_cidrs)),
	blacklist_cidrs               TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(blacklist_cidrs)),
	ssl_enabled                   INTEGER NOT NULL DEFAULT 0 CHECK (ssl_enabled IN (0, 1)),
	ssl_cert_id                   INTEGER NOT NULL DEFAULT 0,
	upload_rate_bytes             INTEGER NOT NULL DEFAULT 0,
	download_rate_bytes           INTEGER NOT NULL DEFAULT 0,
	health_check_enabled          INTEGER NOT NULL DEFAULT 0 CHECK (health_check_enabled IN (0, 1)),
	health_check_interval_seconds INTEGER NOT NULL DEFAULT 0,
	log_connections               INTEGER NOT NULL DEFAULT 0 CHECK (log_connections IN (0, 1)),
	notes                         TEXT    NOT NULL DEFAULT '',
	created_at                    INTEGER NOT NULL,
	updated_at                    INTEGER NOT NULL
) STRICT`,
		},
	},
	{
		version: 2,
		name:    "create conn_log",
		// No foreign key to hosts: streams defined only in the Caddy config
		// log connections too, and an entry queued for a stream deleted
		// meanwhile must not fail the batch it is in. DeleteHost deletes
		// the host's entries itself, and host IDs are never reused, so a
		// late entry cannot attach to another host.
		stmts: []string{`
CREATE TABLE conn_log (
	id                INTEGER PRIMARY KEY AUTOINCREMENT,
	stream_id         INTEGER NOT NULL CHECK (stream_id > 0),
	source_ip         TEXT    NOT NULL DEFAULT '',
	source_port       INTEGER,
	bytes_sent        INTEGER NOT NULL DEFAULT 0,
	bytes_received    INTEGER NOT NULL DEFAULT 0,
	duration_ms       INTEGER NOT NULL DEFAULT 0,
	action            TEXT    NOT NULL CHECK (action IN ('allowed', 'blocked')),
	disconnect_reason TEXT    NOT NULL DEFAULT '',
	started_at        INTEGER,
	ended_at          INTEGER
) STRICT`,
			`CREATE INDEX conn_log_stream_id_id ON conn_log (stream_id, id)`,
		},
	},
	{
		version: 3,
		name:    "create certificates",
		// key_sealed is the private key sealed with AES-256-GCM: nonce ||
		// ciphertext, the certificate's ID as additional data. It is set
		// right after the row is inserted (the ID must be known first), so
		// a custom row may be without it inside that transaction; managed
		// rows never have one. hosts.ssl_cert_id cannot reference this
		// table (it is NOT NULL DEFAULT 0, and SQLite cannot add a foreign
		// key to an existing table): DeleteCertificate checks it.
		stmts: []string{`
CREATE TABLE certificates (
	id              INTEGER PRIMARY KEY AUTOINCREMENT CHECK (id > 0),
	name            TEXT    NOT NULL,
	source          TEXT    NOT NULL CHECK (source IN ('custom', 'managed')),
	domains         TEXT    NOT NULL DEFAULT '[]' CHECK (json_valid(domains)),
	issuer          TEXT    NOT NULL DEFAULT '',
	not_before      INTEGER,
	not_after       INTEGER,
	certificate_pem TEXT    NOT NULL DEFAULT '',
	key_sealed      BLOB,
	created_at      INTEGER NOT NULL,
	updated_at      INTEGER NOT NULL,
	CHECK (source = 'custom' OR (key_sealed IS NULL AND certificate_pem = ''))
) STRICT`,
		},
	},
	{
		version: 4,
		name:    "conn_log protocol and datagram counts",
		// Entries from before have no datagram counts (NULL). Their
		// protocol is udp when their stream is a stored UDP-only host,
		// tcp otherwise: the entries of tcp+udp hosts and config streams
		// cannot be told apart.
		stmts: []string{
			`ALTER TABLE conn_log ADD COLUMN protocol TEXT NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp', 'udp'))`,
			`ALTER TABLE conn_log ADD COLUMN datagrams_sent INTEGER`,
			`ALTER TABLE conn_log ADD COLUMN datagrams_received INTEGER`,
			`UPDATE conn_log SET protocol = 'udp' WHERE stream_id IN (SELECT id FROM hosts WHERE protocol = 'udp')`,
		},
	},
	{
		version: 5,
		name:    "add hosts.half_close",
		// Hosts stored before it get false, the default: either side's end
		// closes both.
		stmts: []string{
			`ALTER TABLE hosts ADD COLUMN half_close INTEGER NOT NULL DEFAULT 0 CHECK (half_close IN (0, 1))`,
		},
	},
	{
		version: 6,
		name:    "hosts version",
		// version is the host's version, the API's ETag: every write gives
		// the host the next value of host_version.last, so a version is
		// never handed out twice, not even to a host created again under
		// a deleted one's ID. Hosts already stored start at 1; the hashes
		// that served as versions before cannot match a number.
		stmts: []string{
			`ALTER TABLE hosts ADD COLUMN version INTEGER NOT NULL DEFAULT 1 CHECK (version > 0)`,
			`CREATE TABLE host_version (
	id   INTEGER PRIMARY KEY CHECK (id = 1),
	last INTEGER NOT NULL
) STRICT`,
			`INSERT INTO host_version (id, last) VALUES (1, 1)`,
		},
	},
	{
		version: 7,
		name:    "hosts settings as JSON",
		// A stream's settings move into one JSON object, settings, but for
		// those the database indexes or constrains (id, protocol, listen
		// address and port, enabled, certificate), so that a new setting
		// needs no migration. SQLite cannot drop columns with CHECKs in
		// place: the table is rebuilt, keeping the highest id ever given
		// (sqlite_sequence), so that deleted ids stay unused. An empty
		// list becomes null, which reads back as nil, as the store
		// returns empty lists. The index serves DeleteCertificate's
		// in-use check.
		stmts: []string{`
CREATE TABLE hosts_v7 (
	id             INTEGER PRIMARY KEY AUTOINCREMENT CHECK (id > 0),
	protocol       TEXT    NOT NULL DEFAULT '',
	listen_address TEXT    NOT NULL DEFAULT '',
	listen_port    INTEGER NOT NULL DEFAULT 0,
	enabled        INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
	ssl_cert_id    INTEGER NOT NULL DEFAULT 0,
	settings       TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(settings) AND json_type(settings) = 'object'),
	created_at     INTEGER NOT NULL,
	updated_at     INTEGER NOT NULL,
	version        INTEGER NOT NULL DEFAULT 1 CHECK (version > 0)
) STRICT`,
			`INSERT INTO hosts_v7 (id, protocol, listen_address, listen_port, enabled, ssl_cert_id,
	settings, created_at, updated_at, version)
SELECT id, protocol, listen_address, listen_port, enabled, ssl_cert_id,
	json_object(
		'name', name,
		'upstream_host', upstream_host,
		'upstream_port', upstream_port,
		'max_connections', max_connections,
		'connection_timeout_seconds', connection_timeout_seconds,
		'idle_timeout_seconds', idle_timeout_seconds,
		'half_close', json(CASE half_close WHEN 1 THEN 'true' ELSE 'false' END),
		'proxy_protocol_version', proxy_protocol_version,
		'whitelist_cidrs', CASE json_array_length(whitelist_cidrs) WHEN 0 THEN NULL ELSE json(whitelist_cidrs) END,
		'blacklist_cidrs', CASE json_array_length(blacklist_cidrs) WHEN 0 THEN NULL ELSE json(blacklist_cidrs) END,
		'ssl_enabled', json(CASE ssl_enabled WHEN 1 THEN 'true' ELSE 'false' END),
		'upload_rate_bytes', upload_rate_bytes,
		'download_rate_bytes', download_rate_bytes,
		'health_check_enabled', json(CASE health_check_enabled WHEN 1 THEN 'true' ELSE 'false' END),
		'health_check_interval_seconds', health_check_interval_seconds,
		'log_connections', json(CASE log_connections WHEN 1 THEN 'true' ELSE 'false' END),
		'notes', notes),
	created_at, updated_at, version
FROM hosts`,
			`DELETE FROM sqlite_sequence WHERE name = 'hosts_v7'`,
			`INSERT INTO sqlite_sequence (name, seq) SELECT 'hosts_v7', seq FROM sqlite_sequence WHERE name = 'hosts'`,
			`DROP TABLE hosts`,
			`ALTER TABLE hosts_v7 RENAME TO hosts`,
			`CREATE INDEX hosts_ssl_cert_id ON hosts (ssl_cert_id)`,
		},
	},
	{
		version: 8,
		name:    "conn_log node",
		// The name of the node that took the connection (OpenOptions.Node);
		// entries from before have none. The index serves the log's
		// filter by node.
		stmts: []string{
			`ALTER TABLE conn_log ADD COLUMN node TEXT NOT NULL DEFAULT ''`,
			`CREATE INDEX conn_log_node_id ON conn_log (node, id)`,
		},
	},
	{
		version: 9,
		name:    "create key_canary",
		// The canary sealed with the key that seals the private keys (see
		// KeyCheck): written at the first open with a key, replaced only
		// by ForgetKeys.
		stmts: []string{`
CREATE TABLE key_canary (
	id     INTEGER PRIMARY KEY CHECK (id = 1),
	sealed BLOB    NOT NULL
) STRICT`,
		},
	},
	{
		version: 10,
		name:    "conn_log upstream",
		// The upstream (host:port) each connection went to; entries from
		// before have none.
		stmts: []string{
			`ALTER TABLE conn_log ADD COLUMN upstream TEXT NOT NULL DEFAULT ''`,
		},
	},
	{
		version: 11,
		name:    "create audit_log",
		// Every change made through the API (AuditEntry); changes is the
		// JSON list of AuditChange. No foreign keys: the entries of a
		// deleted stream or certificate stay.
		stmts: []string{`
CREATE TABLE audit_log (
	id             INTEGER PRIMARY KEY AUTOINCREMENT,
	at             INTEGER NOT NULL,
	node           TEXT    NOT NULL DEFAULT '',
	actor          TEXT    NOT NULL,
	remote         TEXT    NOT NULL DEFAULT '',
	action         TEXT    NOT NULL,
	stream_id      INTEGER NOT NULL DEFAULT 0,
	certificate_id INTEGER NOT NULL DEFAULT 0,
	name           TEXT    NOT NULL DEFAULT '',
	changes        TEXT    NOT NULL DEFAULT '[]'
) STRICT`,
			`CREATE INDEX audit_log_stream_id_id ON audit_log (stream_id, id)`,
		},
	},
	{
		version: 12,
		name:    "drop conn_log_node_id",
		// A SQLite store is one node: every entry it writes has its node
		// name, so the (node, id) index told no rows apart and cost each
		// stored entry a fifth (BenchmarkConnLogSteady). The log's filter
		// by node (ConnLogQuery.Node) stays right without it: it walks the
		// entries newest first (by id, or by the (stream_id, id) index for
		// one stream) and keeps those of the node, which on one node are
		// all of them, or none but those of an older node name.
		// PostgreSQL, several nodes in one table, keeps its index.
		stmts: []string{
			`DROP INDEX conn_log_node_id`,
		},
	},
	{
		version: 13,
		name:    "conn_log pages",
		// The connection log in pages (connlogpage.go): a row of up to 64
		// entries of one stream and node, as a JSON array, instead of a
		// row per entry, which cost each entry about 6.6 µs of the
		// proxy's CPU. conn_log_ids hands out the entries' IDs, above
		// every ID conn_log had (AUTOINCREMENT's sqlite_sequence), so
		// that IDs stay increasing and are never reused. The old rows
		// move into pages of their stream, node and 64 IDs.
		stmts: []string{
			`CREATE TABLE conn_log_pages (
	last_id   INTEGER PRIMARY KEY,
	stream_id INTEGER NOT NULL CHECK (stream_id > 0),
	first_id  INTEGER NOT NULL CHECK (first_id <= last_id),
	n         INTEGER NOT NULL CHECK (n > 0),
	node      TEXT    NOT NULL DEFAULT '',
	entries   TEXT    NOT NULL
) STRICT`,
			`CREATE INDEX conn_log_pages_stream ON conn_log_pages (stream_id, last_id, n)`,
			`CREATE TABLE conn_log_ids (next INTEGER NOT NULL) STRICT`,
			`INSERT INTO conn_log_ids (next) SELECT max(
	coalesce((SELECT max(id) FROM conn_log), 0),
	coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'conn_log'), 0)) + 1`,
			`INSERT INTO conn_log_pages (last_id, stream_id, first_id, n, node, entries)
	SELECT max(id), stream_id, min(id), count(*), node,
		json_group_array(json_array(id, source_ip, source_port, bytes_sent, bytes_received, duration_ms, action, disconnect_reason, started_at, ended_at, protocol, datagrams_sent, datagrams_received, upstream) ORDER BY id)
	FROM conn_log GROUP BY stream_id, node, id / 64`,
			`DROP TABLE conn_log`,
		},
	},
}

// migrate applies the migrations in migs above the database's version, up
// to and including target, each in its own transaction. It refuses a
// database whose version is beyond the last of migs.
func migrate(ctx context.Context, db *sql.DB, migs []migration, target int) error {
	for i, m := range migs {
		if m.version != i+1 {
			return fmt.Errorf("migration %d %q: version must be %d", m.version, m.name, i+1)
		}
	}
	known := len(migs)
	if target > known {
		target = known
	}

	if _, err := db.ExecContext(ctx, `
CREATE TABLE IF NOT EXISTS schema_migrations (
	version    INTEGER PRIMARY KEY,
	name       TEXT    NOT NULL,
	applied_at INTEGER NOT NULL
) STRICT`); err != nil {
		return fmt.Errorf("creating schema_migrations: %w", err)
	}
	v, err := schemaVersion(ctx, db)
	if err != nil {
		return err
	}
	if v > known {
		return fmt.Errorf("schema version %d, this version knows up to %d: %w", v, known, ErrSchemaTooNew)
	}

	for _, m := range migs {
		if m.version <= v || m.version > target {
			continue
		}
		if err := applyMigration(ctx, db, m, known); err != nil {
			return fmt.Errorf("migrating schema to version %d (%s): %w", m.version, m.name, err)
		}
	}
	return nil
}

// applyMigration runs one migration in a transaction, unless another
// process has applied it meanwhile.
func applyMigration(ctx context.Context, db *sql.DB, m migration, known int) error {
	// db begins with BEGIN IMMEDIATE: holding the write lock, the version
	// read below cannot change until commit.
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("beginning transaction: %w", err)
	}
	defer tx.Rollback()

	v, err := schemaVersion(ctx, tx)
	if err != nil {
		return err
	}
	if v > known {
		return fmt.Errorf("schema version %d, this version knows up to %d: %w", v, known, ErrSchemaTooNew)
	}
	if v >= m.version {
		return nil
	}
	if v != m.version-1 {
		return fmt.Errorf("schema version is %d, want %d", v, m.version-1)
	}
	for _, stmt := range m.stmts {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return err
		}
	}
	if _, err := tx.ExecContext(ctx,
		`INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
		m.version, m.name, time.Now().UnixMilli()); err != nil {
		return fmt.Errorf("recording migration: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("committing: %w", err)
	}
	return nil
}

type queryRower interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// schemaVersion is the highest migration applied; 0 for a new database.
func schemaVersion(ctx context.Context, q queryRower) (int, error) {
	var v int
	if err := q.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v); err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	return v, nil
}
