package storage

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// pgMigrations is the PostgreSQL schema's history, oldest first, as
// migrations is SQLite's: only ever append.
//
// The tables are SQLite's, with the same columns where the two stores
// share their statements: timestamps of hosts, certificates and the
// connection log are BIGINT Unix milliseconds (UTC); integers are
// BIGINT, as SQLite's; settings and domains are JSON, kept as written
// (JSONB could not hold a string with \u0000 in it). IDs stay below 2^53
// (JavaScript numbers); those of hosts and certificates come from
// counters, which only grow, so a deleted row's ID is not given out
// again. Then what SQLite does not need: changes, the history every node
// follows (counters' "changes pruned" is the highest change ID pruned),
// and nodes, their heartbeats.
var pgMigrations = []migration{
	{
		version: 1,
		name:    "create schema",
		stmts: []string{`
CREATE TABLE hosts (
	id             BIGINT  PRIMARY KEY CHECK (id BETWEEN 1 AND 9007199254740991),
	protocol       TEXT    NOT NULL DEFAULT '',
	listen_address TEXT    NOT NULL DEFAULT '',
	listen_port    BIGINT  NOT NULL DEFAULT 0,
	enabled        BOOLEAN NOT NULL DEFAULT true,
	ssl_cert_id    BIGINT  NOT NULL DEFAULT 0,
	settings       JSON    NOT NULL DEFAULT '{}' CHECK (json_typeof(settings) = 'object'),
	created_at     BIGINT  NOT NULL,
	updated_at     BIGINT  NOT NULL,
	version        BIGINT  NOT NULL CHECK (version > 0)
)`,
			`CREATE INDEX hosts_ssl_cert_id ON hosts (ssl_cert_id)`,
			`CREATE TABLE host_version (
	id   INTEGER PRIMARY KEY CHECK (id = 1),
	last BIGINT  NOT NULL
)`,
			`INSERT INTO host_version (id, last) VALUES (1, 0)`,
			`CREATE TABLE counters (
	name TEXT   PRIMARY KEY,
	last BIGINT NOT NULL
)`,
			`INSERT INTO counters (name, last) VALUES ('hosts', 0), ('certificates', 0), ('changes pruned', 0)`,
			`CREATE TABLE certificates (
	id              BIGINT PRIMARY KEY CHECK (id BETWEEN 1 AND 9007199254740991),
	name            TEXT   NOT NULL,
	source          TEXT   NOT NULL CHECK (source IN ('custom', 'managed')),
	domains         JSON   NOT NULL DEFAULT '[]' CHECK (json_typeof(domains) = 'array'),
	issuer          TEXT   NOT NULL DEFAULT '',
	not_before      BIGINT,
	not_after       BIGINT,
	certificate_pem TEXT   NOT NULL DEFAULT '',
	key_sealed      BYTEA,
	created_at      BIGINT NOT NULL,
	updated_at      BIGINT NOT NULL,
	CHECK (source = 'custom' OR (key_sealed IS NULL AND certificate_pem = ''))
)`,
			`CREATE TABLE conn_log (
	id                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	node               TEXT    NOT NULL DEFAULT '',
	stream_id          BIGINT  NOT NULL CHECK (stream_id > 0),
	source_ip          TEXT    NOT NULL DEFAULT '',
	source_port        BIGINT,
	bytes_sent         BIGINT  NOT NULL DEFAULT 0,
	bytes_received     BIGINT  NOT NULL DEFAULT 0,
	duration_ms        BIGINT  NOT NULL DEFAULT 0,
	action             TEXT    NOT NULL CHECK (action IN ('allowed', 'blocked')),
	disconnect_reason  TEXT    NOT NULL DEFAULT '',
	started_at         BIGINT,
	ended_at           BIGINT,
	protocol           TEXT    NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp', 'udp')),
	datagrams_sent     BIGINT,
	datagrams_received BIGINT
)`,
			`CREATE INDEX conn_log_stream_id_id ON conn_log (stream_id, id)`,
			`CREATE INDEX conn_log_node_id ON conn_log (node, id)`,
			`CREATE TABLE changes (
	id        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	kind      TEXT        NOT NULL CHECK (kind IN ('stream', 'certificate')),
	op        TEXT        NOT NULL CHECK (op IN ('create', 'update', 'delete')),
	object_id BIGINT      NOT NULL,
	node      TEXT        NOT NULL,
	at        TIMESTAMPTZ NOT NULL DEFAULT now()
)`,
			`CREATE TABLE nodes (
	name           TEXT        PRIMARY KEY,
	address        TEXT        NOT NULL DEFAULT '',
	version        TEXT        NOT NULL DEFAULT '',
	applied_change BIGINT      NOT NULL DEFAULT 0,
	snapshot       BOOLEAN     NOT NULL DEFAULT false,
	streams        JSONB,
	last_seen      TIMESTAMPTZ NOT NULL
)`,
			// The canary sealed with the key that seals the private keys
			// (see KeyCheck): written by the first node that opens the
			// database with a key, replaced only by ForgetKeys.
			`CREATE TABLE key_canary (
	id     INTEGER PRIMARY KEY CHECK (id = 1),
	sealed BYTEA   NOT NULL
)`,
		},
	},
	{
		version: 2,
		name:    "conn_log upstream",
		// The upstream (host:port) each connection went to, as SQLite's
		// migration 10.
		stmts: []string{
			`ALTER TABLE conn_log ADD COLUMN upstream TEXT NOT NULL DEFAULT ''`,
		},
	},
	{
		version: 3,
		name:    "audit_log, stream_history, aegis_in_net",
		// The audit log as SQLite's migration 11; each node's 10 s
		// samples of its streams (HistorySample), pruned after 24 hours;
		// and the connection log's source filter, which SQLite has as a
		// Go function (a text that is not an address is in no network).
		stmts: []string{
			`CREATE TABLE audit_log (
	id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	at             BIGINT NOT NULL,
	node           TEXT   NOT NULL DEFAULT '',
	actor          TEXT   NOT NULL,
	remote         TEXT   NOT NULL DEFAULT '',
	action         TEXT   NOT NULL,
	stream_id      BIGINT NOT NULL DEFAULT 0,
	certificate_id BIGINT NOT NULL DEFAULT 0,
	name           TEXT   NOT NULL DEFAULT '',
	changes        TEXT   NOT NULL DEFAULT '[]'
)`,
			`CREATE INDEX audit_log_stream_id_id ON audit_log (stream_id, id)`,
			`CREATE TABLE stream_history (
	node           TEXT             NOT NULL,
	stream_id      BIGINT           NOT NULL,
	t              BIGINT           NOT NULL,
	bytes_sent     DOUBLE PRECISION NOT NULL,
	bytes_received DOUBLE PRECISION NOT NULL,
	connections    DOUBLE PRECISION NOT NULL,
	active         BIGINT           NOT NULL,
	blocked        DOUBLE PRECISION NOT NULL,
	dial_failures  DOUBLE PRECISION NOT NULL,
	healthy        BOOLEAN,
	PRIMARY KEY (stream_id, node, t)
)`,
			`CREATE INDEX stream_history_t ON stream_history (t)`,
			`CREATE FUNCTION aegis_in_net(ip TEXT, net TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	RETURN ip::inet <<= net::inet;
EXCEPTION WHEN others THEN
	RETURN false;
END
$$`,
		},
	},
	{
		version: 4,
		name:    "aegis_in_net as SQLite's",
		// As SQLite's Go function (sqlitefuncs.go): an address's zone is
		// left out, and an IPv4-mapped address is in its IPv4 networks
		// too. inet takes neither form as it is.
		stmts: []string{
			`CREATE OR REPLACE FUNCTION aegis_in_net(ip TEXT, net TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	a inet;
	n inet;
BEGIN
	a := split_part(ip, '%', 1)::inet;
	n := net::inet;
	IF a <<= n THEN
		RETURN true;
	END IF;
	IF family(a) = 6 AND a << '::ffff:0:0/96'::inet THEN
		RETURN '0.0.0.0'::inet + (host(a)::inet - '::ffff:0.0.0.0'::inet) <<= n;
	END IF;
	RETURN false;
EXCEPTION WHEN others THEN
	RETURN false;
END
$$`,
		},
	},
	{
		version: 5,
		name:    "conn_log pages",
		// The connection log in pages, as SQLite's migration 13; an
		// index by node for the log's node filter. The source filter now
		// runs in Go (ConnLogQuery.matches), so aegis_in_net goes.
		stmts: []string{
			`CREATE TABLE conn_log_pages (
	last_id   BIGINT  PRIMARY KEY,
	stream_id BIGINT  NOT NULL CHECK (stream_id > 0),
	first_id  BIGINT  NOT NULL CHECK (first_id <= last_id),
	n         INTEGER NOT NULL CHECK (n > 0),
	node      TEXT    NOT NULL DEFAULT '',
	entries   TEXT    NOT NULL
)`,
			`CREATE INDEX conn_log_pages_stream ON conn_log_pages (stream_id, last_id, n)`,
			`CREATE INDEX conn_log_pages_node_last_id ON conn_log_pages (node, last_id)`,
			`CREATE TABLE conn_log_ids (next BIGINT NOT NULL)`,
			`INSERT INTO conn_log_ids (next) SELECT greatest(
	coalesce((SELECT max(id) FROM conn_log), 0),
	coalesce(pg_sequence_last_value(pg_get_serial_sequence('conn_log', 'id')::regclass), 0)) + 1`,
			`INSERT INTO conn_log_pages (last_id, stream_id, first_id, n, node, entries)
	SELECT max(id), stream_id, min(id), count(*), node,
		json_agg(json_build_array(id, source_ip, source_port, bytes_sent, bytes_received, duration_ms, action, disconnect_reason, started_at, ended_at, protocol, datagrams_sent, datagrams_received, upstream) ORDER BY id)::text
	FROM conn_log GROUP BY stream_id, node, id / 64`,
			`DROP TABLE conn_log`,
			`DROP FUNCTION aegis_in_net(TEXT, TEXT)`,
		},
	},
}

// migrate brings the schema up to the last of migs, on a connection of
// its own that holds the migration lock meanwhile, so that nodes starting
// together migrate one at a time: the others then find the work done.
func (p *Postgres) migrate(ctx context.Context, migs []migration) error {
	conn, err := pgx.ConnectConfig(ctx, p.conn.Copy())
	if err != nil {
		return p.unavailable(err)
	}
	defer conn.Close(context.WithoutCancel(ctx)) // ends the session: releases the lock
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1, $2)`, lockClass, migrateLock); err != nil {
		return p.unavailable(fmt.Errorf("taking the migration lock: %w", err))
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
	version    INTEGER     PRIMARY KEY,
	name       TEXT        NOT NULL,
	applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)`); err != nil {
		return p.unavailable(fmt.Errorf("creating schema_migrations: %w", err))
	}
	var v int
	if err := conn.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v); err != nil {
		return p.unavailable(fmt.Errorf("reading schema version: %w", err))
	}
	if v > len(migs) {
		return fmt.Errorf("schema version %d, this version knows up to %d: %w", v, len(migs), ErrSchemaTooNew)
	}
	for _, m := range migs[v:] {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for _, stmt := range m.stmts {
				if _, err := tx.Exec(ctx, stmt); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version, name) VALUES ($1, $2)`, m.version, m.name)
			return err
		})
		if err != nil {
			return p.unavailable(fmt.Errorf("migrating schema to version %d (%s): %w", m.version, m.name, err))
		}
	}
	return nil
}
