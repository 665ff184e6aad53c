package streams_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"

	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
)

var pg *pgtest.Server

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" { // a helper process needs no database
		os.Exit(m.Run())
	}
	pgtest.Main(m, &pg)
}

const clusterKey = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

// otherNode opens dsn as a second node named "there", as another Aegis
// process would, keeping keepChanges changes (0: the default); it is
// closed when the test ends.
func otherNode(t *testing.T, dsn string, keepChanges int) *storage.Postgres {
	t.Helper()
	key, _ := storage.ParseKey(clusterKey)
	other, err := storage.OpenPostgres(context.Background(), dsn, storage.PostgresOptions{Key: key, Node: "there", KeepChanges: keepChanges})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	return other
}

func postgresApp(dsn, node string, h ...map[string]any) map[string]any {
	app := hosts(h...)
	app["node_name"] = node
	app["storage"] = map[string]any{"postgres": map[string]any{"dsn": dsn}, "key": clusterKey}
	return app
}

// Storage postgres needs the key every node shares, and one storage only;
// the refusal names the setting and the fix, and nothing runs.
func TestPostgresSettingsRefused(t *testing.T) {
	checkNoLeaks(t)
	c := testenv.New(t)
	for _, tc := range []struct {
		storage map[string]any
		want    []string
	}{
		{map[string]any{"postgres": map[string]any{"dsn": "postgres://x@127.0.0.1:1/db"}},
			[]string{"storage postgres needs storage_key", "openssl rand -hex 32"}},
		{map[string]any{"postgres": map[string]any{"dsn": "postgres://x@127.0.0.1:1/db"}, "path": "/tmp/x.db", "key": clusterKey},
			[]string{"both an SQLite path (/tmp/x.db) and postgres are set; keep one"}},
		{map[string]any{"postgres": map[string]any{}, "key": clusterKey},
			[]string{"storage postgres: the dsn is empty"}},
	} {
		err := c.Load(map[string]any{"streams": map[string]any{"storage": tc.storage}})
		if err == nil || !testenv.OneErrorContains(err, tc.want) {
			t.Errorf("storage %v: %v; want an error saying %q", tc.storage, err, tc.want)
		}
	}
	if streams.Running() != nil {
		t.Fatal("a refused config runs")
	}

	// A node whose name a running node holds refuses to start.
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	key, _ := storage.ParseKey(clusterKey)
	other, err := storage.OpenPostgres(context.Background(), dsn, storage.PostgresOptions{Key: key, Node: "twin"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.ClaimNode(context.Background()); err != nil {
		t.Fatal(err)
	}
	err = c.Load(map[string]any{"streams": postgresApp(dsn, "twin")})
	if want := []string{`node_name "twin"`, "another running node has this node name", "give every node a name of its own"}; err == nil || !testenv.OneErrorContains(err, want) {
		t.Fatalf("a second node named twin: %v; want an error saying %q", err, want)
	}

	// A node whose storage_key is not the cluster's refuses to start.
	cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"web.example"}})
	if _, err := other.CreateCertificate(context.Background(), spec.Certificate{Name: "web", Source: spec.SourceCustom,
		Domains: []string{"web.example"}, CertificatePEM: cert.CertPEM}, []byte(cert.KeyPEM), nil); err != nil {
		t.Fatal(err)
	}
	app := postgresApp(dsn, "third")
	app["storage"].(map[string]any)["key"] = strings.Repeat("ab", 32)
	err = c.Load(map[string]any{"streams": app})
	if want := []string{"the configured storage_key is not the key that sealed the private keys in the database PostgreSQL at", "every node needs the same key"}; err == nil || !testenv.OneErrorContains(err, want) {
		t.Fatalf("a node with another key: %v; want an error saying %q", err, want)
	}
	if err != nil && strings.Contains(err.Error(), "abababab") {
		t.Fatalf("the error shows the key: %v", err)
	}
}

// The node follows the changes another node writes to the database: a
// stream created there starts here, an edit that keeps the address keeps
// the sockets and the open connections, a move rebinds, a certificate
// stored there terminates TLS here, a delete stops it. Every change is
// in the node's snapshot, whose private keys are sealed. Stopping leaves no
// goroutine behind.
func TestPostgresFollowsOtherNode(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir()) // the snapshot's directory
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, postgresApp(dsn, "here"))
	app := streams.Running()
	if got := app.Node(); got != "here" {
		t.Fatalf("node name %q", got)
	}

	ctx := context.Background()
	other := otherNode(t, dsn, 0)
	// write runs one write of the other node, after it has applied
	// everything (its own follower is this test).
	write := func(f func() error) {
		t.Helper()
		for {
			last, err := other.LastChange(ctx)
			if err != nil {
				t.Fatal(err)
			}
			other.SetApplied(last)
			if err = f(); !errors.Is(err, storage.ErrStale) {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
		}
	}
	within := func(d time.Duration, what string, cond func() bool) {
		t.Helper()
		if !testenv.Within(d, cond) {
			t.Fatalf("not within %v: %s", d, what)
		}
	}
	relays := func(port int) func() bool {
		return func() bool {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
			if err != nil {
				return false
			}
			defer c.Close()
			_, err = testenv.TryRoundTrip(c, "ping")
			return err == nil
		}
	}

	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	var stored storage.Stored
	write(func() (err error) { stored, err = other.CreateHost(ctx, apiStream(0, p1, up.Port), nil); return err })
	within(time.Second, "the stream created by the other node relays here", relays(p1))

	open := dial(t, p1)
	defer open.Close()
	s := stored.Stream
	s.Notes = "edited there"
	write(func() (err error) { stored, err = other.UpdateHost(ctx, s, nil); return err })
	within(time.Second, "the edit is applied here", func() bool {
		hs, err := app.HostStatus(stored.ID)
		return err == nil && hs.Notes == "edited there"
	})
	roundTrip(t, open, "kept") // same address: the sockets and connections stay
	logged := readFile(t, inst.logFile)
	if n := strings.Count(logged, `"stream updated in place"`); n != 1 {
		t.Fatalf("%d in-place updates logged, want 1", n)
	}
	if !strings.Contains(logged, `"node":"here"`) || !strings.Contains(logged, `"from_node":"there"`) {
		t.Fatalf("the log does not name this node and the one a change came from:\n%s", logged)
	}

	s.ListenPort = p2
	write(func() (err error) { stored, err = other.UpdateHost(ctx, s, nil); return err })
	within(time.Second, "the stream moved to its new port", relays(p2))
	within(time.Second, "the old port is closed", func() bool { return refusedAt(t, p1) })

	cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"web.example"}})
	var sc spec.Certificate
	write(func() (err error) {
		sc, err = other.CreateCertificate(ctx, spec.Certificate{Name: "web", Source: spec.SourceCustom, Domains: []string{"web.example"}, CertificatePEM: cert.CertPEM}, []byte(cert.KeyPEM), nil)
		return err
	})
	tlsStream := apiStream(0, p3, up.Port)
	tlsStream.SSLEnabled, tlsStream.SSLCertID = true, sc.ID
	write(func() error { _, err := other.CreateHost(ctx, tlsStream, nil); return err })
	within(time.Second, "TLS with the other node's certificate", func() bool { return tlsRoundTrip(p3, cert) == nil })

	// A reload keeps the store and its follower; the new app follows.
	if err := inst.load(postgresApp(dsn, "here")); err != nil {
		t.Fatal(err)
	}
	app = streams.Running()
	if err := inst.load(postgresApp(dsn, "renamed")); err == nil || !strings.Contains(err.Error(), `node_name "renamed": this process runs as node "here"`) {
		t.Fatalf("a reload that renames the node: %v", err)
	}
	write(func() error { return other.DeleteHost(ctx, stored.ID, nil) })
	within(time.Second, "the deleted stream stops", func() bool { return refusedAt(t, p2) })

	snap := readFile(t, filepath.Join(os.Getenv("XDG_DATA_HOME"), "caddy", streams.SnapshotFile))
	if !strings.Contains(snap, `"sealed_key"`) || strings.Contains(snap, "PRIVATE KEY") || !strings.Contains(snap, `"web.example"`) {
		t.Fatalf("snapshot: %s", snap)
	}

	// The cluster view: this node and the other one, once it has sent a
	// heartbeat; the other one's lag is what it has not applied.
	if err := other.Heartbeat(ctx, storage.NodeStatus{Name: "there", AppliedChange: 1}); err != nil {
		t.Fatal(err)
	}
	view := app.ClusterView(ctx)
	if view.Node != "here" || view.Storage != "postgres" || len(view.Nodes) != 2 {
		t.Fatalf("cluster view: %+v", view)
	}
	for _, n := range view.Nodes {
		want := int64(0)
		if n.Name == "there" {
			want = view.LastChange - 1
		}
		if n.Status != streams.NodeUp || n.Lag != want {
			t.Fatalf("cluster view: node %+v; last change %d", n, view.LastChange)
		}
	}

	// The stream rows carry totals over the nodes: this node's counters
	// as they are, the other's from its heartbeat (read after each of
	// this node's own); the stats keep this node's only.
	rows := app.HostStatuses()
	if len(rows) != 1 {
		t.Fatalf("streams: %+v", rows)
	}
	sid := rows[0].ID
	theirs, _ := json.Marshal([]spec.Status{
		{ID: sid, ActiveConnections: 2, TotalConnections: 40, BlockedConnections: 3, BytesSent: 1000, BytesReceived: 2000},
		{ID: sid + 100, TotalConnections: 7}, // a stream this node does not run
	})
	if err := other.Heartbeat(ctx, storage.NodeStatus{Name: "there", AppliedChange: view.LastChange, Streams: theirs}); err != nil {
		t.Fatal(err)
	}
	totals := func(nodes int, add spec.ClusterTotals) func() bool {
		return func() bool {
			hs, err := app.HostStatus(sid)
			if err != nil {
				t.Fatal(err)
			}
			want := add
			want.Add(&hs.Status)
			want.Nodes = nodes
			list := app.HostStatuses()
			return hs.Status.Cluster != nil && *hs.Status.Cluster == want &&
				len(list) == 1 && list[0].Status.Cluster != nil && *list[0].Status.Cluster == want
		}
	}
	within(5*time.Second, "the totals of both nodes", totals(2,
		spec.ClusterTotals{ActiveConnections: 2, TotalConnections: 40, BlockedConnections: 3, BytesSent: 1000, BytesReceived: 2000}))
	if st := app.Statuses(); len(st) != 1 || st[0].Cluster != nil {
		t.Fatalf("the stats carry totals: %+v", st)
	}
	// A node whose heartbeat is stale is left out.
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `UPDATE nodes SET last_seen = now() - interval '1 hour' WHERE name = 'there'`); err != nil {
		t.Fatal(err)
	}
	within(5*time.Second, "the totals without the stale node", totals(1, spec.ClusterTotals{}))
}

// A node that missed changes whose history was pruned meanwhile reloads
// every stream and certificate: the streams another node created, moved
// and deleted while this one could not apply anything end as stored.
func TestPostgresHistoryPruned(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, postgresApp(dsn, "here"))
	ctx := context.Background()
	other := otherNode(t, dsn, 1)
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	gone, err := streams.CreateHost(ctx, apiStream(0, p1, up.Port))
	if err != nil {
		t.Fatal(err)
	}

	release := streams.HoldWrites() // this node applies nothing now
	last, err := other.LastChange(ctx)
	if err != nil {
		release()
		t.Fatal(err)
	}
	other.SetApplied(last)
	moved, err := other.CreateHost(ctx, apiStream(0, p2, up.Port), nil)
	if err == nil {
		moved.ListenPort = p3
		_, err = other.UpdateHost(ctx, moved.Stream, nil)
	}
	if err == nil {
		err = other.DeleteHost(ctx, gone.ID, nil)
	}
	release()
	if err != nil {
		t.Fatal(err)
	}
	if !testenv.Within(2*time.Second, func() bool { return refusedAt(t, p1) && !refusedAt(t, p3) }) {
		t.Fatalf("after the pruned history: port %d refused %v, port %d refused %v", p1, refusedAt(t, p1), p3, refusedAt(t, p3))
	}
	if !refusedAt(t, p2) {
		t.Fatalf("port %d listens", p2)
	}
	if !strings.Contains(readFile(t, inst.logFile), "the change history this node needs was pruned") {
		t.Fatal("the reload is not logged")
	}
}

// A write of this node that another node's write overtakes in the
// database applies that write first and is checked against it: a
// precondition on the version it had fails, whichever order the two took.
func TestPostgresStaleWriteRetries(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	startCaddy(t, postgresApp(dsn, "here"))
	ctx := context.Background()
	other := otherNode(t, dsn, 0)
	hs, err := streams.CreateHost(ctx, apiStream(0, freePort(t), up.Port))
	if err != nil {
		t.Fatal(err)
	}
	id := hs.ID
	errChanged := errors.New("changed since loaded")
	for round := range 20 {
		hs, err := streams.Running().HostStatus(id)
		if err != nil {
			t.Fatal(err)
		}
		loaded := hs.Version
		theirs := make(chan error, 1)
		go func() {
			for {
				last, err := other.LastChange(ctx)
				if err != nil {
					theirs <- err
					return
				}
				other.SetApplied(last)
				h, err := other.GetHost(ctx, id)
				if err != nil {
					theirs <- err
					return
				}
				h.Notes = "theirs"
				if _, err = other.UpdateHost(ctx, h.Stream, nil); !errors.Is(err, storage.ErrStale) {
					theirs <- err
					return
				}
			}
		}()
		s := *hs.Stream
		s.Notes = "ours"
		_, err = streams.UpdateHost(ctx, id, s, func(v string) error {
			if v != loaded {
				return errChanged
			}
			return nil
		})
		if err != nil && !errors.Is(err, errChanged) {
			t.Fatalf("round %d: our write: %v; want success or the precondition's error", round, err)
		}
		if err := <-theirs; err != nil {
			t.Fatalf("round %d: their write: %v", round, err)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Numbers for the closing note: API writes per second on PostgreSQL and
// on SQLite, and how long a node takes to apply 1,000 changes that another
// node made while it could not.
func TestPostgresNumbers(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, postgresApp(dsn, "here"))
	ctx := context.Background()
	writes := func(backend string) {
		t.Helper()
		hs, err := streams.CreateHost(ctx, apiStream(0, freePort(t), up.Port))
		if err != nil {
			t.Fatal(err)
		}
		s := *hs.Stream
		const n = 200
		start := time.Now()
		for i := range n {
			s.Notes = strconv.Itoa(i)
			if _, err := streams.UpdateHost(ctx, s.ID, s); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%s: %d API updates, %.0f writes/s", backend, n, n/time.Since(start).Seconds())
	}
	writes("PostgreSQL")

	other := otherNode(t, dsn, 0)
	h, err := streams.CreateHost(ctx, apiStream(0, freePort(t), up.Port))
	if err != nil {
		t.Fatal(err)
	}
	release := streams.HoldWrites()
	last, err := other.LastChange(ctx)
	if err == nil {
		other.SetApplied(last)
		s := *h.Stream
		for i := range 1000 {
			s.Notes = strconv.Itoa(i)
			if _, err = other.UpdateHost(ctx, s, nil); err != nil {
				break
			}
		}
	}
	if err == nil {
		last, err = other.LastChange(ctx)
	}
	start := time.Now()
	release()
	if err != nil {
		t.Fatal(err)
	}
	app := streams.Running()
	applied := func() int64 {
		for _, n := range app.ClusterView(ctx).Nodes {
			if n.Name == "here" {
				return n.AppliedChange
			}
		}
		return 0
	}
	if !testenv.Within(30*time.Second, func() bool { return applied() >= last }) {
		t.Fatalf("applied %d of %d after 30s", applied(), last)
	}
	t.Logf("a node applied 1,000 changes made while it could not in %v", time.Since(start))

	if err := inst.load(hosts()); err != nil { // SQLite, the test's file
		t.Fatal(err)
	}
	writes("SQLite")
}

// A stream another node creates on a port this node's own config stream
// listens on is not run here: the change is logged and skipped, and the
// config stream keeps every connection. (Bound here too, through
// SO_REUSEPORT, it would take a share of them to its own upstream.)
func TestPostgresChangeOnAPortThisNodeUses(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	mine := newUpstream(t, echo)
	theirs := newUpstream(t, func(c net.Conn) { _, _ = c.Write([]byte("theirs\n")); c.Close() })
	p := freePort(t)
	inst := startCaddy(t, postgresApp(dsn, "here", host(500, p, mine.Port, nil)))
	ctx := context.Background()
	other := otherNode(t, dsn, 0)
	last, err := other.LastChange(ctx)
	if err != nil {
		t.Fatal(err)
	}
	other.SetApplied(last)
	stored, err := other.CreateHost(ctx, apiStream(0, p, theirs.Port), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !testenv.Within(5*time.Second, func() bool {
		l := readFile(t, inst.logFile)
		return strings.Contains(l, "applying a change made on another node") || strings.Contains(l, `"change applied"`)
	}) {
		t.Fatal("the change was not taken up within 5s")
	}
	for i := range 40 {
		c := dial(t, p)
		roundTrip(t, c, fmt.Sprintf("connection %d", i))
		c.Close()
	}
	if _, err := streams.Running().HostStatus(stored.ID); err == nil {
		t.Fatalf("stream %d runs here on the port of this node's config stream", stored.ID)
	}
	if l := readFile(t, inst.logFile); !strings.Contains(l, "cannot run on this node") {
		t.Fatalf("no log line says the stream cannot run here:\n%s", l)
	}
	// A reload of the same config (and so a restart) finds the shared
	// stream stored, and leaves it to the other nodes again.
	if err := inst.load(postgresApp(dsn, "here", host(500, p, mine.Port, nil))); err != nil {
		t.Fatalf("reloading this node's config with another node's stream on its port: %v", err)
	}
	if got := roundTrip(t, dial(t, p), "after the reload"); got != "after the reload" {
		t.Fatalf("the config stream after the reload: %q", got)
	}
	if _, err := streams.Running().HostStatus(stored.ID); err == nil {
		t.Fatalf("stream %d runs here after the reload", stored.ID)
	}
}

// A certificate that a stream of this node's config uses, deleted on a
// node whose config does not use it (so the delete was allowed there):
// this node keeps serving it, and says what to do.
func TestPostgresDeletedCertificateThisNodeUses(t *testing.T) {
	checkNoLeaks(t)
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	other := otherNode(t, dsn, 0)
	cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"web.example"}})
	sc, err := other.CreateCertificate(ctx, spec.Certificate{Name: "web", Source: spec.SourceCustom, Domains: []string{"web.example"}, CertificatePEM: cert.CertPEM}, []byte(cert.KeyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	up := newUpstream(t, echo)
	p := freePort(t)
	inst := startCaddy(t, postgresApp(dsn, "here", host(500, p, up.Port, map[string]any{"ssl_enabled": true, "ssl_cert_id": sc.ID})))
	if err := tlsRoundTrip(p, cert); err != nil {
		t.Fatalf("TLS before the delete: %v", err)
	}
	last, err := other.LastChange(ctx)
	if err != nil {
		t.Fatal(err)
	}
	other.SetApplied(last)
	if err := other.DeleteCertificate(ctx, sc.ID, nil); err != nil {
		t.Fatal(err)
	}
	if !testenv.Within(5*time.Second, func() bool {
		return strings.Contains(readFile(t, inst.logFile), "a certificate this node's config uses was deleted on another node")
	}) {
		t.Fatalf("no log line says the deleted certificate is kept:\n%s", readFile(t, inst.logFile))
	}
	if err := tlsRoundTrip(p, cert); err != nil {
		t.Fatalf("TLS after another node deleted the certificate: %v", err)
	}
}

// tlsRoundTrip makes a TLS connection to port for web.example, trusting
// cert's CA, and sends one message through it.
func tlsRoundTrip(port int, cert *testenv.Issued) error {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err != nil {
		return err
	}
	tc := tls.Client(c, &tls.Config{ServerName: "web.example", RootCAs: cert.Pool()})
	defer tc.Close()
	_, err = testenv.TryRoundTrip(tc, "tls")
	return err
}
