package storage

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
)

// oldConnLogRows are entries as a schema before pages stored them, one
// row each, with their IDs: two streams and two nodes, so that the
// migration makes pages of each stream and node (IDs 1–63, 64–127), NULLs
// (no port, no times, no datagram counts), big numbers and strings that
// JSON must escape.
func oldConnLogRows() []ConnLog {
	start := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	var out []ConnLog
	for id := int64(1); id <= 70; id++ {
		e := ConnLog{ID: id, StreamID: 1 + id%2, Node: []string{"edge-0", ""}[id%3/2],
			SourceIP: "192.0.2.7", SourcePort: int(id * 900 % 65536), BytesSent: id << 40, BytesReceived: id,
			DurationMS: id * 3, Action: ActionAllowed, DisconnectReason: "client_close", Protocol: ConnTCP,
			Upstream: fmt.Sprintf("up-%d.example:5432", id%4)}
		if id%5 == 0 {
			e.SourceIP, e.SourcePort, e.Action, e.DisconnectReason, e.Upstream = "2001:db8::9", 0, ActionBlocked, "whitelist", ""
		}
		if id%7 != 0 {
			e.StartedAt = jsontime.Of(start.Add(time.Duration(id) * time.Second))
			e.EndedAt = jsontime.Of(start.Add(time.Duration(id)*time.Second + 1500*time.Millisecond))
		}
		if id%3 == 0 {
			e.Protocol, e.DatagramsSent = ConnUDP, ptr(id*10)
			if id%2 == 0 {
				e.DatagramsReceived = ptr(int64(0))
			}
		}
		if id == 13 {
			e.DisconnectReason = "quote \" backslash \\ tab \t newline \n bell \x07 é ✓"
		}
		out = append(out, e)
	}
	return out
}

// sqlValue is v as an SQL literal both databases read alike.
func sqlValue(v any) string {
	switch v := v.(type) {
	case nil:
		return "NULL"
	case string:
		return "'" + strings.ReplaceAll(v, "'", "''") + "'"
	default:
		return fmt.Sprint(v)
	}
}

// oldConnLogInsert is the INSERT of rows into the old conn_log table.
func oldConnLogInsert(rows []ConnLog) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO conn_log (id, node, stream_id, source_ip, source_port, bytes_sent, bytes_received,
	duration_ms, action, disconnect_reason, started_at, ended_at, protocol, datagrams_sent, datagrams_received, upstream) VALUES `)
	for i, e := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		millis := func(t jsontime.Time) any {
			if t.IsZero() {
				return nil
			}
			return t.UnixMilli()
		}
		ptrv := func(p *int64) any {
			if p == nil {
				return nil
			}
			return *p
		}
		var port any
		if e.SourcePort != 0 {
			port = e.SourcePort
		}
		vals := []any{e.ID, e.Node, e.StreamID, e.SourceIP, port, e.BytesSent, e.BytesReceived, e.DurationMS, e.Action,
			e.DisconnectReason, millis(e.StartedAt), millis(e.EndedAt), e.Protocol, ptrv(e.DatagramsSent),
			ptrv(e.DatagramsReceived), e.Upstream}
		b.WriteString("(")
		for j, v := range vals {
			if j > 0 {
				b.WriteString(", ")
			}
			b.WriteString(sqlValue(v))
		}
		b.WriteString(")")
	}
	return b.String()
}

// TestMigrateConnLogPages: entries stored a row each, as the schema
// before pages had them, read back after the migration exactly as they
// were, newest first, with their IDs, by stream, node and filter; and
// the next entry's ID is above every ID the old table ever gave, even
// one whose row was deleted since.
func TestMigrateConnLogPages(t *testing.T) { eachBackend(t, testMigrateConnLogPages) }

func testMigrateConnLogPages(t *testing.T, b testBackend) {
	ctx := context.Background()
	rows := oldConnLogRows()
	db := b.newDB(t)
	insert := oldConnLogInsert(append(rows, ConnLog{ID: 99, StreamID: 1, Action: ActionAllowed, Protocol: ConnTCP}))
	deleteLast := `DELETE FROM conn_log WHERE id = 99`
	switch b.name {
	case "sqlite":
		old, err := openAt(db, connLogPagesVersion-1, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range []string{insert, deleteLast} {
			if _, err := old.write.Exec(q); err != nil {
				old.Close()
				t.Fatal(err)
			}
		}
		if err := old.Close(); err != nil {
			t.Fatal(err)
		}
	case "postgres":
		cfg, err := pgx.ParseConfig(db)
		if err != nil {
			t.Fatal(err)
		}
		before := slices.IndexFunc(pgMigrations, func(m migration) bool { return m.name == "conn_log pages" })
		if err := (&Postgres{conn: cfg, life: ctx}).migrate(ctx, pgMigrations[:before]); err != nil {
			t.Fatal(err)
		}
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range []string{strings.Replace(insert, ") VALUES ", ") OVERRIDING SYSTEM VALUE VALUES ", 1),
			`SELECT setval(pg_get_serial_sequence('conn_log', 'id'), 99)`, deleteLast} {
			if _, err := conn.Exec(ctx, q); err != nil {
				conn.Close(ctx)
				t.Fatal(err)
			}
		}
		conn.Close(ctx)
	}
	s := b.open(t, db, nil)

	newestFirst := slices.Clone(rows)
	slices.Reverse(newestFirst)
	pick := func(keep func(e ConnLog) bool) []ConnLog {
		out := []ConnLog{}
		for _, e := range newestFirst {
			if keep(e) {
				out = append(out, e)
			}
		}
		return out
	}
	for _, tc := range []struct {
		q    ConnLogQuery
		want []ConnLog
	}{
		{ConnLogQuery{Limit: 1000}, newestFirst},
		{ConnLogQuery{StreamID: 2, Limit: 1000}, pick(func(e ConnLog) bool { return e.StreamID == 2 })},
		{ConnLogQuery{Node: "edge-0", Limit: 1000}, pick(func(e ConnLog) bool { return e.Node == "edge-0" })},
		{ConnLogQuery{StreamID: 1, Before: 64, Limit: 5}, pick(func(e ConnLog) bool { return e.StreamID == 1 && e.ID < 64 })[:5]},
		{ConnLogQuery{Action: ActionBlocked, Limit: 1000}, pick(func(e ConnLog) bool { return e.Action == ActionBlocked })},
		{ConnLogQuery{Source: netip.MustParsePrefix("2001:db8::/32"), Limit: 1000}, pick(func(e ConnLog) bool { return e.SourceIP == "2001:db8::9" })},
	} {
		got, err := s.ConnLogs(ctx, tc.q)
		if err != nil {
			t.Fatalf("%+v: %v", tc.q, err)
		}
		if len(got) != len(tc.want) {
			t.Fatalf("%+v: %d entries, want %d", tc.q, len(got), len(tc.want))
		}
		for i := range got {
			if !reflect.DeepEqual(got[i], tc.want[i]) {
				t.Fatalf("%+v: entry %d\n%s\nwant\n%s", tc.q, i, connLogString(got[i]), connLogString(tc.want[i]))
			}
		}
	}
	if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed}}); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConnLogs(ctx, ConnLogQuery{Limit: 1})
	if err != nil || len(got) != 1 || got[0].ID <= 99 {
		t.Fatalf("the first entry after the migration: %+v, %v; want an ID above 99, the old table's highest", got, err)
	}
}

// TestConnLogsMatchTheirFilters: whatever the query, ConnLogs returns
// exactly the newest Limit entries that its filters select, newest first,
// from a log written in batches whose streams' pages overlap (a batch
// takes its IDs in order, and writes each stream's entries apart).
func TestConnLogsMatchTheirFilters(t *testing.T) { eachBackend(t, testConnLogsMatchTheirFilters) }

func testConnLogsMatchTheirFilters(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	var all []ConnLog // oldest first, as written
	for batch := range 12 {
		entries := make([]ConnLog, 1+rng.IntN(150))
		for i := range entries {
			e := ConnLog{StreamID: 1 + rng.Int64N(3), SourceIP: fmt.Sprintf("10.0.%d.1", rng.IntN(4)), SourcePort: rng.IntN(3),
				BytesSent: int64(batch*1000 + i), Action: ActionAllowed, DisconnectReason: []string{"client_close", "idle_timeout"}[rng.IntN(2)]}
			if rng.IntN(5) == 0 {
				e.Action = ActionBlocked
			}
			if rng.IntN(4) != 0 {
				e.EndedAt = jsontime.Of(start.Add(time.Duration(rng.IntN(100)) * time.Second))
			}
			entries[i] = e
		}
		if err := s.AppendConnLogs(ctx, entries); err != nil {
			t.Fatal(err)
		}
		all = append(all, entries...)
	}
	stored, err := s.ConnLogs(ctx, ConnLogQuery{Limit: MaxConnLogExportLimit})
	if err != nil || len(stored) != len(all) {
		t.Fatalf("%d entries stored (%v), want %d", len(stored), err, len(all))
	}
	for i, e := range stored { // IDs in the order written
		if want := all[len(all)-1-i]; e.BytesSent != want.BytesSent {
			t.Fatalf("entry %d newest first: bytes_sent %d, want %d", i, e.BytesSent, want.BytesSent)
		}
	}
	for range 300 {
		q := ConnLogQuery{Limit: 1 + rng.IntN(120)}
		if rng.IntN(2) == 0 {
			q.StreamID = 1 + rng.Int64N(3)
		}
		if rng.IntN(2) == 0 {
			q.Before = stored[rng.IntN(len(stored))].ID
		}
		switch rng.IntN(5) {
		case 0:
			q.Action = ActionBlocked
		case 1:
			q.Reason = "idle_timeout"
		case 2:
			q.Source = netip.MustParsePrefix(fmt.Sprintf("10.0.%d.0/24", rng.IntN(4)))
		case 3:
			q.Since = start.Add(time.Duration(rng.IntN(100)) * time.Second)
			q.Until = q.Since.Add(time.Duration(rng.IntN(50)) * time.Second)
		}
		want := []ConnLog{}
		for _, e := range stored {
			if len(want) < q.Limit && (q.StreamID == 0 || e.StreamID == q.StreamID) && (q.Before == 0 || e.ID < q.Before) &&
				(q.Action == "" || e.Action == q.Action) && (q.Reason == "" || e.DisconnectReason == q.Reason) &&
				(!q.Source.IsValid() || q.Source.Contains(netip.MustParseAddr(e.SourceIP))) &&
				(q.Since.IsZero() || !e.EndedAt.IsZero() && !e.EndedAt.Before(q.Since) && e.EndedAt.Before(q.Until)) {
				want = append(want, e)
			}
		}
		got, err := s.ConnLogs(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ids(got), ids(want)) {
			t.Fatalf("%+v:\n got IDs %v\nwant IDs %v", q, ids(got), ids(want))
		}
	}
}

func ids(es []ConnLog) []int64 {
	out := []int64{}
	for _, e := range es {
		out = append(out, e.ID)
	}
	return out
}

// TestCutPage: a page without its oldest entries keeps the rest as they
// were, and names the oldest left; a cut that would leave nothing, or a
// text that is not a page, is an error.
func TestCutPage(t *testing.T) {
	var page []byte
	page = append(page, '[')
	for i, e := range oldConnLogRows()[:5] {
		if i > 0 {
			page = append(page, ',')
		}
		page = appendPageEntry(page, 100+int64(i), e)
	}
	page = append(page, ']')
	rest, first, err := cutPage(string(page), 2)
	if err != nil || first != 102 {
		t.Fatalf("cut 2: first %d, %v; want 102", first, err)
	}
	got, err := decodePage(rest, nil)
	if err != nil || len(got) != 3 || got[0].ID != 102 || got[2].ID != 104 || got[2].BytesSent != 5<<40 {
		t.Fatalf("cut 2 left %+v, %v", got, err)
	}
	for _, tc := range []struct {
		text string
		drop int
	}{{string(page), 0}, {string(page), 5}, {"[1,2", 1}, {`[[1],[2]]`, 1}, {`{}`, 1}} {
		if _, _, err := cutPage(tc.text, tc.drop); err == nil {
			t.Errorf("cutPage(%q, %d): no error", tc.text, tc.drop)
		}
	}
}

// jsonEntry is a pageEntry that encoding/json decodes from its array:
// what decodePage must agree with.
type jsonEntry pageEntry

func (je *jsonEntry) UnmarshalJSON(b []byte) error {
	var values []json.RawMessage
	if err := json.Unmarshal(b, &values); err != nil {
		return err
	}
	if len(values) != len(pageColumns) {
		return fmt.Errorf("an entry of %d values, want %d", len(values), len(pageColumns))
	}
	*je = jsonEntry{}
	for i, f := range []any{&je.ID, &je.SourceIP, &je.SourcePort, &je.BytesSent, &je.BytesReceived, &je.DurationMS,
		&je.Action, &je.DisconnectReason, &je.StartedAt, &je.EndedAt, &je.Protocol, &je.DatagramsSent,
		&je.DatagramsReceived, &je.Upstream} {
		if err := json.Unmarshal(values[i], f); err != nil {
			return err
		}
	}
	return nil
}

// decodePageAsJSON is decodePage by encoding/json.
func decodePageAsJSON(text string) ([]pageEntry, error) {
	var es []jsonEntry
	if err := json.Unmarshal([]byte(text), &es); err != nil {
		return nil, err
	}
	out := make([]pageEntry, len(es))
	for i := range es {
		out[i] = pageEntry(es[i])
	}
	return out, nil
}

// checkDecodePage fails t unless decodePage and encoding/json agree on
// text: both take it, with the same entries, or both refuse it.
func checkDecodePage(t *testing.T, text string) {
	t.Helper()
	got, err := decodePage(text, nil)
	want, jerr := decodePageAsJSON(text)
	switch {
	case strings.TrimSpace(text) == "null": // encoding/json: a nil slice
	case (err == nil) != (jerr == nil):
		t.Fatalf("%q: decodePage: %v; encoding/json: %v", text, err, jerr)
	case err == nil && len(got)+len(want) > 0 && !reflect.DeepEqual(got, want):
		t.Fatalf("%q:\ndecodePage   %+v\nencoding/json %+v", text, got, want)
	}
}

// TestDecodePageAsJSON: decodePage takes the pages the migrations write
// (SQLite's and PostgreSQL's JSON, spaces and escapes as they write them)
// as encoding/json does, and refuses what is not a page.
func TestDecodePageAsJSON(t *testing.T) {
	for _, text := range []string{
		`[]`, ` [ ] `, `[[1,"a",null,2,3,4,"allowed","",null,null,"tcp",null,null,""]]`,
		"[[1, \"192.0.2.1\", 5, 1, 2, 3, \"allowed\", \"client_close\", 1, 2, \"udp\", 7, null, \"u:1\"], \n [2, \"::1\", null, -0, 0, 0, \"blocked\", \"a\\\"b\\\\c\\u00e9\\n\", null, 9, \"tcp\", null, null, \"\"]]",
		`[[1,"é✓",1,1,1,1,"allowed","",1,1,"tcp",1,1,"x"]]`, "[[1,\"\xff\",1,1,1,1,\"allowed\",\"\",1,1,\"tcp\",1,1,\"x\"]]",
		`[[9223372036854775807,"",null,null,null,null,null,null,null,null,null,null,null,null]]`,
		`[[9223372036854775808,"",1,1,1,1,"","",1,1,"",1,1,""]]`, `[[01,"",1,1,1,1,"","",1,1,"",1,1,""]]`,
		`[[1.5,"",1,1,1,1,"","",1,1,"",1,1,""]]`, `[[1e3,"",1,1,1,1,"","",1,1,"",1,1,""]]`, `[[1,2]]`, `[[1,"",1,1,1,1,"","",1,1,"",1,1,"",5]]`,
		`[[1,"",1,1,1,1,"","",1,1,"",1,1,""]`, `[[1,"",1,1,1,1,"","",1,1,"",1,1,""]]x`, `[[1,"a` + "\x01" + `",1,1,1,1,"","",1,1,"",1,1,""]]`,
		`[[1,"",1,1,1,1,"","",1,1,"",1,1,""],]`, `[,]`, `{}`, ``, `[[1,"",1,1,1,1,"","",1,1,"",1,1,"\"]]`, `[-]`, `[[-,"",1]]`,
	} {
		checkDecodePage(t, text)
	}
}

// FuzzConnLogPage: any text decodes as a page exactly as encoding/json
// decodes it, or is refused by both (never a panic), and any entry
// encoded and decoded again comes back with every field as it was (strings that are not UTF-8 with U+FFFD in
// place of each bad byte, as encoding/json has them).
func FuzzConnLogPage(f *testing.F) {
	f.Add(`[[1,"192.0.2.1",5,1,2,3,"allowed","client_close",1,2,"tcp",null,null,"u:1"]]`, "192.0.2.1", "x\"y\\z\x00\xff", int64(1), int64(-1))
	f.Add(`[]`, "", "", int64(0), int64(0))
	f.Add(`[[1,2]]`, "é✓", "\u2028", int64(1)<<62, int64(7))
	f.Fuzz(func(t *testing.T, text, ip, reason string, n, m int64) {
		checkDecodePage(t, text)
		e := ConnLog{StreamID: 1, SourceIP: ip, SourcePort: int(m & 0xffff), BytesSent: n, BytesReceived: m, DurationMS: n ^ m,
			Action: ActionAllowed, DisconnectReason: reason, Upstream: reason + ip, Protocol: ConnUDP,
			StartedAt: jsontime.Of(time.UnixMilli(n % 1e15).UTC()), DatagramsSent: &m}
		page := append(appendPageEntry([]byte{'['}, n, e), ']')
		got, err := decodePage(string(page), nil)
		if err != nil || len(got) != 1 {
			t.Fatalf("%s: %v", page, err)
		}
		back := got[0].connLog(1, "")
		want := e
		want.ID = n
		want.SourceIP = string([]rune(ip)) // U+FFFD for each bad byte
		want.DisconnectReason = string([]rune(reason))
		want.Upstream = string([]rune(reason + ip))
		if !utf8.ValidString(string(page)) {
			t.Fatalf("page is not UTF-8: %q", page)
		}
		if !reflect.DeepEqual(back, want) {
			t.Fatalf("round trip of %s\n got %+v\nwant %+v", page, back, want)
		}
	})
}
