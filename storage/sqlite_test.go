package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// newStore opens a store on a new file in t.TempDir, closed at cleanup.
func newStore(t testing.TB) *SQLite {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "aegis.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestOpenCreatesDirectoryAndFile(t *testing.T) {
	// '?', '#' and '%' would be taken for URI syntax if the path were not
	// escaped.
	path := filepath.Join(t.TempDir(), "a dir", "sub?x#y%20", "aegis.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("database file: %v", err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("file mode = %v, want 0600", perm)
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "aegis.db") {
			t.Errorf("unexpected file %q beside the database", e.Name())
		}
	}
}

func TestOpenSettings(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	for i, tc := range []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"foreign_keys", "1"},
		{"synchronous", "2"}, // FULL
		{"busy_timeout", "5000"},
	} {
		for _, db := range []struct {
			name string
			q    queryRower
		}{{"write", s.write}, {"read", s.read}} {
			var got string
			if err := db.q.QueryRowContext(ctx, "PRAGMA "+tc.pragma).Scan(&got); err != nil {
				t.Fatalf("%d: %s: %v", i, tc.pragma, err)
			}
			if got != tc.want {
				t.Errorf("%d: %s connection: PRAGMA %s = %s, want %s", i, db.name, tc.pragma, got, tc.want)
			}
		}
	}
	if _, err := s.read.ExecContext(ctx, `DELETE FROM hosts`); err == nil {
		t.Error("read connection accepted a write")
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(""); !errors.Is(err, ErrInvalid) {
		t.Errorf("Open(\"\") = %v, want ErrInvalid", err)
	}

	// A file where the parent directory should be.
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(file, "aegis.db")
	_, err := Open(path)
	if err == nil {
		t.Fatal("Open under a regular file succeeded")
	}
	if want := "storage: open " + path + ": "; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q does not start with %q", err, want)
	}

	// Not a database.
	junk := filepath.Join(dir, "junk.db")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not a database ", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(junk); err == nil {
		t.Fatal("Open of a file that is not a database succeeded")
	} else if want := "storage: open " + junk + ": "; !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q does not start with %q", err, want)
	}
}

func TestCloseTwice(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "aegis.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := s.ListHosts(context.Background()); err == nil {
		t.Error("ListHosts after Close succeeded")
	}
}

// The LogWriter's transactions commit with synchronous=NORMAL (no fsync
// each), every other with FULL, whatever ran before on the one write
// connection.
func TestSynchronousByWriter(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	level := func(ctx context.Context, tracked bool) int {
		t.Helper()
		var v int
		if err := s.inTx(ctx, tracked, func(tx writeTx) error {
			return tx.queryEach(ctx, "PRAGMA synchronous", nil, func(r rowScanner) error { return r.Scan(&v) })
		}); err != nil {
			t.Fatal(err)
		}
		return v
	}
	for i, tc := range []struct {
		ctx     context.Context
		tracked bool
		want    int
	}{
		{ctx, true, 2},
		{forLogWriter(ctx, new(logpace.Pacer)), false, 1},
		{ctx, true, 2},
		{forLogWriter(ctx, new(logpace.Pacer)), false, 1},
		{ctx, false, 2}, // the key canary, ForgetKeys, the history
	} {
		if got := level(tc.ctx, tc.tracked); got != tc.want {
			t.Errorf("%d: synchronous %d, want %d (1 NORMAL, 2 FULL)", i, got, tc.want)
		}
	}
}
