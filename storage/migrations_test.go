package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

func TestMigrationsNumbered(t *testing.T) {
	for i, m := range migrations {
		if m.version != i+1 {
			t.Errorf("migrations[%d] has version %d", i, m.version)
		}
		if m.name == "" || len(m.stmts) == 0 {
			t.Errorf("migration %d has no name or no statements", m.version)
		}
	}
}

func appliedVersions(t *testing.T, s *SQLite) []int {
	t.Helper()
	return column[int](t, s, `SELECT version FROM schema_migrations ORDER BY version`)
}

// column is the one column that query selects, row by row.
func column[T any](t *testing.T, s *SQLite, query string) []T {
	t.Helper()
	rows, err := s.read.Query(query)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		var v T
		if err := rows.Scan(&v); err != nil {
			t.Fatal(err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestMigrateFromVersion1 builds a database as the first schema version
// wrote it, with a host in it, and opens it with this version.
func TestMigrateFromVersion1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, 1, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := appliedVersions(t, old); !reflect.DeepEqual(got, []int{1}) {
		t.Fatalf("versions after openAt(1) = %v", got)
	}
	// Written with SQL, as version 1 would have: the code's statements may
	// need columns that later migrations add.
	if _, err := old.write.Exec(`INSERT INTO hosts (id, name, listen_port, upstream_host, upstream_port,
		enabled, whitelist_cidrs, created_at, updated_at)
		VALUES (3, 'old', 8080, 'backend', 80, 1, '["10.0.0.0/8"]', 1700000000000, 1700000001000)`); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	want := allVersions()
	if got := appliedVersions(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("versions after Open = %v, want %v", got, want)
	}
	ctx := context.Background()
	h, err := s.GetHost(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	if h.Name != "old" || h.ListenPort != 8080 || h.UpstreamHost != "backend" || !h.Enabled ||
		!reflect.DeepEqual(h.WhitelistCIDRs, []string{"10.0.0.0/8"}) ||
		h.CreatedAt.UnixMilli() != 1700000000000 || h.UpdatedAt.UnixMilli() != 1700000001000 {
		t.Errorf("migrated host = %+v", h)
	}
	// What later migrations added works.
	if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 3, Action: ActionAllowed}}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteHost(ctx, 3, nil); err != nil {
		t.Fatal(err)
	}

	// Opening again changes nothing.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := appliedVersions(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("versions after a second Open = %v, want %v", got, want)
	}
}

// TestMigrateFromVersion2 builds a database as the second schema version
// wrote it, with hosts (one referring to a certificate ID, as the API
// allowed before certificates were stored) and a connection log, and opens
// it with this version: everything is kept and certificates work.
func TestMigrateFromVersion2(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, 2, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := appliedVersions(t, old); !reflect.DeepEqual(got, []int{1, 2}) {
		t.Fatalf("versions after openAt(2) = %v", got)
	}
	for _, stmt := range []string{
		`INSERT INTO hosts (id, name, listen_port, upstream_host, upstream_port, ssl_enabled, ssl_cert_id,
			created_at, updated_at) VALUES (1, 'db', 5432, 'pg', 5432, 1, 1, 1700000000000, 1700000000000)`,
		`INSERT INTO hosts (id, name, listen_port, upstream_host, upstream_port, created_at, updated_at)
			VALUES (2, 'web', 8080, 'backend', 80, 1700000000000, 1700000000000)`,
		`INSERT INTO conn_log (stream_id, source_ip, bytes_sent, action, started_at)
			VALUES (1, '192.0.2.1', 100, 'allowed', 1700000000500), (2, '192.0.2.2', 0, 'blocked', 1700000000600)`,
	} {
		if _, err := old.write.Exec(stmt); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, want := appliedVersions(t, s), allVersions(); !reflect.DeepEqual(got, want) {
		t.Errorf("versions after Open = %v, want %v", got, want)
	}
	// Compared field by field: ListHosts reads columns that later
	// migrations add, so it cannot run on the version 2 database.
	created := time.UnixMilli(1700000000000).UTC()
	wantHosts := []Stored{
		{Stream: spec.Stream{ID: 1, Name: "db", ListenPort: 5432, UpstreamHost: "pg", UpstreamPort: 5432, Enabled: true,
			SSLEnabled: true, SSLCertID: 1}, CreatedAt: created, UpdatedAt: created, Version: 1},
		{Stream: spec.Stream{ID: 2, Name: "web", ListenPort: 8080, UpstreamHost: "backend", UpstreamPort: 80, Enabled: true},
			CreatedAt: created, UpdatedAt: created, Version: 1},
	}
	if hosts, err := s.ListHosts(ctx); err != nil || !reflect.DeepEqual(hosts, wantHosts) {
		t.Errorf("hosts after migrating: %+v, %v; want %+v", hosts, err, wantHosts)
	}
	// Read with this version's code, which needs the columns that later
	// migrations add.
	logs, err := s.ConnLogs(ctx, ConnLogQuery{})
	if err != nil || len(logs) != 2 ||
		logs[0].StreamID != 2 || logs[0].SourceIP != "192.0.2.2" || logs[0].Action != ActionBlocked || logs[0].StartedAt.UnixMilli() != 1700000000600 ||
		logs[1].StreamID != 1 || logs[1].SourceIP != "192.0.2.1" || logs[1].BytesSent != 100 || logs[1].StartedAt.UnixMilli() != 1700000000500 {
		t.Errorf("connection log after migrating: %+v, %v", logs, err)
	}
	if certs, err := s.ListCertificates(ctx); err != nil || len(certs) != 0 {
		t.Errorf("certificates after migrating: %+v, %v", certs, err)
	}

	// The new table works, and sees the hosts that were there.
	tc := ecCert(t, "db.example.com")
	c, err := s.CreateCertificate(ctx, customCert(tc, "db"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.ID != 1 {
		t.Fatalf("first certificate has ID %d", c.ID)
	}
	if err := s.DeleteCertificate(ctx, c.ID, nil); !errors.Is(err, ErrInUse) {
		t.Errorf("deleting the certificate the old host names: %v, want ErrInUse", err)
	}
}

// allVersions is every migration's version, in order.
func allVersions() []int {
	want := make([]int, len(migrations))
	for i := range want {
		want[i] = i + 1
	}
	return want
}

// TestMigrateConnLogProtocol builds a database as the schema before the
// connection log had protocols and datagram counts wrote it, with entries
// of a UDP host, a tcp+udp host and a stream of the config only, and
// opens it with this version: the entries are kept, those of the UDP host
// say udp, the others tcp, none has datagram counts, and new entries
// store theirs.
func TestMigrateConnLogProtocol(t *testing.T) {
	// The version before this migration, wherever it is in the list.
	before := slices.IndexFunc(migrations, func(m migration) bool { return m.name == "conn_log protocol and datagram counts" })
	if before < 1 {
		t.Fatalf("no migration adds the connection log's protocol (index %d)", before)
	}
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, before, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Written with SQL, as that version did.
	for _, stmt := range []string{
		`INSERT INTO hosts (id, name, protocol, listen_port, upstream_host, upstream_port, created_at, updated_at)
			VALUES (1, 'dns', 'udp', 53, 'ns', 53, 1700000000000, 1700000000000),
			       (2, 'both', 'tcp+udp', 54, 'ns', 54, 1700000000000, 1700000000000)`,
		`INSERT INTO conn_log (stream_id, source_ip, source_port, bytes_sent, bytes_received, duration_ms, action,
			disconnect_reason, started_at, ended_at) VALUES
			(1, '192.0.2.1', 5353, 40, 80, 1000, 'allowed', 'idle_timeout', 1700000000500, 1700000001500),
			(1, '192.0.2.9', NULL, 0, 0, 0, 'blocked', 'acl_denied', 1700000000600, 1700000000600),
			(2, '192.0.2.2', 4000, 5, 6, 7, 'allowed', 'client_close', 1700000000700, 1700000000707),
			(9, '192.0.2.3', 4001, 8, 9, 10, 'allowed', 'upstream_close', 1700000000800, 1700000000810)`,
	} {
		if _, err := old.write.Exec(stmt); err != nil {
			t.Fatal(err)
		}
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, want := appliedVersions(t, s), allVersions(); !reflect.DeepEqual(got, want) {
		t.Errorf("versions after Open = %v, want %v", got, want)
	}
	ctx := context.Background()
	logs, err := s.ConnLogs(ctx, ConnLogQuery{})
	if err != nil {
		t.Fatal(err)
	}
	at := func(ms int64) jsontime.Time { return jsontime.Of(time.UnixMilli(ms).UTC()) }
	want := []ConnLog{
		{StreamID: 9, SourceIP: "192.0.2.3", SourcePort: 4001, BytesSent: 8, BytesReceived: 9, DurationMS: 10, Action: ActionAllowed,
			DisconnectReason: "upstream_close", StartedAt: at(1700000000800), EndedAt: at(1700000000810), Protocol: ConnTCP},
		{StreamID: 2, SourceIP: "192.0.2.2", SourcePort: 4000, BytesSent: 5, BytesReceived: 6, DurationMS: 7, Action: ActionAllowed,
			DisconnectReason: "client_close", StartedAt: at(1700000000700), EndedAt: at(1700000000707), Protocol: ConnTCP},
		{StreamID: 1, SourceIP: "192.0.2.9", Action: ActionBlocked,
			DisconnectReason: "acl_denied", StartedAt: at(1700000000600), EndedAt: at(1700000000600), Protocol: ConnUDP},
		{StreamID: 1, SourceIP: "192.0.2.1", SourcePort: 5353, BytesSent: 40, BytesReceived: 80, DurationMS: 1000, Action: ActionAllowed,
			DisconnectReason: "idle_timeout", StartedAt: at(1700000000500), EndedAt: at(1700000001500), Protocol: ConnUDP},
	}
	if len(logs) != len(want) {
		t.Fatalf("%d entries after migrating, want %d: %+v", len(logs), len(want), logs)
	}
	for i := range want {
		want[i].ID = logs[i].ID
		if !reflect.DeepEqual(logs[i], want[i]) {
			t.Errorf("entry %d after migrating\n%s\nwant\n%s", i, connLogString(logs[i]), connLogString(want[i]))
		}
	}

	// New entries keep their counts, beside the old ones.
	udp := ConnLog{StreamID: 1, SourceIP: "192.0.2.1", Action: ActionAllowed, Protocol: ConnUDP,
		DatagramsSent: ptr[int64](2), DatagramsReceived: ptr[int64](5)}
	if err := s.AppendConnLogs(ctx, []ConnLog{udp}); err != nil {
		t.Fatal(err)
	}
	logs, err = s.ConnLogs(ctx, ConnLogQuery{StreamID: 1, Limit: 1})
	if err != nil || len(logs) != 1 {
		t.Fatalf("reading the new entry: %+v, %v", logs, err)
	}
	udp.ID = logs[0].ID
	if !reflect.DeepEqual(logs[0], udp) {
		t.Errorf("new entry read back\n%s\nwant\n%s", connLogString(logs[0]), connLogString(udp))
	}
	// The database refuses a protocol it does not know, whatever writes.
	if _, err := s.write.Exec(`INSERT INTO conn_log (stream_id, action, protocol) VALUES (1, 'allowed', 'sctp')`); err == nil {
		t.Error("the database took protocol 'sctp'")
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	newer := len(migrations) + 1
	if _, err := s.write.Exec(`INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'from the future', 0)`, newer); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateHost(context.Background(), genHost(1, 1), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()

	_, err = Open(path)
	if !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("Open of a newer database: %v, want ErrSchemaTooNew", err)
	}
	for _, want := range []string{"storage: open " + path,
		fmt.Sprintf("schema version %d", newer), fmt.Sprintf("up to %d", len(migrations))} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}

	// Refusing it left it alone.
	s, err = openAt(path, 0, OpenOptions{})
	if err == nil {
		defer s.Close()
	}
	if !errors.Is(err, ErrSchemaTooNew) {
		t.Errorf("openAt(0): %v", err)
	}
}

// TestFailedMigrationRollsBack runs a migration whose second statement
// fails: its first statement is rolled back and the version stays.
func TestFailedMigrationRollsBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	s, err := openAt(path, 1, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()

	migs := []migration{
		migrations[0],
		{version: 2, name: "broken", stmts: []string{
			`CREATE TABLE half (x INTEGER)`,
			`ALTER TABLE no_such_table ADD COLUMN y INTEGER`,
		}},
	}
	err = migrate(ctx, s.write, migs, len(migs))
	if err == nil || !strings.Contains(err.Error(), "migrating schema to version 2 (broken)") {
		t.Fatalf("migrate = %v", err)
	}
	if got := appliedVersions(t, s); !reflect.DeepEqual(got, []int{1}) {
		t.Errorf("versions = %v, want [1]", got)
	}
	var n int
	if err := s.read.QueryRow(`SELECT COUNT(*) FROM sqlite_schema WHERE name = 'half'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Error("the failed migration's first statement was kept")
	}

	// Misnumbered migrations are refused before anything runs.
	bad := []migration{migrations[0], {version: 3, name: "gap", stmts: []string{`SELECT 1`}}}
	if err := migrate(ctx, s.write, bad, 3); err == nil {
		t.Error("migrate accepted a gap in versions")
	}
}

// TestMigrateAddsHalfClose opens a database of schema version 3 whose hosts
// predate the half_close setting: they read back with half_close false
// (the default), and the setting takes both values afterwards.
func TestMigrateAddsHalfClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, 3, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.write.Exec(`INSERT INTO hosts (id, name, listen_port, upstream_host, upstream_port,
		log_connections, created_at, updated_at) VALUES (4, 'old', 7000, 'backend', 7000, 1, 1700000000000, 1700000000000)`); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	h, err := s.GetHost(ctx, 4)
	if err != nil {
		t.Fatal(err)
	}
	if h.HalfClose || h.Name != "old" || !h.LogConnections {
		t.Fatalf("host stored before half_close existed: %+v, want half_close false and the rest kept", h)
	}
	h.HalfClose = true
	if _, err := s.UpdateHost(ctx, h.Stream, nil); err != nil {
		t.Fatal(err)
	}
	if h, err = s.GetHost(ctx, 4); err != nil || !h.HalfClose {
		t.Fatalf("after setting half_close: %+v, %v", h, err)
	}
	if _, err := s.write.Exec(`UPDATE hosts SET enabled = 2 WHERE id = 4`); err == nil {
		t.Error("the enabled column took 2; want only 0 or 1")
	}
}

// TestMigrateSettingsToJSON opens a database of schema version 6, written
// with every setting as the code before settings became JSON wrote it,
// with this version: every setting of every host is kept; the settings
// the database indexes or constrains keep their columns and the others
// have none; deleted ids stay unused and versions keep rising; a
// certificate is still refused while a host names it.
func TestMigrateSettingsToJSON(t *testing.T) {
	before := slices.IndexFunc(migrations, func(m migration) bool { return m.name == "hosts settings as JSON" })
	if before < 1 {
		t.Fatalf("no migration moves the settings to JSON (index %d)", before)
	}
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, before, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	// The hosts as the code of that version wrote them (hostValues then),
	// with the settings it had: host 1 sets every one of them, host 2
	// has the opposite booleans, host 5 nothing but the required
	// settings; host 9 is deleted.
	hosts := []spec.Stream{
		{ID: 1, Name: "name-1", Protocol: "tcp+udp", ListenAddress: "::1", ListenPort: 5432,
			UpstreamHost: "db.internal", UpstreamPort: 6432, Enabled: true, MaxConnections: 3,
			ConnectionTimeoutSeconds: 4, IdleTimeoutSeconds: 5, HalfClose: true, ProxyProtocolVersion: 2,
			WhitelistCIDRs: []string{"10.0.0.0/8", "::1"}, BlacklistCIDRs: []string{"10.0.0.9"},
			SSLEnabled: true, SSLCertID: 2, UploadRateBytes: 1 << 40, DownloadRateBytes: 7,
			HealthCheckEnabled: true, HealthCheckIntervalSeconds: 9, LogConnections: true, Notes: "n\u00e9\"'"},
		{ID: 2, Name: "name-2", ListenPort: 5433, UpstreamHost: "db", UpstreamPort: 5433,
			WhitelistCIDRs: []string{"192.0.2.0/24"}},
		{ID: 5, ListenPort: 7000, UpstreamHost: "backend", UpstreamPort: 7000, Enabled: true},
	}
	list := func(l []string) string {
		b, _ := json.Marshal(l)
		if len(l) == 0 {
			return "[]"
		}
		return string(b)
	}
	for _, h := range append(hosts, spec.Stream{ID: 9}) {
		if _, err := old.write.Exec(`INSERT INTO hosts (id, name, protocol, listen_address, listen_port,
	upstream_host, upstream_port, enabled, max_connections,
	connection_timeout_seconds, idle_timeout_seconds, proxy_protocol_version,
	whitelist_cidrs, blacklist_cidrs, ssl_enabled, ssl_cert_id,
	upload_rate_bytes, download_rate_bytes, health_check_enabled,
	health_check_interval_seconds, log_connections, notes,
	half_close, created_at, updated_at, version)
	VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			h.ID, h.Name, h.Protocol, h.ListenAddress, h.ListenPort,
			h.UpstreamHost, h.UpstreamPort, h.Enabled, h.MaxConnections,
			h.ConnectionTimeoutSeconds, h.IdleTimeoutSeconds, h.ProxyProtocolVersion,
			list(h.WhitelistCIDRs), list(h.BlacklistCIDRs), h.SSLEnabled, h.SSLCertID,
			h.UploadRateBytes, h.DownloadRateBytes, h.HealthCheckEnabled,
			h.HealthCheckIntervalSeconds, h.LogConnections, h.Notes,
			h.HalfClose, 1700000000000+h.ID, 1700000001000+h.ID, 10+h.ID); err != nil {
			t.Fatal(err)
		}
	}
	for _, stmt := range []string{`DELETE FROM hosts WHERE id = 9`, `UPDATE host_version SET last = 40`} {
		if _, err := old.write.Exec(stmt); err != nil {
			t.Fatal(err)
		}
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := OpenWith(path, OpenOptions{Key: testKey})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	got, err := s.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(hosts) {
		t.Fatalf("%d hosts after migrating, want %d: %+v", len(got), len(hosts), got)
	}
	for i, h := range hosts {
		want := Stored{Stream: h, CreatedAt: time.UnixMilli(1700000000000 + h.ID).UTC(),
			UpdatedAt: time.UnixMilli(1700000001000 + h.ID).UTC(), Version: 10 + h.ID}
		if !reflect.DeepEqual(got[i], want) {
			t.Errorf("host %d after migrating:\n got %+v\nwant %+v", h.ID, got[i], want)
		}
	}

	// The columns: what the database indexes or constrains, and the rest
	// in settings, which holds none of them.
	cols := column[string](t, s, `SELECT name FROM pragma_table_info('hosts') ORDER BY cid`)
	if want := []string{"id", "protocol", "listen_address", "listen_port", "enabled", "ssl_cert_id",
		"settings", "created_at", "updated_at", "version"}; !reflect.DeepEqual(cols, want) {
		t.Errorf("hosts columns %v, want %v", cols, want)
	}
	var settings string
	if err := s.read.QueryRow(`SELECT settings FROM hosts WHERE id = 1`).Scan(&settings); err != nil {
		t.Fatal(err)
	}
	for _, k := range settingColumns {
		if strings.Contains(settings, `"`+k+`"`) {
			t.Errorf("settings %s hold %s, which has a column", settings, k)
		}
	}

	// Ids and versions go on from where they were.
	if top, err := s.HighestHostID(ctx); err != nil || top != 9 {
		t.Errorf("HighestHostID = %d, %v; want 9, the deleted host's", top, err)
	}
	created, err := s.CreateHost(ctx, spec.Stream{ListenPort: 1, UpstreamHost: "h", UpstreamPort: 1}, nil)
	if err != nil || created.ID != 10 || created.Version != 41 {
		t.Errorf("new host: id %d version %d, %v; want id 10 version 41", created.ID, created.Version, err)
	}
	upd := got[2].Stream
	upd.Notes = "changed"
	if u, err := s.UpdateHost(ctx, upd, nil); err != nil || u.Version != 42 || u.Notes != "changed" {
		t.Errorf("update: %+v, %v; want version 42", u, err)
	}

	// Host 1's ssl_cert_id (2) still holds its certificate.
	for id := 1; id <= 2; id++ {
		tc := ecCert(t, "db.example.com")
		if _, err := s.CreateCertificate(ctx, customCert(tc, "c"), []byte(tc.keyPEM), nil); err != nil {
			t.Fatal(err)
		}
	}
	err = s.DeleteCertificate(ctx, 2, nil)
	if want := `certificate 2 is used by stream 1 ("name-1")`; err == nil || !strings.HasSuffix(err.Error(), want) {
		t.Errorf("deleting host 1's certificate: %v, want %q", err, want)
	}
}

// TestMigrateConnLogNode: entries stored before entries had a node have
// none; new ones carry the node the store was opened with, and the node
// filter tells them apart.
func TestMigrateConnLogNode(t *testing.T) {
	before := slices.IndexFunc(migrations, func(m migration) bool { return m.name == "conn_log node" })
	if before < 1 {
		t.Fatalf("no migration adds the connection log's node (index %d)", before)
	}
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, before, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := old.write.Exec(`INSERT INTO conn_log (stream_id, source_ip, action, bytes_sent) VALUES (1, '192.0.2.1', 'allowed', 1)`); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := OpenWith(path, OpenOptions{Node: "edge-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed, BytesSent: 2}}); err != nil {
		t.Fatal(err)
	}
	logs, err := s.ConnLogs(ctx, ConnLogQuery{})
	if err != nil || len(logs) != 2 {
		t.Fatalf("entries: %+v, %v", logs, err)
	}
	if logs[0].Node != "edge-1" || logs[0].BytesSent != 2 || logs[1].Node != "" || logs[1].BytesSent != 1 {
		t.Errorf("nodes after migrating: %q, %q", logs[0].Node, logs[1].Node)
	}
	if got, err := s.ConnLogs(ctx, ConnLogQuery{Node: "edge-1"}); err != nil || len(got) != 1 || got[0].BytesSent != 2 {
		t.Errorf("filter by node: %+v, %v", got, err)
	}
}

// TestMigrateDropsConnLogNodeIndex: a database of the schema before the
// drop has the (node, id) index; the migrations drop it and then move the
// log into pages, keeping every entry, and the node filter, alone or with
// a stream and a page, still finds exactly the node's entries, newest
// first.
func TestMigrateDropsConnLogNodeIndex(t *testing.T) {
	before := slices.IndexFunc(migrations, func(m migration) bool { return m.name == "drop conn_log_node_id" })
	if before < 1 {
		t.Fatalf("no migration drops conn_log_node_id (index %d)", before)
	}
	path := filepath.Join(t.TempDir(), "aegis.db")
	old, err := openAt(path, before, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	indexes := func(s *SQLite) []string {
		t.Helper()
		return column[string](t, s, `SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'conn_log' AND sql IS NOT NULL ORDER BY name`)
	}
	if got, want := indexes(old), []string{"conn_log_node_id", "conn_log_stream_id_id"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("indexes before the migration: %v, want %v", got, want)
	}
	// Entries of an older node name and of none, as that version stored them.
	if _, err := old.write.Exec(`INSERT INTO conn_log (id, node, stream_id, source_ip, action, bytes_sent) VALUES
		(1, '', 1, '192.0.2.1', 'allowed', 1), (2, 'edge-0', 1, '192.0.2.1', 'allowed', 2),
		(3, 'edge-0', 2, '192.0.2.1', 'allowed', 3), (4, '', 2, '192.0.2.1', 'allowed', 4)`); err != nil {
		t.Fatal(err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}

	s, err := OpenWith(path, OpenOptions{Node: "edge-1"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, want := appliedVersions(t, s), allVersions(); !reflect.DeepEqual(got, want) {
		t.Errorf("versions after Open = %v, want %v", got, want)
	}
	// Then the log moved into pages (TestMigrateConnLogPages).
	if got, want := column[string](t, s, `SELECT name FROM sqlite_master WHERE name LIKE 'conn_log%' AND sql IS NOT NULL ORDER BY name`),
		[]string{"conn_log_ids", "conn_log_pages", "conn_log_pages_stream"}; !reflect.DeepEqual(got, want) {
		t.Errorf("the log's tables and indexes after the migrations: %v, want %v", got, want)
	}
	ctx := context.Background()
	if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed, BytesSent: 5},
		{StreamID: 2, Action: ActionAllowed, BytesSent: 6}, {StreamID: 1, Action: ActionAllowed, BytesSent: 7}}); err != nil {
		t.Fatal(err)
	}
	sent := func(logs []ConnLog) []int64 {
		out := []int64{}
		for _, e := range logs {
			out = append(out, e.BytesSent)
		}
		return out
	}
	for _, c := range []struct {
		q    ConnLogQuery
		want []int64
	}{
		{ConnLogQuery{}, []int64{7, 6, 5, 4, 3, 2, 1}},
		{ConnLogQuery{Node: "edge-1"}, []int64{7, 6, 5}},
		{ConnLogQuery{Node: "edge-0"}, []int64{3, 2}},
		{ConnLogQuery{Node: "edge-0", StreamID: 1}, []int64{2}},
		{ConnLogQuery{Node: "edge-1", StreamID: 1}, []int64{7, 5}},
		{ConnLogQuery{Node: "edge-1", Limit: 1}, []int64{7}},
		{ConnLogQuery{Node: "edge-0", Before: 3}, []int64{2}},
		{ConnLogQuery{Node: "other"}, []int64{}},
	} {
		got, err := s.ConnLogs(ctx, c.q)
		if err != nil {
			t.Fatalf("%+v: %v", c.q, err)
		}
		if !reflect.DeepEqual(sent(got), c.want) {
			t.Errorf("%+v: entries %v, want %v", c.q, sent(got), c.want)
		}
	}
}
