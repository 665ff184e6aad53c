package main

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/pgserver"
)

// The cluster bench's measuring code, with small counts, on bin/aegis
// (AEGIS_BIN, as make test sets it) and a real PostgreSQL: every number
// is there and the report prints them.
func TestClusterBench(t *testing.T) {
	bin := os.Getenv("AEGIS_BIN")
	if bin == "" {
		t.Skip("runs bin/aegis: set AEGIS_BIN (make test does)")
	}
	n := clusterCounts{edits: 5, changes: 20}
	r, err := runCluster(bin, t.TempDir(), n, 30*time.Second, func(s string) { t.Log(s) })
	if errors.Is(err, pgserver.ErrNotInstalled) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(r.prop) != n.edits || r.pgWrites <= 0 || r.sqlWrites <= 0 || r.lastChange < int64(n.edits+n.changes) ||
		r.restart <= 0 || r.restartAPI <= 0 || r.restart < r.restartAPI || r.resume <= 0 {
		t.Fatalf("result: %+v", r)
	}
	out := r.report(n)
	for _, want := range []string{"5 edits:", "p50 ", "PostgreSQL ", "SQLite ", "20 changes", "node c, stopped", "node b, paused"} {
		if !strings.Contains(out, want) {
			t.Errorf("the report does not say %q:\n%s", want, out)
		}
	}
	t.Log("\n" + out)
}
