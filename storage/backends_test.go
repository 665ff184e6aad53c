package storage

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
)

// pg is the PostgreSQL server of this package's tests.
var pg *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &pg) }

// testStore is a store under test, of either backend.
type testStore interface {
	Store
	HighestHostID(ctx context.Context) (int64, error)
	CheckKey(ctx context.Context) error
	base() *core
}

func (s *core) base() *core { return s }

// testNode is the node name test stores are opened with.
const testNode = "node-a"

// testBackend opens stores of one kind for the tests that every store must
// pass (run them with eachBackend).
type testBackend struct {
	name string
	// newDB makes a new, empty database and returns what open takes: a
	// file's path or a DSN.
	newDB func(t testing.TB) string
	// openAs opens a store on db as node, closed at cleanup.
	openAs func(t testing.TB, db string, key []byte, node string) testStore
}

// open opens a store on db as node testNode, closed at cleanup.
func (b testBackend) open(t testing.TB, db string, key []byte) testStore {
	t.Helper()
	return b.openAs(t, db, key, testNode)
}

var backends = []testBackend{
	{
		name:  "sqlite",
		newDB: func(t testing.TB) string { return filepath.Join(t.TempDir(), "aegis.db") },
		openAs: func(t testing.TB, db string, key []byte, node string) testStore {
			t.Helper()
			s, err := OpenWith(db, OpenOptions{Key: key, Node: node})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		},
	},
	{
		name:  "postgres",
		newDB: func(t testing.TB) string { return pg.NewDatabase(t) },
		openAs: func(t testing.TB, db string, key []byte, node string) testStore {
			t.Helper()
			s := openPostgres(t, db, PostgresOptions{Key: key, Node: node})
			// As a node that has applied what the database holds: a
			// test's second store writes after its first.
			last, err := s.LastChange(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			s.SetApplied(last)
			return s
		},
	},
}

// openPostgres opens a Postgres store on dsn, closed at cleanup.
func openPostgres(t testing.TB, dsn string, opts PostgresOptions) *Postgres {
	t.Helper()
	s, err := OpenPostgres(context.Background(), dsn, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// eachBackend runs test once per backend, as a subtest named after it.
func eachBackend(t *testing.T, test func(t *testing.T, b testBackend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { test(t, b) })
	}
}

// store opens a store without a key on a new database.
func (b testBackend) store(t testing.TB) testStore {
	t.Helper()
	return b.open(t, b.newDB(t), nil)
}

// keyed opens a store with testKey on a new database, and returns the
// database too.
func (b testBackend) keyed(t testing.TB) (testStore, string) {
	t.Helper()
	db := b.newDB(t)
	return b.open(t, db, testKey), db
}

// sealedKey reads the key_sealed column of certificate id.
func sealedKey(t testing.TB, s testStore, id int64) []byte {
	t.Helper()
	var b []byte
	if err := s.base().reads.queryRow(context.Background(), `SELECT key_sealed FROM certificates WHERE id = ?`, id).Scan(&b); err != nil {
		t.Fatal(err)
	}
	return b
}

// setSealedKey writes the key_sealed column of certificate id, past the
// store's checks.
func setSealedKey(t testing.TB, s testStore, id int64, sealed []byte) {
	t.Helper()
	err := s.base().be.inTx(context.Background(), false, func(tx writeTx) error {
		_, err := tx.exec(context.Background(), `UPDATE certificates SET key_sealed = ? WHERE id = ?`, sealed, id)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkUpdateHost: one host write (a transaction, and on PostgreSQL
// the write lock, the stale check, the change and its notification) on
// each backend.
func BenchmarkUpdateHost(b *testing.B) {
	for _, bk := range backends {
		b.Run(bk.name, func(b *testing.B) {
			s := bk.store(b)
			ctx := context.Background()
			if _, err := s.CreateHost(ctx, genHost(1, 0), nil); err != nil {
				b.Fatal(err)
			}
			for i := 0; b.Loop(); i++ {
				if _, err := s.UpdateHost(ctx, genHost(1, i), nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAppendConnLogs: one batch of DefaultLogBatchSize entries.
func BenchmarkAppendConnLogs(b *testing.B) {
	batch := make([]ConnLog, DefaultLogBatchSize)
	for i := range batch {
		batch[i] = ConnLog{StreamID: 1, SourceIP: "192.0.2.1", SourcePort: 40000 + i, BytesSent: int64(i), Action: ActionAllowed}
	}
	for _, bk := range backends {
		b.Run(bk.name, func(b *testing.B) {
			s := bk.store(b)
			ctx := context.Background()
			for b.Loop() {
				if err := s.AppendConnLogs(ctx, batch); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
