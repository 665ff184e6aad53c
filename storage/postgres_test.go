package storage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// twoNodes opens two stores, nodes "a" and "b", on one new database.
func twoNodes(t *testing.T, opts PostgresOptions) (a, b *Postgres, dsn string) {
	t.Helper()
	dsn = pg.NewDatabase(t)
	opts.Node = "a"
	a = openPostgres(t, dsn, opts)
	opts.Node = "b"
	b = openPostgres(t, dsn, opts)
	return a, b, dsn
}

// catchUp sets s's applied change to the newest one, as a node does once
// it has applied them.
func catchUp(t *testing.T, s *Postgres) {
	t.Helper()
	last, err := s.LastChange(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	s.SetApplied(last)
}

// TestPostgresStaleWrite: a write on node A makes node B's next write
// ErrStale, and changes nothing, until B has applied A's change.
func TestPostgresStaleWrite(t *testing.T) {
	a, b, _ := twoNodes(t, PostgresOptions{})
	ctx := context.Background()
	h, err := a.CreateHost(ctx, genHost(1, 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	if a.Applied() == 0 {
		t.Error("A's own write did not count as applied")
	}
	called := false
	apply := func(Stored, Stored) error { called = true; return nil }
	_, err = b.UpdateHost(ctx, genHost(1, 2), apply)
	if !errors.Is(err, ErrStale) {
		t.Fatalf("B's update after A's write: %v, want ErrStale", err)
	}
	if !strings.HasPrefix(err.Error(), "storage: updating host 1: change 1 is newer than change 0, the last this node applied") {
		t.Errorf("error %q", err)
	}
	if _, err := b.CreateHost(ctx, genHost(2, 1), nil); !errors.Is(err, ErrStale) {
		t.Errorf("B's create: %v, want ErrStale", err)
	}
	if err := b.DeleteCertificate(ctx, 1, nil); !errors.Is(err, ErrStale) {
		t.Errorf("B's certificate delete: %v, want ErrStale", err)
	}
	if called {
		t.Error("apply ran for a stale write")
	}
	if got, err := b.GetHost(ctx, 1); err != nil || got.Version != h.Version {
		t.Errorf("host after the stale write: version %d, %v; want %d", got.Version, err, h.Version)
	}
	if hosts, _ := b.ListHosts(ctx); len(hosts) != 1 {
		t.Errorf("%d hosts after the stale create, want 1", len(hosts))
	}
	// The connection log is not a change: no check.
	if err := b.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed}}); err != nil {
		t.Errorf("B's connection log: %v", err)
	}

	changes, err := b.ChangesAfter(ctx, b.Applied(), 0)
	if err != nil || len(changes) != 1 {
		t.Fatalf("B's missed changes: %v, %v", changes, err)
	}
	b.SetApplied(changes[0].ID)
	if _, err := b.UpdateHost(ctx, genHost(1, 2), nil); err != nil {
		t.Fatalf("B's update once it applied A's change: %v", err)
	}
	// Now A is behind.
	if _, err := a.UpdateHost(ctx, genHost(1, 3), nil); !errors.Is(err, ErrStale) {
		t.Errorf("A's update after B's: %v, want ErrStale", err)
	}
	b.SetApplied(0) // never lowers it
	if b.Applied() != 2 {
		t.Errorf("Applied = %d after SetApplied(0), want 2", b.Applied())
	}
}

// TestPostgresChangesAfter: every write of hosts and certificates is a
// change, in commit order, with its node; LastChange is the newest.
func TestPostgresChangesAfter(t *testing.T) {
	a, b, _ := twoNodes(t, PostgresOptions{Key: testKey})
	ctx := context.Background()
	if last, err := a.LastChange(ctx); err != nil || last != 0 {
		t.Fatalf("LastChange of an empty database: %d, %v", last, err)
	}
	if got, err := a.ChangesAfter(ctx, 0, 0); err != nil || len(got) != 0 {
		t.Fatalf("ChangesAfter(0) of an empty database: %v, %v", got, err)
	}
	before := time.Now().Add(-time.Minute)
	h, err := a.CreateHost(ctx, genHost(0, 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	catchUp(t, b)
	if _, err := b.UpdateHost(ctx, genHost(h.ID, 2), nil); err != nil {
		t.Fatal(err)
	}
	tc := ecCert(t, "a.example.com")
	c, err := b.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.UpdateCertificate(ctx, c, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteCertificate(ctx, c.ID, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteHost(ctx, h.ID, nil); err != nil {
		t.Fatal(err)
	}
	// A failed write is no change.
	if _, err := b.UpdateHost(ctx, genHost(h.ID, 3), nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("update of a deleted host: %v", err)
	}

	got, err := a.ChangesAfter(ctx, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []Change{
		{Kind: ChangeStream, Op: OpCreate, ObjectID: h.ID, Node: "a"},
		{Kind: ChangeStream, Op: OpUpdate, ObjectID: h.ID, Node: "b"},
		{Kind: ChangeCertificate, Op: OpCreate, ObjectID: c.ID, Node: "b"},
		{Kind: ChangeCertificate, Op: OpUpdate, ObjectID: c.ID, Node: "b"},
		{Kind: ChangeCertificate, Op: OpDelete, ObjectID: c.ID, Node: "b"},
		{Kind: ChangeStream, Op: OpDelete, ObjectID: h.ID, Node: "b"},
	}
	if len(got) != len(want) {
		t.Fatalf("%d changes, want %d: %+v", len(got), len(want), got)
	}
	for i, g := range got {
		w := want[i]
		w.ID, w.At = g.ID, g.At
		if g != w {
			t.Errorf("change %d: %+v, want %+v", i, g, w)
		}
		if i > 0 && g.ID <= got[i-1].ID {
			t.Errorf("change %d has ID %d after %d", i, g.ID, got[i-1].ID)
		}
		if g.At.Before(before) || g.At.After(time.Now().Add(time.Minute)) || g.At.Location() != time.UTC {
			t.Errorf("change %d at %v", i, g.At)
		}
	}
	if last, err := a.LastChange(ctx); err != nil || last != got[len(got)-1].ID {
		t.Errorf("LastChange = %d, %v; want %d", last, err, got[len(got)-1].ID)
	}
	if b.Applied() != got[len(got)-1].ID {
		t.Errorf("B's Applied = %d after its writes, want %d", b.Applied(), got[len(got)-1].ID)
	}
	if page, err := a.ChangesAfter(ctx, got[1].ID, 2); err != nil || len(page) != 2 || page[0] != got[2] || page[1] != got[3] {
		t.Errorf("ChangesAfter(%d, 2) = %+v, %v", got[1].ID, page, err)
	}
	if _, err := a.ChangesAfter(ctx, 0, -1); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative limit: %v", err)
	}
}

// TestPostgresPrunedHistory keeps the newest KeepChanges changes: asking
// for older ones is ErrHistoryPruned.
func TestPostgresPrunedHistory(t *testing.T) {
	a, b, dsn := twoNodes(t, PostgresOptions{KeepChanges: 3})
	ctx := context.Background()
	for i := range 8 {
		if _, err := a.CreateHost(ctx, genHost(0, i), nil); err != nil {
			t.Fatal(err)
		}
	}
	last, _ := a.LastChange(ctx)
	if _, err := b.ChangesAfter(ctx, 0, 0); !errors.Is(err, ErrHistoryPruned) {
		t.Errorf("ChangesAfter(0) with 3 of 8 kept: %v, want ErrHistoryPruned", err)
	}
	if _, err := b.ChangesAfter(ctx, last-4, 0); !errors.Is(err, ErrHistoryPruned) {
		t.Errorf("ChangesAfter(last-4): %v, want ErrHistoryPruned", err)
	}
	got, err := b.ChangesAfter(ctx, last-3, 0)
	if err != nil || len(got) != 3 || got[2].ID != last {
		t.Errorf("ChangesAfter(last-3) = %+v, %v; want the newest 3", got, err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, `SELECT COUNT(*) FROM changes`).Scan(&n); err != nil || n != 3 {
		t.Errorf("the changes table holds %d rows (%v), want 3", n, err)
	}
}

// listenFor runs s.Listen until the test ends, sending what notify gets.
func listenFor(t *testing.T, s *Postgres) <-chan int64 {
	t.Helper()
	ch := make(chan int64, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- s.Listen(ctx, func(id int64) { ch <- id })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Listen: %v", err)
		}
	})
	return ch
}

// next returns the next ID from ch, failing after within.
func next(t *testing.T, ch <-chan int64, within time.Duration, what string) int64 {
	t.Helper()
	select {
	case id := <-ch:
		return id
	case <-time.After(within):
		t.Fatalf("%s: nothing within %v", what, within)
		return 0
	}
}

// TestPostgresListen: node A hears of node B's write within a second, and
// of a reconnect (notify(0)) after the database restarted.
func TestPostgresListen(t *testing.T) {
	a, b, _ := twoNodes(t, PostgresOptions{})
	ctx := context.Background()
	heard := listenFor(t, a)
	if id := next(t, heard, 5*time.Second, "connect"); id != 0 {
		t.Fatalf("first notify(%d), want notify(0) on connect", id)
	}
	start := time.Now()
	if _, err := b.CreateHost(ctx, genHost(0, 1), nil); err != nil {
		t.Fatal(err)
	}
	id := next(t, heard, time.Second, "B's write")
	if id != b.Applied() || id == 0 {
		t.Errorf("notify(%d), want B's change %d", id, b.Applied())
	}
	t.Logf("notified %v after the write began", time.Since(start))

	pg.Stop()
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	if id := next(t, heard, 5*time.Second, "reconnect"); id != 0 {
		t.Errorf("notify(%d) after the restart, want notify(0)", id)
	}
	catchUp(t, b)
	if _, err := b.CreateHost(ctx, genHost(0, 2), nil); err != nil {
		t.Fatal(err)
	}
	if id := next(t, heard, time.Second, "B's write after the restart"); id != b.Applied() {
		t.Errorf("notify(%d), want %d", id, b.Applied())
	}
}

// TestPostgresClaimNode: a second store with a node's name is refused
// while the first holds it, and may have it once the first is closed.
func TestPostgresClaimNode(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	first := openPostgres(t, dsn, PostgresOptions{Node: "edge-1"})
	if err := first.ClaimNode(ctx); err != nil {
		t.Fatal(err)
	}
	if err := first.ClaimNode(ctx); err != nil {
		t.Errorf("claiming again: %v", err)
	}
	second := openPostgres(t, dsn, PostgresOptions{Node: "edge-1"})
	err := second.ClaimNode(ctx)
	if !errors.Is(err, ErrNodeNameTaken) {
		t.Fatalf("second claim: %v, want ErrNodeNameTaken", err)
	}
	if want := `storage: claiming node name "edge-1": another running node has this node name`; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q, want it to start with %q", err, want)
	}
	other := openPostgres(t, dsn, PostgresOptions{Node: "edge-2"})
	if err := other.ClaimNode(ctx); err != nil {
		t.Errorf("another name: %v", err)
	}
	if first.Node() != "edge-1" {
		t.Errorf("Node() = %q", first.Node())
	}
	first.Close()
	if err := second.ClaimNode(ctx); err != nil {
		t.Errorf("claim after the first closed: %v", err)
	}
}

// TestPostgresConcurrentCreate: two creates of one ID at once, on two
// nodes or on one: exactly one succeeds.
func TestPostgresConcurrentCreate(t *testing.T) {
	a, b, _ := twoNodes(t, PostgresOptions{})
	ctx := context.Background()
	for round, stores := range [][2]*Postgres{{a, b}, {a, a}} {
		catchUp(t, a)
		catchUp(t, b)
		id := int64(10 + round)
		var (
			wg   sync.WaitGroup
			errs [2]error
		)
		for i, s := range stores {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = s.CreateHost(ctx, genHost(id, i), nil)
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case stores[0] != stores[1] && errors.Is(err, ErrStale),
				stores[0] == stores[1] && errors.Is(err, ErrConflict):
			default:
				t.Errorf("round %d: %v", round, err)
			}
		}
		if won != 1 {
			t.Errorf("round %d: %d creates of id %d succeeded (%v), want 1", round, won, id, errs)
		}
	}
}

// TestPostgresHeartbeat: Nodes lists every node's last heartbeat, with
// LastSeen from the database's clock.
func TestPostgresHeartbeat(t *testing.T) {
	a, b, _ := twoNodes(t, PostgresOptions{})
	ctx := context.Background()
	if nodes, err := a.Nodes(ctx); err != nil || len(nodes) != 0 {
		t.Fatalf("Nodes before any heartbeat: %v, %v", nodes, err)
	}
	if err := b.Heartbeat(ctx, NodeStatus{Address: "10.0.0.2:2019", Version: "v1", AppliedChange: 4,
		Streams: []byte(`[{"id": 1, "health": "up"}]`)}); err != nil {
		t.Fatal(err)
	}
	if err := a.Heartbeat(ctx, NodeStatus{Name: "ignored", Snapshot: true}); err != nil {
		t.Fatal(err)
	}
	if err := a.Heartbeat(ctx, NodeStatus{Address: "10.0.0.1:2019", AppliedChange: 7}); err != nil {
		t.Fatal(err)
	}
	nodes, err := b.Nodes(ctx)
	if err != nil || len(nodes) != 2 {
		t.Fatalf("Nodes = %+v, %v", nodes, err)
	}
	for _, n := range nodes {
		if time.Since(n.LastSeen).Abs() > time.Minute || n.LastSeen.Location() != time.UTC {
			t.Errorf("node %s last seen %v", n.Name, n.LastSeen)
		}
	}
	na, nb := nodes[0], nodes[1]
	if na.Name != "a" || na.Address != "10.0.0.1:2019" || na.AppliedChange != 7 || na.Snapshot || na.Streams != nil {
		t.Errorf("node a: %+v", na)
	}
	if nb.Name != "b" || nb.Version != "v1" || nb.AppliedChange != 4 || string(nb.Streams) != `[{"id": 1, "health": "up"}]` {
		t.Errorf("node b: %+v (streams %s)", nb, nb.Streams)
	}
}

// TestPostgresUnavailable: with the server stopped every method fails
// soon with an *UnavailableError naming the database, without the DSN's
// password; once it is back the same store works.
func TestPostgresUnavailable(t *testing.T) {
	dsn := strings.Replace(pg.NewDatabase(t), "postgres@", "postgres:pw-s3cret@", 1)
	ctx := context.Background()
	s := openPostgres(t, dsn, PostgresOptions{Key: testKey, Node: "a", ConnectTimeout: 2 * time.Second})
	if _, err := s.CreateHost(ctx, genHost(1, 1), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimNode(ctx); err != nil {
		t.Fatal(err)
	}

	pg.Stop()
	restarted := false
	defer func() {
		if !restarted {
			pg.Start()
		}
	}()
	tc := ecCert(t, "a.example.com")
	for _, call := range []struct {
		name string
		run  func(ctx context.Context) error
	}{
		{"ListHosts", func(ctx context.Context) error { _, err := s.ListHosts(ctx); return err }},
		{"GetHost", func(ctx context.Context) error { _, err := s.GetHost(ctx, 1); return err }},
		{"CreateHost", func(ctx context.Context) error { _, err := s.CreateHost(ctx, genHost(2, 1), nil); return err }},
		{"UpdateHost", func(ctx context.Context) error { _, err := s.UpdateHost(ctx, genHost(1, 2), nil); return err }},
		{"DeleteHost", func(ctx context.Context) error { return s.DeleteHost(ctx, 1, nil) }},
		{"AppendConnLogs", func(ctx context.Context) error {
			return s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed}})
		}},
		{"ConnLogs", func(ctx context.Context) error { _, err := s.ConnLogs(ctx, ConnLogQuery{}); return err }},
		{"PruneConnLogs", func(ctx context.Context) error { _, err := s.PruneConnLogs(ctx, 1, 0); return err }},
		{"ListCertificates", func(ctx context.Context) error { _, err := s.ListCertificates(ctx); return err }},
		{"GetCertificate", func(ctx context.Context) error { _, err := s.GetCertificate(ctx, 1); return err }},
		{"CertificateKey", func(ctx context.Context) error { _, err := s.CertificateKey(ctx, 1); return err }},
		{"CreateCertificate", func(ctx context.Context) error {
			_, err := s.CreateCertificate(ctx, customCert(tc, "a"), []byte(tc.keyPEM), nil)
			return err
		}},
		{"UpdateCertificate", func(ctx context.Context) error {
			_, err := s.UpdateCertificate(ctx, withCertID(customCert(tc, "a"), 1), nil, nil)
			return err
		}},
		{"DeleteCertificate", func(ctx context.Context) error { return s.DeleteCertificate(ctx, 1, nil) }},
		{"HighestHostID", func(ctx context.Context) error { _, err := s.HighestHostID(ctx); return err }},
		{"LastChange", func(ctx context.Context) error { _, err := s.LastChange(ctx); return err }},
		{"ChangesAfter", func(ctx context.Context) error { _, err := s.ChangesAfter(ctx, 0, 0); return err }},
		{"ClaimNode", s.ClaimNode},
		{"Heartbeat", func(ctx context.Context) error { return s.Heartbeat(ctx, NodeStatus{}) }},
		{"Nodes", func(ctx context.Context) error { _, err := s.Nodes(ctx); return err }},
	} {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		start := time.Now()
		err := call.run(ctx)
		took := time.Since(start)
		cancel()
		var ue *UnavailableError
		switch {
		case !errors.As(err, &ue) || !errors.Is(err, ErrUnavailable):
			t.Errorf("%s: %v, want an *UnavailableError", call.name, err)
		case !strings.Contains(err.Error(), "PostgreSQL at "+pg.Addr()+" is unreachable (") ||
			!strings.HasSuffix(err.Error(), "); nothing was changed"):
			t.Errorf("%s: error %q does not name the database and say nothing changed", call.name, err)
		case strings.Contains(err.Error(), "pw-s3cret"):
			t.Errorf("%s: error %q holds the password", call.name, err)
		}
		if took > 5*time.Second {
			t.Errorf("%s took %v", call.name, took)
		}
		if call.name == "UpdateHost" {
			t.Logf("%s: %v (%v)", call.name, err, took)
		}
	}
	_, err := OpenPostgres(ctx, dsn, PostgresOptions{Node: "b", ConnectTimeout: time.Second})
	if want := "storage: opening PostgreSQL: PostgreSQL at " + pg.Addr() + " is unreachable ("; !errors.Is(err, ErrUnavailable) ||
		!strings.HasPrefix(err.Error(), want) || strings.Contains(err.Error(), "pw-s3cret") {
		t.Errorf("OpenPostgres with the server down: %v, want an error starting %q", err, want)
	}

	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	if _, err := s.UpdateHost(ctx, genHost(1, 3), nil); err != nil {
		t.Errorf("write after the database came back: %v", err)
	}
	if h, err := s.GetHost(ctx, 1); err != nil || h.Name != "name-3" {
		t.Errorf("read after the database came back: %+v, %v", h, err)
	}
	if err := s.ClaimNode(ctx); err != nil {
		t.Errorf("claim after the database came back: %v", err)
	}
}

// TestPostgresSchema: nodes opening one new database at once migrate it
// once; a schema newer than this version knows is refused.
func TestPostgresSchema(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := OpenPostgres(ctx, dsn, PostgresOptions{Node: string(rune('a' + i))})
			if err != nil {
				t.Errorf("open %d: %v", i, err)
				return
			}
			s.Close()
		}()
	}
	wg.Wait()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n, v int
	if err := conn.QueryRow(ctx, `SELECT COUNT(*), MAX(version) FROM schema_migrations`).Scan(&n, &v); err != nil || n != len(pgMigrations) || v != len(pgMigrations) {
		t.Errorf("schema_migrations: %d rows up to %d (%v), want %d", n, v, err, len(pgMigrations))
	}
	if _, err := conn.Exec(ctx, `INSERT INTO schema_migrations (version, name) VALUES ($1, 'from the future')`, len(pgMigrations)+1); err != nil {
		t.Fatal(err)
	}
	if s, err := OpenPostgres(ctx, dsn, PostgresOptions{Node: "a"}); !errors.Is(err, ErrSchemaTooNew) {
		if err == nil {
			s.Close()
		}
		t.Errorf("open of a newer schema: %v, want ErrSchemaTooNew", err)
	}
}

func TestOpenPostgresErrors(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		dsn  string
		opts PostgresOptions
		want string
	}{
		{"postgres://u:pw-s3cret@127.0.0.1:1/db?sslmode=bogus", PostgresOptions{Node: "a"}, "sslmode"},
		{"postgres://127.0.0.1:1/db", PostgresOptions{}, "node name is empty"},
		{"postgres://127.0.0.1:1/db", PostgresOptions{Node: "a", Key: make([]byte, 5)}, "must be 32"},
	} {
		s, err := OpenPostgres(ctx, tc.dsn, tc.opts)
		if err == nil {
			s.Close()
		}
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "pw-s3cret") {
			t.Errorf("OpenPostgres(%q, %+v) = %v, want ErrInvalid about %s", tc.dsn, tc.opts, err, tc.want)
		}
	}
}

// TestPostgresCloseLeavesNothing: Close ends Listen and closes every
// connection: no goroutine is left, and the server sees none.
func TestPostgresCloseLeavesNothing(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	before := runtime.NumGoroutine()
	s, err := OpenPostgres(ctx, dsn, PostgresOptions{Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimNode(ctx); err != nil {
		t.Fatal(err)
	}
	listening := make(chan int64, 10)
	done := make(chan error, 1)
	go func() { done <- s.Listen(ctx, func(id int64) { listening <- id }) }()
	next(t, listening, 5*time.Second, "connect")
	if _, err := s.CreateHost(ctx, genHost(0, 1), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ListHosts(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Listen after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Listen did not return after Close")
	}
	if _, err := s.ListHosts(ctx); err == nil {
		t.Error("ListHosts after Close succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<16)
		t.Errorf("%d goroutines after Close, %d before:\n%s", n, before, buf[:runtime.Stack(buf, true)])
	}
	conn, err := pgx.Connect(ctx, pg.DSN("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	db := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	deadline = time.Now().Add(5 * time.Second)
	for {
		err := conn.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, db).Scan(&n)
		if err != nil || n == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n != 0 {
		t.Errorf("%d connections to the database left after Close", n)
	}
}

// TestConnLogNode: each store tags its entries with its node name, and
// ConnLogQuery.Node selects one node's.
func TestConnLogNode(t *testing.T) { eachBackend(t, testConnLogNode) }

func testConnLogNode(t *testing.T, b testBackend) {
	ctx := context.Background()
	db := b.newDB(t)
	x, y := b.openAs(t, db, nil, "x"), b.openAs(t, db, nil, "y")
	for i, s := range []testStore{x, y, x} {
		if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	for node, want := range map[string][]int64{"": {2, 1, 0}, "x": {2, 0}, "y": {1}, "z": nil} {
		got, err := y.ConnLogs(ctx, ConnLogQuery{Node: node})
		if err != nil {
			t.Fatal(err)
		}
		var sent []int64
		for _, e := range got {
			sent = append(sent, e.BytesSent)
			if e.Node != map[int64]string{0: "x", 1: "y", 2: "x"}[e.BytesSent] {
				t.Errorf("entry %d has node %q", e.BytesSent, e.Node)
			}
		}
		if !slices.Equal(sent, want) {
			t.Errorf("node %q: entries %v, want %v", node, sent, want)
		}
	}
}

// TestConnLogNodesWriteAtOnce: stores of two nodes on one database that
// append batches at the same time (both LogWriters under load) store
// every entry once, with IDs no other entry has, each node's in the
// order it wrote them, and read back in full through either store.
func TestConnLogNodesWriteAtOnce(t *testing.T) { eachBackend(t, testConnLogNodesWriteAtOnce) }

func testConnLogNodesWriteAtOnce(t *testing.T, b testBackend) {
	ctx := context.Background()
	db := b.newDB(t)
	nodes := []testStore{b.openAs(t, db, nil, "x"), b.openAs(t, db, nil, "y")}
	const batches, size = 40, 37
	var wg sync.WaitGroup
	for n, s := range nodes {
		wg.Go(func() {
			for i := range batches {
				batch := make([]ConnLog, size)
				for j := range batch {
					batch[j] = ConnLog{StreamID: int64(1 + j%3), Action: ActionAllowed, BytesSent: int64(n<<20 | i*size + j)}
				}
				if err := s.AppendConnLogs(ctx, batch); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for _, s := range nodes {
		all, err := s.ConnLogs(ctx, ConnLogQuery{Limit: MaxConnLogExportLimit})
		if err != nil || len(all) != 2*batches*size {
			t.Fatalf("%d entries read (%v), want %d", len(all), err, 2*batches*size)
		}
		last := map[string]int64{"x": 1 << 40, "y": 1 << 40} // each node's entries, newest first
		for i, e := range all {
			if i > 0 && e.ID >= all[i-1].ID {
				t.Fatalf("IDs %d then %d: not newest first, or one given twice", all[i-1].ID, e.ID)
			}
			if e.Node != []string{"x", "y"}[e.BytesSent>>20] || e.BytesSent >= last[e.Node] {
				t.Fatalf("entry %d (node %s, bytes_sent %d) after %d: out of its node's order", e.ID, e.Node, e.BytesSent, last[e.Node])
			}
			last[e.Node] = e.BytesSent
		}
	}
}

// TestLogWriterRetryWhileUnreachable: with Retry, entries logged while
// PostgreSQL is down wait (up to the queue's size) and are written once it
// is back; only those beyond the queue are dropped.
func TestLogWriterRetryWhileUnreachable(t *testing.T) {
	s := openPostgres(t, pg.NewDatabase(t), PostgresOptions{Node: "a", ConnectTimeout: time.Second})
	var (
		mu        sync.Mutex
		reports   []error
		recovered []uint64
		onDrop    int
	)
	w := NewLogWriter(s, LogWriterOptions{
		QueueSize: 20, BatchSize: 5, FlushInterval: 10 * time.Millisecond, Retry: 100 * time.Millisecond, Retention: -1,
		OnError:   func(err error) { mu.Lock(); reports = append(reports, err); mu.Unlock() },
		OnRecover: func(lost uint64) { mu.Lock(); recovered = append(recovered, lost); mu.Unlock() },
		OnDrop:    func(b []ConnLog) { mu.Lock(); onDrop += len(b); mu.Unlock() },
	})
	defer w.Close()

	pg.Stop()
	restarted := false
	defer func() {
		if !restarted {
			pg.Start()
		}
	}()
	for i := range 5 {
		w.Enqueue(entry(1, i))
	}
	waitFor(t, "the failure's report", func() bool { mu.Lock(); defer mu.Unlock(); return len(reports) == 1 })
	wantUnavailable(t, "the report", reports[0], "PostgreSQL at "+pg.Addr()+" is unreachable")
	for i := range 30 {
		w.Enqueue(entry(1, 5+i))
	}
	time.Sleep(300 * time.Millisecond) // a few retries
	if w.Dropped() != 10 || w.Written() != 0 {
		t.Errorf("while down: dropped %d, written %d; want 10 (beyond the queue of 20), 0", w.Dropped(), w.Written())
	}

	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	waitFor(t, "the waiting entries", func() bool { return w.Written() == 25 })
	got, err := s.ConnLogs(context.Background(), ConnLogQuery{StreamID: 1, Limit: 100})
	if err != nil || len(got) != 25 || got[0].Node != "a" {
		t.Fatalf("log after the database came back: %d entries, %v", len(got), err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reports) != 1 || onDrop != 0 || len(recovered) != 1 || recovered[0] != 10 {
		t.Errorf("%d reports, %d handed to OnDrop, OnRecover calls %v; want 1, 0, [10]", len(reports), onDrop, recovered)
	}
}

// TestUnreachable: which errors say the database could not be reached.
func TestUnreachable(t *testing.T) {
	for i, tc := range []struct {
		err  error
		want bool
	}{
		{&pgconn.PgError{Code: "57P01"}, true}, // admin shutdown
		{&pgconn.PgError{Code: "08006"}, true}, // connection failure
		{&pgconn.PgError{Code: "53300"}, true}, // too many connections
		{&pgconn.PgError{Code: "23505"}, false},
		{&pgconn.PgError{Code: "57014"}, false}, // query cancelled
		{fmt.Errorf("reading: %w", io.ErrUnexpectedEOF), true},
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, true},
		{pgconn.ErrConnClosed, true},
		{context.DeadlineExceeded, true},
		{context.Canceled, false},
		{pgx.ErrNoRows, false},
		{ErrConflict, false},
		{ErrStale, false},
		{errors.New("failed to encode args[1]"), false},
	} {
		if got := unreachable(tc.err); got != tc.want {
			t.Errorf("%d: unreachable(%v) = %v, want %v", i, tc.err, got, tc.want)
		}
	}
}

// TestOpenUnreachable: with OpenUnreachable a node opens its store while
// the database is down; its calls fail with *UnavailableError, and once
// the database is back the first one migrates the schema and they work.
func TestOpenUnreachable(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	pg.Stop()
	restarted := false
	defer func() {
		if !restarted {
			pg.Start()
		}
	}()
	s, err := OpenPostgres(ctx, dsn, PostgresOptions{Node: "a", OpenUnreachable: true, ConnectTimeout: time.Second})
	if err != nil {
		t.Fatalf("OpenPostgres with OpenUnreachable: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	if _, err := s.ListHosts(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("ListHosts while down: %v", err)
	}
	if _, err := s.CreateHost(ctx, genHost(0, 1), nil); !errors.Is(err, ErrUnavailable) {
		t.Errorf("CreateHost while down: %v", err)
	}
	heard := listenFor(t, s)

	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	restarted = true
	if id := next(t, heard, 5*time.Second, "connect"); id != 0 {
		t.Errorf("notify(%d) on connect, want 0", id)
	}
	if last, err := s.LastChange(ctx); err != nil || last != 0 {
		t.Fatalf("LastChange once the database is back: %d, %v", last, err)
	}
	if _, err := s.CreateHost(ctx, genHost(0, 1), nil); err != nil {
		t.Fatalf("CreateHost once the database is back: %v", err)
	}
}
