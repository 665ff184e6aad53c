// Package pgtest runs a real PostgreSQL server for a test package, with
// internal/pgserver (Debian's binaries, initdb into a temp dir, postgres
// as the test process's child on a free loopback port, fsync off; as root
// as the postgres user).
//
// One server per package, from TestMain:
//
//	var pg *pgtest.Server
//
//	func TestMain(m *testing.M) { pgtest.Main(m, &pg) }
//
// and a database of its own per test: dsn := pg.NewDatabase(t). A test
// calls pg.Need(t) first (NewDatabase does): it skips, saying why, only
// where PostgreSQL is not installed.
//
// Only tests import this package.
package pgtest

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/pgserver"
)

// Server is one PostgreSQL server run by a test package: Stop and Start
// (for database-down tests), Addr, DSN and SocketDSN are pgserver's.
type Server struct {
	*pgserver.Server

	skip string // why tests skip, when the server could not start
	dbs  atomic.Int32
}

// Main starts a server, stores it in *srv, runs the package's tests and
// stops the server. Where PostgreSQL is not installed, *srv is a server
// whose Need skips; any other failure to start is fatal.
func Main(m *testing.M, srv **Server) {
	s, err := Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "pgtest:", err)
		os.Exit(1)
	}
	*srv = s
	code := m.Run()
	s.Close()
	os.Exit(code)
}

// Start starts a server. Without the Debian binaries it returns a server
// whose Need skips, not an error.
func Start() (*Server, error) {
	s, err := pgserver.New()
	if errors.Is(err, pgserver.ErrNotInstalled) {
		return &Server{skip: "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)"}, nil
	}
	if err != nil {
		return nil, err
	}
	return &Server{Server: s}, nil
}

// Close stops the server and removes its files.
func (s *Server) Close() {
	if s.skip != "" {
		return
	}
	s.Server.Close()
}

// Need skips the test where PostgreSQL is not installed.
func (s *Server) Need(t testing.TB) {
	t.Helper()
	if s == nil {
		t.Fatal("pgtest: no server: call pgtest.Main from TestMain")
	}
	if s.skip != "" {
		t.Skip(s.skip)
	}
}

// NewDatabase creates an empty database for the test, dropped (with every
// connection still open to it) when the test ends, and returns its DSN.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	s.Need(t)
	name := fmt.Sprintf("t%d_%d", os.Getpid(), s.dbs.Add(1))
	dsn, err := s.CreateDatabase(name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		if err := s.DropDatabase(name); err != nil {
			t.Logf("pgtest: dropping %s: %v", name, err)
		}
	})
	return dsn
}
