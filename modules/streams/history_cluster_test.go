package streams_test

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/jackc/pgx/v5"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// TestPostgresHistory runs a node on PostgreSQL whose stream carries
// traffic between two samples, beside a second node that stores its own
// samples of the same stream: the history has both nodes' points, and the
// top-level points are their sum (healthy only if both are).
func TestPostgresHistory(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	startCaddy(t, postgresApp(dsn, "here"))
	ctx := context.Background()
	port := freePort(t)
	hs, err := streams.CreateHost(ctx, apiStream(0, port, up.Port))
	if err != nil {
		t.Fatal(err)
	}
	sid := hs.ID
	app := streams.Running()
	// Ahead of the sampling loop's own samples, on a minute.
	base := time.Now().Add(2 * time.Minute).Truncate(time.Minute)
	streams.SampleHistory(base)
	c := dial(t, port)
	roundTrip(t, c, strings.Repeat("y", 50))
	if !testenv.Within(5*time.Second, func() bool {
		s, err := app.HostStatus(sid)
		return err == nil && s.Status.BytesReceived == 50
	}) {
		t.Fatal("the stream did not count 50 bytes")
	}
	streams.SampleHistory(base.Add(10 * time.Second))

	other := otherNode(t, dsn, 0)
	unhealthy := false
	if err := other.AppendHistory(ctx, []storage.HistorySample{
		{StreamID: sid, Time: base.Add(10 * time.Second), BytesSent: 2, BytesReceived: 3, Connections: 0.5, Active: 4, Healthy: &unhealthy},
	}); err != nil {
		t.Fatal(err)
	}

	h, err := app.History(ctx, sid, base.Add(-time.Second), 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Nodes) != 2 || h.Nodes[0].Node != "here" || h.Nodes[1].Node != "there" {
		t.Fatalf("nodes: %+v", h.Nodes)
	}
	here := h.Nodes[0].Points
	if len(here) != 2 || here[1].BytesSentPerSec != 5 || here[1].ActiveConnections != 1 || here[1].ConnectionsPerSec != 0.1 {
		t.Fatalf("this node's points: %+v", here)
	}
	if len(h.Points) != 2 {
		t.Fatalf("sum: %+v", h.Points)
	}
	sum := h.Points[1]
	if !sum.Time.Equal(base.Add(10*time.Second)) || sum.BytesSentPerSec != 7 || sum.BytesReceivedPerSec != 8 ||
		math.Abs(sum.ConnectionsPerSec-0.6) > 1e-6 || sum.ActiveConnections != 5 || sum.Healthy == nil || *sum.Healthy {
		t.Fatalf("the sum of the nodes: %+v", sum)
	}
	if h.Points[0].Healthy != nil {
		t.Fatalf("without health checks on either node, healthy is %v", *h.Points[0].Healthy)
	}
}

// TestPostgresHistoryStopsPromptly holds the stream_history table locked
// until the sampling loop's write waits on it, then stops Caddy: the last
// app's Stop cancels that write rather than wait out its timeout.
func TestPostgresHistoryStopsPromptly(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	startCaddy(t, postgresApp(dsn, "here"))
	ctx := context.Background()
	if _, err := streams.CreateHost(ctx, apiStream(0, freePort(t), up.Port)); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if _, err := tx.Exec(ctx, `LOCK TABLE stream_history IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	// Another connection watches: a transaction sees pg_stat_activity as
	// it was when it started.
	watch, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(ctx)
	if !testenv.Within(2*streams.HistoryStep, func() bool {
		var n int
		err := watch.QueryRow(ctx, `SELECT COUNT(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO stream_history%'`).Scan(&n)
		return err == nil && n > 0
	}) {
		t.Fatal("the sampling loop's write never waited on the lock")
	}
	start := time.Now()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Stop took %v: it waited for the history write", d)
	}
}
