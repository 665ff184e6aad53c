package storage

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

func TestConnLogRoundTrip(t *testing.T) { eachBackend(t, testConnLogRoundTrip) }

func testConnLogRoundTrip(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	start := time.Date(2026, 3, 4, 5, 6, 7, 890_000_000, time.UTC)
	in := []ConnLog{
		{
			ID:       99,       // ignored
			Node:     "node-z", // ignored: the store's node name
			StreamID: 7, SourceIP: "2001:db8::1", SourcePort: 54321,
			BytesSent: 1 << 40, BytesReceived: 12345, DurationMS: 1500,
			Action: ActionAllowed, DisconnectReason: "upstream closed",
			StartedAt: jsontime.Of(start), EndedAt: jsontime.Of(start.Add(1500 * time.Millisecond)),
			Protocol: ConnTCP, Upstream: "[2001:db8::9]:5432",
		},
		{
			StreamID: 7, SourceIP: "192.0.2.1",
			Action: ActionBlocked, DisconnectReason: "blacklisted",
			// Sub-millisecond precision and the zone are not kept.
			StartedAt: jsontime.Of(start.Add(123 * time.Microsecond).In(time.FixedZone("x", 3600))),
			// No protocol: TCP.
		},
		{
			StreamID: 7, SourceIP: "192.0.2.2", SourcePort: 53, Protocol: ConnUDP,
			BytesSent: 90, BytesReceived: 0, Action: ActionAllowed, DisconnectReason: "idle_timeout",
			DatagramsSent: ptr[int64](3), DatagramsReceived: ptr[int64](0), // 0 is kept, not dropped
		},
		{
			StreamID: 7, SourceIP: "192.0.2.3", Protocol: ConnUDP,
			Action: ActionAllowed, DatagramsSent: ptr[int64](1 << 40), DatagramsReceived: ptr[int64](12),
		},
	}
	if err := s.AppendConnLogs(ctx, in); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 7})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(in) {
		t.Fatalf("%d entries, want %d", len(got), len(in))
	}
	for i, g := range got {
		want := in[len(in)-1-i]
		want.ID, want.Node = g.ID, testNode
		if i == 2 {
			want.StartedAt = jsontime.Of(start)
			want.Protocol = ConnTCP
		}
		if !reflect.DeepEqual(g, want) {
			t.Errorf("entry %d read back\n%s\nwant\n%s", i, connLogString(g), connLogString(want))
		}
		if i > 0 && g.ID >= got[i-1].ID {
			t.Errorf("IDs %d, %d: newest not first", got[i-1].ID, g.ID)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// TestAppendConnLogsEverySize: a batch is written in pages of up to
// connLogPage entries; whatever its size, every entry is stored once,
// with its own fields, in order, and a statement that fails rolls the
// whole batch back.
func TestAppendConnLogsEverySize(t *testing.T) { eachBackend(t, testAppendConnLogsEverySize) }

func testAppendConnLogsEverySize(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	next := int64(0)
	for _, n := range []int{1, 2, 3, 63, 64, 65, 100, 127, 128, 200, 1000} {
		batch := make([]ConnLog, n)
		for i := range batch {
			next++
			batch[i] = ConnLog{StreamID: int64(n), SourceIP: "192.0.2.1", SourcePort: i + 1, BytesSent: next,
				Action: ActionAllowed, Protocol: ConnUDP, DatagramsSent: ptr(next), DatagramsReceived: ptr(int64(i))}
		}
		if err := s.AppendConnLogs(ctx, batch); err != nil {
			t.Fatalf("%d entries: %v", n, err)
		}
		got, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: int64(n), Limit: MaxConnLogLimit})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != n {
			t.Fatalf("a batch of %d entries: %d stored", n, len(got))
		}
		for i, g := range got {
			want := batch[n-1-i]
			if g.BytesSent != want.BytesSent || g.SourcePort != want.SourcePort || *g.DatagramsSent != *want.DatagramsSent ||
				*g.DatagramsReceived != *want.DatagramsReceived || g.Node != testNode {
				t.Fatalf("a batch of %d entries: entry %d read back\n%s\nwant (but ID and node %s)\n%s", n, i, connLogString(g), testNode, connLogString(want))
			}
		}
	}
	// A database that refuses the page of the last entry takes none of
	// the batch, though the first 64 went in a page of their own.
	refuse := `CREATE TRIGGER refuse BEFORE INSERT ON conn_log_pages WHEN NEW.entries LIKE '%"192.0.2.1",4242,%' BEGIN SELECT RAISE(ABORT, 'refused'); END`
	if b.name == "postgres" {
		refuse = `ALTER TABLE conn_log_pages ADD CONSTRAINT refuse CHECK (entries NOT LIKE '%"192.0.2.1",4242,%')`
	}
	err := s.base().be.inTx(ctx, false, func(tx writeTx) error {
		_, err := tx.exec(ctx, refuse)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	batch := make([]ConnLog, 99)
	for i := range batch {
		batch[i] = ConnLog{StreamID: 5000, SourceIP: "192.0.2.1", SourcePort: i + 1, Action: ActionAllowed}
	}
	batch[98].SourcePort = 4242
	if err := s.AppendConnLogs(ctx, batch); err == nil {
		t.Fatal("AppendConnLogs took a batch whose last row the database refused")
	}
	if got, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 5000}); err != nil || len(got) != 0 {
		t.Fatalf("after a refused batch: %d entries stored (%v), want 0", len(got), err)
	}
}

// TestAppendConnLogsVaried: a batch of 1,234 entries of two streams
// (pages of 64 of each, their IDs interleaved) whose fields vary with
// different periods, with NULLs (no port, no times, no datagram counts)
// between equal values, big numbers, long names and both protocols and
// actions, reads back exactly, every field, in order.
func TestAppendConnLogsVaried(t *testing.T) { eachBackend(t, testAppendConnLogsVaried) }

func testAppendConnLogsVaried(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	start := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	long := strings.Repeat("a-long-upstream-name.example.", 8) + "net:65535"
	batch := make([]ConnLog, 1234)
	for i := range batch {
		e := ConnLog{
			StreamID:         int64(1 + i%3/2),                 // 1, 1, 2, 1, 1, 2…
			SourceIP:         fmt.Sprintf("192.0.2.%d", i/5%7), // five in a row alike
			SourcePort:       (i / 2 % 4) * 20000,              // 0 (NULL) twice, then 20000 twice…
			BytesSent:        int64(i/3) << (i % 40),           // small and big
			BytesReceived:    int64(i % 2 * 300),
			DurationMS:       int64(i / 7),
			Action:           ActionAllowed,
			DisconnectReason: []string{"idle_timeout", "idle_timeout", "client_close", "", "responses_done"}[i%5],
			Upstream:         []string{"192.0.2.53:53", long, "", long}[i/3%4],
		}
		if i%11 != 0 {
			e.StartedAt = jsontime.Of(start.Add(time.Duration(i/4) * time.Millisecond))
		}
		if i%13 != 0 {
			e.EndedAt = jsontime.Of(start.Add(time.Duration(i/3) * time.Millisecond))
		}
		if i%17 == 16 {
			e.Action = ActionBlocked
		}
		switch i % 6 {
		case 0, 1, 2:
			e.Protocol = ConnUDP
			e.DatagramsSent = ptr(int64(i / 2 % 3 * 1000))
			if i%6 != 1 {
				e.DatagramsReceived = ptr(int64(i % 3))
			}
		case 3:
			e.Protocol = ConnTCP
		default: // "" is stored as TCP
		}
		batch[i] = e
	}
	if err := s.AppendConnLogs(ctx, batch); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConnLogs(ctx, ConnLogQuery{Limit: MaxConnLogExportLimit})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(batch) {
		t.Fatalf("%d entries read back, want %d", len(got), len(batch))
	}
	for i, g := range got {
		want := batch[len(batch)-1-i]
		want.ID, want.Node = g.ID, testNode
		if want.Protocol == "" {
			want.Protocol = ConnTCP
		}
		if !reflect.DeepEqual(g, want) {
			t.Fatalf("entry %d of %d read back\n%s\nwant\n%s", len(batch)-1-i, len(batch), connLogString(g), connLogString(want))
		}
		if i > 0 && g.ID >= got[i-1].ID {
			t.Fatalf("IDs %d, %d: newest not first", got[i-1].ID, g.ID)
		}
	}
}

// connLogString shows e with the datagram counts, not their addresses.
func connLogString(e ConnLog) string {
	count := func(p *int64) string {
		if p == nil {
			return "nil"
		}
		return fmt.Sprint(*p)
	}
	return fmt.Sprintf("%+v datagrams %s/%s", e, count(e.DatagramsSent), count(e.DatagramsReceived))
}

func TestAppendConnLogsAllOrNothing(t *testing.T) { eachBackend(t, testAppendConnLogsAllOrNothing) }

func testAppendConnLogsAllOrNothing(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	for i, batch := range [][]ConnLog{
		{{StreamID: 1, Action: ActionAllowed}, {StreamID: 1, Action: "dropped"}},
		{{StreamID: 1, Action: ActionAllowed}, {StreamID: 0, Action: ActionAllowed}},
		{{StreamID: 1, Action: ActionAllowed}, {StreamID: 1, Action: ActionAllowed, Protocol: "sctp"}},
		{{StreamID: 1, Action: ActionAllowed}, {StreamID: 1, Action: ActionAllowed, Protocol: ConnTCP, DatagramsSent: ptr[int64](1)}},
		{{StreamID: 1, Action: ActionAllowed}, {StreamID: 1, Action: ActionAllowed, DatagramsReceived: ptr[int64](1)}},
	} {
		if err := s.AppendConnLogs(ctx, batch); !errors.Is(err, ErrInvalid) {
			t.Errorf("%d: AppendConnLogs = %v, want ErrInvalid", i, err)
		}
	}
	if err := s.AppendConnLogs(ctx, nil); err != nil {
		t.Errorf("empty batch: %v", err)
	}
	if got, err := s.ConnLogs(ctx, ConnLogQuery{}); err != nil || len(got) != 0 {
		t.Errorf("log holds %d entries, %v; want none", len(got), err)
	}
}

func TestConnLogQuery(t *testing.T) { eachBackend(t, testConnLogQuery) }

func testConnLogQuery(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	// Streams 1 and 2 interleaved; stream 1's entries alternate allowed
	// and blocked and carry their index in BytesSent.
	var batch []ConnLog
	for i := range 1200 {
		action := ActionAllowed
		if i%2 == 1 {
			action = ActionBlocked
		}
		batch = append(batch,
			ConnLog{StreamID: 1, Action: action, BytesSent: int64(i)},
			ConnLog{StreamID: 2, Action: ActionAllowed, BytesSent: int64(i)})
	}
	if err := s.AppendConnLogs(ctx, batch); err != nil {
		t.Fatal(err)
	}

	idOf := map[int64]int64{} // stream 1's BytesSent -> ID
	all, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 1, Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range all {
		idOf[e.BytesSent] = e.ID
	}

	sent := func(es []ConnLog) []int64 {
		out := []int64{}
		for _, e := range es {
			out = append(out, e.BytesSent)
		}
		return out
	}
	// seq counts down from from to to, by step (negative).
	seq := func(from, to, step int64) []int64 {
		out := []int64{}
		for i := from; i >= to; i += step {
			out = append(out, i)
		}
		return out
	}

	for i, tc := range []struct {
		name string
		q    ConnLogQuery
		want []int64 // stream 1's BytesSent, in order
	}{
		{"default limit", ConnLogQuery{StreamID: 1}, seq(1199, 1150, -1)},
		{"limit", ConnLogQuery{StreamID: 1, Limit: 3}, seq(1199, 1197, -1)},
		{"limit above a page", ConnLogQuery{StreamID: 1, Limit: 5000}, seq(1199, 0, -1)},
		{"negative limit", ConnLogQuery{StreamID: 1, Limit: -1}, seq(1199, 1150, -1)},
		{"before", ConnLogQuery{StreamID: 1, Limit: 3, Before: idOf[500]}, seq(499, 497, -1)},
		// Entries of the two streams alternate: stream 1's first is 400
		// IDs before its 200th.
		{"before the first", ConnLogQuery{StreamID: 1, Before: idOf[200] - 2*200}, []int64{}},
		{"blocked", ConnLogQuery{StreamID: 1, Limit: 3, Action: ActionBlocked}, seq(1199, 1195, -2)},
		{"allowed before", ConnLogQuery{StreamID: 1, Limit: 3, Action: ActionAllowed, Before: idOf[200]}, seq(198, 194, -2)},
		{"no such stream", ConnLogQuery{StreamID: 3}, []int64{}},
	} {
		got, err := s.ConnLogs(ctx, tc.q)
		if err != nil {
			t.Errorf("%d: %s: %v", i, tc.name, err)
			continue
		}
		for _, e := range got {
			if e.StreamID != 1 {
				t.Errorf("%d: %s: entry of stream %d", i, tc.name, e.StreamID)
				break
			}
			if tc.q.Action != "" && e.Action != tc.q.Action {
				t.Errorf("%d: %s: entry with action %q", i, tc.name, e.Action)
				break
			}
		}
		if g := sent(got); !reflect.DeepEqual(g, tc.want) {
			t.Errorf("%d: %s: got %d entries %v..., want %d %v...", i, tc.name, len(g), head(g), len(tc.want), head(tc.want))
		}
	}

	// Paging back through a stream visits every entry once, newest first.
	var pages, seen int
	last := int64(1 << 62)
	q := ConnLogQuery{StreamID: 2, Limit: 500}
	for {
		page, err := s.ConnLogs(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		pages++
		for _, e := range page {
			if e.ID >= last || e.StreamID != 2 {
				t.Fatalf("page %d: entry %d of stream %d after %d", pages, e.ID, e.StreamID, last)
			}
			last = e.ID
			seen++
		}
		q.Before = page[len(page)-1].ID
	}
	if pages != 3 || seen != 1200 {
		t.Errorf("paging: %d pages, %d entries; want 3, 1200", pages, seen)
	}

	// Every stream.
	got, err := s.ConnLogs(ctx, ConnLogQuery{Limit: 4})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 || got[0].StreamID != 2 || got[1].StreamID != 1 {
		t.Errorf("all streams: %+v", got)
	}

	for i, q := range []ConnLogQuery{{Action: "dropped"}, {StreamID: -1}} {
		if _, err := s.ConnLogs(ctx, q); !errors.Is(err, ErrInvalid) {
			t.Errorf("%d: ConnLogs(%+v) = %v, want ErrInvalid", i, q, err)
		}
	}
}

func head(s []int64) []int64 {
	if len(s) > 5 {
		return s[:5]
	}
	return s
}

func TestPruneConnLogs(t *testing.T) { eachBackend(t, testPruneConnLogs) }

func testPruneConnLogs(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	var batch []ConnLog
	for i := range 10 {
		batch = append(batch,
			ConnLog{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i)},
			ConnLog{StreamID: 2, Action: ActionAllowed, BytesSent: int64(i)})
	}
	if err := s.AppendConnLogs(ctx, batch); err != nil {
		t.Fatal(err)
	}
	count := func(stream int64) []int64 {
		es, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: stream, Limit: MaxConnLogLimit})
		if err != nil {
			t.Fatal(err)
		}
		out := []int64{}
		for _, e := range es {
			out = append(out, e.BytesSent)
		}
		return out
	}

	for i, tc := range []struct {
		keep    int
		deleted int64
		left    []int64
	}{
		{keep: 20, deleted: 0, left: []int64{9, 8, 7, 6, 5, 4, 3, 2, 1, 0}},
		{keep: 10, deleted: 0, left: []int64{9, 8, 7, 6, 5, 4, 3, 2, 1, 0}},
		{keep: 3, deleted: 7, left: []int64{9, 8, 7}},
		{keep: 3, deleted: 0, left: []int64{9, 8, 7}},
		{keep: 1, deleted: 2, left: []int64{9}},
		{keep: 0, deleted: 1, left: []int64{}},
	} {
		n, err := s.PruneConnLogs(ctx, 1, tc.keep)
		if err != nil {
			t.Fatalf("%d: %v", i, err)
		}
		if n != tc.deleted {
			t.Errorf("%d: keep %d deleted %d, want %d", i, tc.keep, n, tc.deleted)
		}
		if got := count(1); !reflect.DeepEqual(got, tc.left) {
			t.Errorf("%d: keep %d left %v, want %v", i, tc.keep, got, tc.left)
		}
	}
	if got := count(2); len(got) != 10 {
		t.Errorf("stream 2 has %d entries after pruning stream 1, want 10", len(got))
	}
	if _, err := s.PruneConnLogs(ctx, 2, -1); !errors.Is(err, ErrInvalid) {
		t.Errorf("keep -1: %v, want ErrInvalid", err)
	}
}

// A prune of many more entries than one of SQLite's DELETEs takes
// (connLogPrunePages pages; PostgreSQL's prune is one statement) keeps exactly the
// newest, and only of its stream, with the LogWriter's pauses between its
// statements or without.
func TestPruneConnLogsInSlices(t *testing.T) { eachBackend(t, testPruneConnLogsInSlices) }

func testPruneConnLogsInSlices(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	var batch []ConnLog
	for i := range 1000 {
		batch = append(batch, ConnLog{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i)})
		if i%3 == 0 {
			batch = append(batch, ConnLog{StreamID: 2, Action: ActionAllowed, BytesSent: int64(i)})
		}
	}
	if err := s.AppendConnLogs(forLogWriter(ctx, new(logpace.Pacer)), batch); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ctx     context.Context
		keep    int
		deleted int64
	}{
		{forLogWriter(ctx, new(logpace.Pacer)), 937, 1000 - 937},
		{ctx, 37, 937 - 37},
		{forLogWriter(ctx, new(logpace.Pacer)), 0, 37},
	} {
		n, err := s.PruneConnLogs(tc.ctx, 1, tc.keep)
		if err != nil || n != tc.deleted {
			t.Fatalf("keep %d: deleted %d, %v; want %d", tc.keep, n, err, tc.deleted)
		}
		es, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 1, Limit: MaxConnLogLimit})
		if err != nil {
			t.Fatal(err)
		}
		if len(es) != tc.keep {
			t.Fatalf("keep %d: %d entries left", tc.keep, len(es))
		}
		for i, e := range es {
			if want := int64(999 - i); e.BytesSent != want {
				t.Fatalf("keep %d: entry %d is %d, want %d (the newest kept)", tc.keep, i, e.BytesSent, want)
			}
		}
	}
	if es, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 2, Limit: MaxConnLogLimit}); err != nil || len(es) != 334 {
		t.Fatalf("stream 2 after pruning stream 1: %d entries, %v; want 334", len(es), err)
	}
}

// The LogWriter's writes have a deadline, and for a statement whose
// context can end, modernc.org/sqlite starts a goroutine to interrupt it.
// The connection log's kept statements run without one: writing 512
// entries (256 INSERTs of 2) starts a handful of goroutines (the
// transaction's), not one per statement.
func TestConnLogWritesStartNoGoroutinePerStatement(t *testing.T) {
	s := newStore(t)
	ctx, cancel := context.WithTimeout(forLogWriter(context.Background(), new(logpace.Pacer)), time.Minute)
	defer cancel()
	batch := udpFlowLogs(512)
	created := func() uint64 {
		m := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
		metrics.Read(m)
		return m[0].Value.Uint64()
	}
	before := created()
	if err := s.AppendConnLogs(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if n := created() - before; n > 16 {
		t.Fatalf("writing %d entries in %d statements started %d goroutines, want a handful", len(batch), len(batch)/connLogPage, n)
	}
}

// pagesAgree fails t for each page of stream whose n is not the number of
// entries it holds, and returns the stream's entries.
func pagesAgree(t *testing.T, reads sqlDB, stream int64) int64 {
	t.Helper()
	var total int64
	err := reads.queryEach(context.Background(), `SELECT last_id, n, entries FROM conn_log_pages WHERE stream_id = ?`,
		[]any{stream}, func(r rowScanner) error {
			var (
				last, n int64
				text    string
			)
			if err := r.Scan(&last, &n, &text); err != nil {
				return err
			}
			es, err := decodePage(text, nil)
			if err != nil {
				return err
			}
			if int64(len(es)) != n {
				t.Errorf("page of entry %d: n = %d, but it holds %d entries", last, n, len(es))
			}
			total += int64(len(es))
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	return total
}

// Two nodes prune one shared stream at once, to different retentions: each
// works from the page list it read before its transaction, which the other
// may have changed meanwhile. Neither fails, no page's count disagrees with
// its entries, and the stream keeps at least the smaller retention.
func TestPostgresPrunesOfOneStreamOnTwoNodes(t *testing.T) {
	db := pg.NewDatabase(t)
	a := openPostgres(t, db, PostgresOptions{Node: "a"})
	b := openPostgres(t, db, PostgresOptions{Node: "b"})
	ctx := context.Background()
	for round := range 60 {
		if err := a.AppendConnLogs(ctx, entriesOf(7, 200)); err != nil {
			t.Fatal(err)
		}
		keepA, keepB := 100, 90+round%25
		var errA, errB error
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, errB = b.PruneConnLogs(ctx, 7, keepB)
		}()
		_, errA = a.PruneConnLogs(ctx, 7, keepA)
		<-done
		if errA != nil || errB != nil {
			t.Fatalf("round %d: prunes: %v; %v", round, errA, errB)
		}
		if n := pagesAgree(t, a.reads, 7); n < int64(min(keepA, keepB)) || n > int64(max(keepA, keepB)) {
			t.Fatalf("round %d: %d entries left after prunes to %d and %d", round, n, keepA, keepB)
		}
	}
}

// A prune that races the removal of its stream (the API's delete, while
// the LogWriter prunes) finds the pages it listed gone: that is nothing
// left to do, not an error.
func TestPruneConnLogsOfARemovedStream(t *testing.T) {
	eachBackend(t, testPruneConnLogsOfARemovedStream)
}

func testPruneConnLogsOfARemovedStream(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	for round := range 40 {
		h, err := s.CreateHost(ctx, genHost(0, round), nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.AppendConnLogs(ctx, entriesOf(h.ID, 300)); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.DeleteHost(ctx, h.ID, nil) }()
		_, err = s.PruneConnLogs(ctx, h.ID, 100)
		if derr := <-done; derr != nil {
			t.Fatal(derr)
		}
		if err != nil {
			t.Fatalf("round %d: prune racing the stream's removal: %v", round, err)
		}
	}
}

// entriesOf is n allowed entries of stream.
func entriesOf(stream int64, n int) []ConnLog {
	out := make([]ConnLog, n)
	for i := range out {
		out[i] = ConnLog{StreamID: stream, SourceIP: "192.0.2.1", SourcePort: 1000 + i, Action: ActionAllowed}
	}
	return out
}

// Entries written for a stream after its deletion (its connections the
// deletion closed, a queued batch) are not shown as the log of a new
// stream given the same ID.
func TestNewStreamUnderAnOldIDHasAnEmptyLog(t *testing.T) {
	eachBackend(t, testNewStreamUnderAnOldIDHasAnEmptyLog)
}

func testNewStreamUnderAnOldIDHasAnEmptyLog(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	h, err := s.CreateHost(ctx, genHost(50, 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteHost(ctx, h.ID, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.AppendConnLogs(ctx, entriesOf(h.ID, 3)); err != nil { // late entries
		t.Fatal(err)
	}
	if _, err := s.CreateHost(ctx, genHost(50, 2), nil); err != nil {
		t.Fatal(err)
	}
	if es, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 50}); err != nil || len(es) != 0 {
		t.Errorf("the new stream 50's log: %d entries, %v; want none", len(es), err)
	}
}

// ConnLogs reads the pages in chunks (connLogChunk): entries that only
// pages past the first chunks hold are found, in order.
func TestConnLogsPastTheFirstChunk(t *testing.T) { eachBackend(t, testConnLogsPastTheFirstChunk) }

func testConnLogsPastTheFirstChunk(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	pages := 3*connLogChunk + 5
	for i := range pages {
		batch := entriesOf(1, connLogPage) // one full page
		if i == 0 {
			for j := range batch {
				batch[j].Action = ActionBlocked
			}
		}
		if err := s.AppendConnLogs(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	es, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 1, Action: ActionBlocked, Limit: 10})
	if err != nil || len(es) != 10 {
		t.Fatalf("the 10 newest blocked entries, all in the oldest page: %d, %v", len(es), err)
	}
	for i, e := range es {
		if want := int64(connLogPage - i); e.ID != want || e.Action != ActionBlocked {
			t.Errorf("entry %d: id %d %s, want id %d blocked", i, e.ID, e.Action, want)
		}
	}
	all, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 1, Limit: MaxConnLogLimit})
	newest := int64(0)
	if len(all) > 0 {
		newest = all[0].ID
	}
	if want := min(MaxConnLogLimit, pages*connLogPage); err != nil || len(all) != want || newest != int64(pages*connLogPage) {
		t.Fatalf("every entry: %d (newest %d), %v; want %d from id %d", len(all), newest, err, want, pages*connLogPage)
	}
}
