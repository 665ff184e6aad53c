package main

// aegis-bench -cluster (make bench-cluster): three bin/aegis nodes on one
// PostgreSQL (internal/pgserver), each with its admin endpoint on a port
// of its own on 127.0.0.1, and one more node on SQLite. It measures how
// fast an edit made through one node's API shows on the other two, API
// writes per second on PostgreSQL and on SQLite, and how long a node
// takes to catch up with changes made while it was stopped (or paused).
//
// The edited stream is disabled: the three nodes share one machine and
// would otherwise contend for its port. An edit of it goes through the
// same path on every node (store, notify, follow, apply) except binding
// sockets, which an in-place edit does not do either.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/pgserver"
)

// clusterCounts are how much each measurement does.
type clusterCounts struct {
	edits   int // edits whose propagation is timed
	changes int // writes of the write loop, which the catch-ups apply
}

// clusterFull are the counts of make bench-cluster.
var clusterFull = clusterCounts{edits: 200, changes: 1000}

// clusterKey seals private keys; every node of the bench has it.
const clusterKey = "6c1d0e2f3a4b5c6d7e8f901a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e"

// clusterResult is what runCluster measured.
type clusterResult struct {
	pgAddr      string
	prop        []time.Duration // sorted
	pgWrites    float64         // per second
	sqlWrites   float64         // per second
	lastChange  int64
	restart     time.Duration // node c: from its start until it applied lastChange
	restartAPI  time.Duration // node c: from its start until its API answered
	resume      time.Duration // node b: from SIGCONT until it applied lastChange
	loadAverage string
}

// clusterNode is one bin/aegis of the bench.
type clusterNode struct {
	*aegisAPI
	name string
	dir  string
	bin  string
	cfg  string
	env  []string
	c    *child
	runs int
}

// startClusterNode writes node name's config (storage: the PostgreSQL of
// dsn, or SQLite in its dir when dsn is "") and starts it.
func startClusterNode(bin, tmp, name, dsn string, timeout time.Duration) (*clusterNode, error) {
	admin, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	n := &clusterNode{aegisAPI: newAegisAPI(admin[0]), name: name, dir: filepath.Join(tmp, name), bin: bin}
	if err := os.Mkdir(n.dir, 0o755); err != nil {
		return nil, err
	}
	storage := map[string]any{"path": filepath.Join(n.dir, "streams.db")}
	if dsn != "" {
		storage = map[string]any{"postgres": map[string]any{"dsn": dsn}, "key": clusterKey}
	}
	b, err := json.MarshalIndent(map[string]any{
		"admin": map[string]any{"listen": addr(admin[0])},
		"apps":  map[string]any{"streams": map[string]any{"node_name": name, "storage": storage}},
	}, "", "  ")
	if err != nil {
		return nil, err
	}
	n.cfg = filepath.Join(n.dir, "aegis.json")
	if err := os.WriteFile(n.cfg, b, 0o600); err != nil {
		return nil, err
	}
	n.env = []string{"XDG_CONFIG_HOME=" + n.dir, "XDG_DATA_HOME=" + n.dir, "HOME=" + n.dir}
	if err := n.start(timeout); err != nil {
		return nil, err
	}
	return n, nil
}

// start runs the node and waits until its API answers.
func (n *clusterNode) start(timeout time.Duration) error {
	n.runs++
	name := n.name
	if n.runs > 1 {
		name = fmt.Sprintf("%s-run%d", n.name, n.runs) // its own output file
	}
	c, err := startChild(setup{name: name, dir: n.dir}, n.env, n.bin, "run", "--config", n.cfg)
	if err != nil {
		return err
	}
	n.c = c
	if err := waitReady(c, timeout, func() error { return n.call("GET", "/api/v1/cluster", nil, http.StatusOK, nil) }); err != nil {
		c.stop()
		n.c = nil
		return fmt.Errorf("node %s: %v", n.name, err)
	}
	return nil
}

func (n *clusterNode) stop() {
	if n.c != nil {
		n.signal(syscall.SIGCONT) // a paused node cannot end
		n.c.stop()
		n.c = nil
	}
}

func (n *clusterNode) signal(sig syscall.Signal) error {
	if n.c == nil {
		return fmt.Errorf("node %s is not running", n.name)
	}
	return n.c.cmd.Process.Signal(sig)
}

// version is stream id's version on the node.
func (n *clusterNode) version(id int64) (string, error) {
	var h struct {
		Version string `json:"version"`
	}
	err := n.call("GET", fmt.Sprintf("/api/v1/streams/%d", id), nil, http.StatusOK, &h)
	return h.Version, err
}

// applied is the node's applied_change and the newest change, as its
// GET /api/v1/cluster shows them.
func (n *clusterNode) applied() (applied, last int64, err error) {
	var v struct {
		Node       string `json:"node"`
		LastChange int64  `json:"last_change"`
		Nodes      []struct {
			Name          string `json:"name"`
			AppliedChange int64  `json:"applied_change"`
		} `json:"nodes"`
	}
	if err := n.call("GET", "/api/v1/cluster", nil, http.StatusOK, &v); err != nil {
		return 0, 0, err
	}
	for _, x := range v.Nodes {
		if x.Name == v.Node {
			return x.AppliedChange, v.LastChange, nil
		}
	}
	return 0, 0, fmt.Errorf("node %s is not in its own cluster view", n.name)
}

// waitApplied waits until the node has applied change last, and returns
// how long that took from since.
func (n *clusterNode) waitApplied(last int64, since time.Time, timeout time.Duration) (time.Duration, error) {
	for {
		got, _, err := n.applied()
		if err == nil && got >= last {
			return time.Since(since), nil
		}
		if time.Since(since) > timeout {
			return 0, fmt.Errorf("node %s applied change %d of %d after %v (%v)", n.name, got, last, timeout, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// createDisabled creates a disabled stream on the node and returns its id.
func (n *clusterNode) createDisabled(name string) (int64, error) {
	port, err := freePorts(1)
	if err != nil {
		return 0, err
	}
	var h struct {
		ID int64 `json:"id"`
	}
	err = n.call("POST", "/api/v1/streams", map[string]any{"name": name, "enabled": false,
		"listen_address": "127.0.0.1", "listen_port": port[0], "upstream_host": "127.0.0.1", "upstream_port": port[0]},
		http.StatusCreated, &h)
	return h.ID, err
}

// edit changes stream id's notes and returns its new version.
func (n *clusterNode) edit(id int64, notes string) (string, error) {
	var h struct {
		Version string `json:"version"`
	}
	err := n.call("PATCH", fmt.Sprintf("/api/v1/streams/%d", id), map[string]any{"notes": notes}, http.StatusOK, &h)
	return h.Version, err
}

// writeLoop edits stream id count times, one after another, and returns
// the writes per second.
func (n *clusterNode) writeLoop(id int64, count int) (float64, error) {
	start := time.Now()
	for i := range count {
		if _, err := n.edit(id, fmt.Sprintf("write %d", i)); err != nil {
			return 0, err
		}
	}
	return float64(count) / time.Since(start).Seconds(), nil
}

// runCluster starts PostgreSQL and the nodes in tmp, measures, and stops
// them. progress gets a line before each step.
func runCluster(bin, tmp string, n clusterCounts, timeout time.Duration, progress func(string)) (r clusterResult, err error) {
	if b, _ := os.ReadFile("/proc/loadavg"); len(strings.Fields(string(b))) > 0 {
		r.loadAverage = strings.Fields(string(b))[0]
	}
	progress("starting PostgreSQL")
	pg, err := pgserver.New()
	if err != nil {
		return r, fmt.Errorf("starting PostgreSQL: %w", err)
	}
	defer pg.Close()
	r.pgAddr = pg.Addr()
	dsn, err := pg.CreateDatabase("aegis_bench")
	if err != nil {
		return r, err
	}
	var nodes []*clusterNode
	defer func() {
		for _, x := range nodes {
			x.stop()
		}
	}()
	for _, name := range []string{"a", "b", "c"} {
		progress("starting node " + name)
		x, err := startClusterNode(bin, tmp, name, dsn, timeout)
		if err != nil {
			return r, err
		}
		nodes = append(nodes, x)
	}
	a, b, c := nodes[0], nodes[1], nodes[2]

	// Propagation: an edit on a, then b's and c's API until both show it.
	progress(fmt.Sprintf("propagation, %d edits", n.edits))
	id, err := a.createDisabled("propagation")
	if err != nil {
		return r, err
	}
	for i := range n.edits {
		v, err := a.edit(id, fmt.Sprintf("edit %d", i))
		if err != nil {
			return r, err
		}
		start := time.Now()
		for _, x := range []*clusterNode{b, c} {
			for {
				got, err := x.version(id)
				if err == nil && got == v {
					break
				}
				if time.Since(start) > timeout {
					return r, fmt.Errorf("edit %d: node %s shows version %q (%v), not %q, after %v", i, x.name, got, err, v, timeout)
				}
				time.Sleep(time.Millisecond)
			}
		}
		r.prop = append(r.prop, time.Since(start))
	}
	slices.Sort(r.prop)

	// The write loop on a alone: b paused (it applies nothing until it
	// resumes), c stopped.
	progress(fmt.Sprintf("PostgreSQL write loop, %d writes; node b paused, node c stopped", n.changes))
	if err := b.signal(syscall.SIGSTOP); err != nil {
		return r, err
	}
	c.stop()
	if r.pgWrites, err = a.writeLoop(id, n.changes); err != nil {
		return r, err
	}
	if _, r.lastChange, err = a.applied(); err != nil {
		return r, err
	}

	progress("node c restarts and catches up")
	start := time.Now()
	if err := c.start(timeout); err != nil {
		return r, err
	}
	r.restartAPI = time.Since(start)
	if r.restart, err = c.waitApplied(r.lastChange, start, timeout); err != nil {
		return r, err
	}
	progress("node b resumes and catches up")
	start = time.Now()
	if err := b.signal(syscall.SIGCONT); err != nil {
		return r, err
	}
	if r.resume, err = b.waitApplied(r.lastChange, start, timeout); err != nil {
		return r, err
	}
	for _, x := range nodes {
		x.stop()
	}
	nodes = nil

	progress(fmt.Sprintf("SQLite write loop, %d writes", n.changes))
	s, err := startClusterNode(bin, tmp, "sqlite", "", timeout)
	if err != nil {
		return r, err
	}
	nodes = append(nodes, s)
	sid, err := s.createDisabled("writes")
	if err != nil {
		return r, err
	}
	if r.sqlWrites, err = s.writeLoop(sid, n.changes); err != nil {
		return r, err
	}
	if len(r.prop) == 0 || r.pgWrites <= 0 || r.sqlWrites <= 0 {
		return r, errors.New("nothing was measured")
	}
	return r, nil
}

// report is the result as make bench-cluster prints it.
func (r clusterResult) report(n clusterCounts) string {
	var b strings.Builder
	fmt.Fprintf(&b, "aegis-bench -cluster: 3 nodes of bin/aegis on one PostgreSQL (%s), each its own admin endpoint on 127.0.0.1; load average at start: %s\n\n",
		r.pgAddr, r.loadAverage)
	fmt.Fprintf(&b, "propagation of an edit through node a's API to nodes b and c (until both APIs show its version), %s:\n", plural(n.edits, "edit"))
	fmt.Fprintf(&b, "  p50 %v   p99 %v   max %v\n\n", roundMs(percentile(r.prop, 50)), roundMs(percentile(r.prop, 99)), roundMs(r.prop[len(r.prop)-1]))
	fmt.Fprintf(&b, "API writes per second (PATCH of one stream, one client, one after another), %s each:\n", plural(n.changes, "write"))
	fmt.Fprintf(&b, "  PostgreSQL  %6.0f/s  (node a; node b paused, node c stopped)\n", r.pgWrites)
	fmt.Fprintf(&b, "  SQLite      %6.0f/s  (one node)\n", r.sqlWrites)
	fmt.Fprintf(&b, "  PostgreSQL / SQLite: %.2f\n\n", r.pgWrites/r.sqlWrites)
	fmt.Fprintf(&b, "catch-up with those %s (until the node's applied_change in its GET /api/v1/cluster reaches change %d):\n", plural(n.changes, "change"), r.lastChange)
	fmt.Fprintf(&b, "  node c, stopped during them, restarted:  %v from its start (its API answered after %v; a starting node loads the streams as stored)\n",
		roundMs(r.restart), roundMs(r.restartAPI))
	fmt.Fprintf(&b, "  node b, paused (SIGSTOP) during them:    %v from SIGCONT (it applies them one by one, as notified)\n", roundMs(r.resume))
	return b.String()
}

func roundMs(d time.Duration) time.Duration {
	if d < 10*time.Millisecond {
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Millisecond)
}

// clusterMain is aegis-bench -cluster.
func clusterMain(cfg config) int {
	tmp, cleanup, err := workDir(cfg, "aegis-bench-cluster-", "stopped")
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench:", err)
		return 1
	}
	defer cleanup()
	bin, err := lookBinary(cfg.aegis)
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench:", err)
		return 1
	}
	start := time.Now()
	r, err := runCluster(bin, tmp, clusterFull, max(cfg.startTimeout, 30*time.Second), func(s string) {
		fmt.Fprintln(os.Stderr, "cluster:", s)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench: cluster:", err)
		return 1
	}
	fmt.Print(r.report(clusterFull))
	fmt.Printf("\nrun took %v\n", time.Since(start).Round(time.Second))
	return 0
}
