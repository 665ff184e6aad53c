package main

// Three aegis processes on one PostgreSQL database (issue 14). Each node
// runs in a network namespace of its own, as on a machine of its own: the
// same stream listens on the same address on every node, and each node has
// its own upstream echo server on 127.0.0.1:echoPort. The nodes reach the
// database over its Unix socket; the test reaches the nodes' admin
// endpoints and streams by dialing from a thread in their namespace.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

var pg *pgtest.Server

const (
	adminAddr = "127.0.0.1:2019" // in each node's namespace
	echoPort  = 9000
	testKey   = "5f1e0c1d2b3a49586776859493a2b1c0d0e0f101112131415161718191a1b1c1"
)

// netns is a network namespace with loopback up, held by a sleeping child.
type netns struct {
	path string
	cmd  *exec.Cmd
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	cmd := exec.Command("unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 900")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Skipf("these tests run each node in a network namespace of its own (unshare -n, as root): %v", err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "up" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Skipf("these tests run each node in a network namespace of its own (unshare -n, as root): %s", stderr.String())
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return &netns{path: fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid), cmd: cmd}
}

// do runs f on a thread in the namespace, and puts the thread back into
// the test's namespace after (a thread that cannot go back ends with f).
// Threads are not let die: the children of the tests get a signal when the
// thread that started them ends.
func (n *netns) do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(home)
		fd, err := unix.Open(n.path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		if err == nil {
			err = f()
		}
		if unix.Setns(home, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func (n *netns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.do(func() error {
		var err error
		c, err = (&net.Dialer{Timeout: 3 * time.Second}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// echo serves an echo server on 127.0.0.1:echoPort in the namespace.
func (n *netns) echo(t *testing.T) {
	t.Helper()
	var ln net.Listener
	if err := n.do(func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(echoPort))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
}

// node is one aegis process of the cluster.
type node struct {
	name string
	ns   *netns
	dir  string
	env  []string
	cfg  string
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	exit error // how it exited, once done is closed
	http *http.Client
}

func newNode(t *testing.T, name, dsn string) *node {
	t.Helper()
	ns := newNetns(t)
	ns.echo(t)
	dir := t.TempDir()
	n := &node{name: name, ns: ns, dir: dir, log: filepath.Join(dir, "aegis.log"), cfg: filepath.Join(dir, "config.json")}
	n.http = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: ns.dial, MaxIdleConnsPerHost: 4}}
	n.env = append(os.Environ(), asAegis+"=1", "HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
		"AEGIS_PG_DSN="+pg.SocketDSN(dsn), "AEGIS_STREAMS_KEY="+testKey)
	b, _ := json.Marshal(map[string]any{
		"admin": map[string]any{"listen": adminAddr},
		"apps": map[string]any{"streams": map[string]any{
			"node_name": name,
			"storage":   map[string]any{"postgres": map[string]any{"dsn": "{env.AEGIS_PG_DSN}"}, "key": "{env.AEGIS_STREAMS_KEY}"},
		}},
	})
	if err := os.WriteFile(n.cfg, b, 0o600); err != nil {
		t.Fatal(err)
	}
	n.start(t)
	t.Cleanup(func() { n.kill(syscall.SIGKILL) })
	return n
}

// start runs the node and waits until its API answers.
func (n *node) start(t *testing.T) {
	t.Helper()
	bin := os.Getenv("AEGIS_BIN")
	if bin == "" {
		bin = os.Args[0]
	}
	out, err := os.OpenFile(n.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command("nsenter", "--net="+n.ns.path, "--", bin, "run", "--config", n.cfg)
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = n.dir, n.env, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { n.exit = cmd.Wait(); close(done) }()
	n.cmd, n.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		if code, _, _ := n.try("GET", "/api/v1/cluster", nil); code == http.StatusOK {
			return
		}
		select {
		case <-done:
			t.Fatalf("node %s exited at start (%v):\n%s", n.name, n.exit, n.output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s: API not up within 30s:\n%s", n.name, n.output())
		}
	}
}

// kill signals the node and waits for it to exit.
func (n *node) kill(sig syscall.Signal) {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(sig)
	select {
	case <-n.done:
	case <-time.After(20 * time.Second):
		n.cmd.Process.Kill()
		<-n.done
	}
	n.cmd = nil
	n.http.CloseIdleConnections()
}

func (n *node) output() string {
	b, _ := os.ReadFile(n.log)
	return string(b)
}

// try sends a request to the node's API.
func (n *node) try(method, path string, body any, hdr ...string) (int, []byte, http.Header) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, "http://"+adminAddr+path, rd)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := n.http.Do(req)
	if err != nil {
		return 0, []byte(err.Error()), nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}

// call is try that fails the test unless the answer has status want.
func (n *node) call(t *testing.T, want int, method, path string, body any, hdr ...string) ([]byte, http.Header) {
	t.Helper()
	code, b, h := n.try(method, path, body, hdr...)
	if code != want {
		t.Fatalf("%s %s on node %s: %d %s; want %d", method, path, n.name, code, b, want)
	}
	return b, h
}

// roundTrip dials port in the node's namespace and echoes msg through it.
func (n *node) roundTrip(port int, msg string) error {
	c, err := n.ns.dial(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = testenv.TryRoundTrip(c, msg)
	return err
}

// waitRelays waits until port relays on every node, and returns how long
// that took.
func waitRelays(t *testing.T, within time.Duration, port int, nodes ...*node) time.Duration {
	t.Helper()
	start := time.Now()
	for _, n := range nodes {
		for n.roundTrip(port, "ping") != nil {
			if time.Since(start) > within {
				t.Fatalf("port %d does not relay on node %s after %v", port, n.name, within)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return time.Since(start)
}

// waitRefused waits until nothing listens on port on every node.
func waitRefused(t *testing.T, within time.Duration, port int, nodes ...*node) {
	t.Helper()
	start := time.Now()
	for _, n := range nodes {
		for {
			c, err := n.ns.dial(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(port))
			if err != nil {
				break
			}
			c.Close()
			if time.Since(start) > within {
				t.Fatalf("port %d still listens on node %s after %v", port, n.name, within)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func streamBody(name string, port int, extra ...any) map[string]any {
	m := map[string]any{"name": name, "listen_address": "127.0.0.1", "listen_port": port,
		"upstream_host": "127.0.0.1", "upstream_port": echoPort, "log_connections": true}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i].(string)] = extra[i+1]
	}
	return m
}

func idOf(t *testing.T, b []byte) int64 {
	t.Helper()
	var v struct {
		ID int64 `json:"id"`
	}
	if err := json.Unmarshal(b, &v); err != nil || v.ID == 0 {
		t.Fatalf("no id in %s", b)
	}
	return v.ID
}

type clusterView struct {
	Node       string        `json:"node"`
	LastChange int64         `json:"last_change"`
	Nodes      []clusterNode `json:"nodes"`
}

type clusterNode struct {
	Name          string            `json:"name"`
	AppliedChange int64             `json:"applied_change"`
	Lag           int64             `json:"lag"`
	Status        string            `json:"status"`
	Streams       []json.RawMessage `json:"streams"`
}

func (n *node) cluster(t *testing.T) clusterView {
	t.Helper()
	b, _ := n.call(t, http.StatusOK, "GET", "/api/v1/cluster", nil)
	var v clusterView
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("cluster view %s: %v", b, err)
	}
	return v
}

// versions is every stored stream's id and version on the node.
func (n *node) versions(t *testing.T) string {
	t.Helper()
	b, _ := n.call(t, http.StatusOK, "GET", "/api/v1/streams", nil)
	var list []struct {
		ID      int64  `json:"id"`
		Version string `json:"version"`
		Port    int    `json:"listen_port"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range list {
		out = append(out, fmt.Sprintf("%d@%s:%d", s.ID, s.Version, s.Port))
	}
	return strings.Join(out, " ")
}

// clusterTotals is a stream row's status.cluster.
type clusterTotals struct {
	Nodes    int    `json:"nodes"`
	Active   int64  `json:"active_connections"`
	Total    uint64 `json:"total_connections"`
	Blocked  uint64 `json:"blocked_connections"`
	Sent     uint64 `json:"bytes_sent"`
	Received uint64 `json:"bytes_received"`
}

type streamRow struct {
	Status struct {
		clusterTotals
		Cluster *clusterTotals `json:"cluster"`
	} `json:"status"`
}

// stream is stream id as the node's GET /api/v1/streams/{id} answers it.
func (n *node) stream(t *testing.T, id int64) streamRow {
	t.Helper()
	b, _ := n.call(t, http.StatusOK, "GET", fmt.Sprintf("/api/v1/streams/%d", id), nil)
	var row streamRow
	if err := json.Unmarshal(b, &row); err != nil {
		t.Fatal(err)
	}
	return row
}

// waitSame waits until every node has the same streams and versions as
// nodes[0].
func waitSame(t *testing.T, within time.Duration, nodes ...*node) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		want := nodes[0].versions(t)
		same := true
		for _, n := range nodes[1:] {
			if got := n.versions(t); got != want {
				same = false
				if time.Now().After(deadline) {
					t.Fatalf("node %s has %s; node %s has %s", n.name, got, nodes[0].name, want)
				}
			}
		}
		if same {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCluster runs three nodes on one database through edits, conflicts,
// a database outage and a node killed during writes.
func TestCluster(t *testing.T) {
	dsn := pg.NewDatabase(t)
	a := newNode(t, "a", dsn)
	b := newNode(t, "b", dsn)
	c := newNode(t, "c", dsn)
	all := []*node{a, b, c}

	// A stream created on A relays on B and C within 1 s.
	body, _ := a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("web", 7000))
	id := idOf(t, body)
	took := waitRelays(t, time.Second, 7000, b, c)
	t.Logf("a stream created on node a relays on b and c after %v", took)

	t.Run("edits propagate, sockets kept", func(t *testing.T) {
		// An open connection on C lives through every edit; the edits keep
		// the address, so C keeps its sockets.
		open, err := c.ns.dial(context.Background(), "tcp", "127.0.0.1:7000")
		if err != nil {
			t.Fatal(err)
		}
		defer open.Close()
		var delays []time.Duration
		const edits = 200
		for i := range edits {
			_, h := a.call(t, http.StatusOK, "PATCH", fmt.Sprintf("/api/v1/streams/%d", id), map[string]any{"notes": fmt.Sprintf("edit %d", i)})
			etag := h.Get("ETag")
			start := time.Now()
			for _, n := range []*node{b, c} {
				for {
					_, h := n.call(t, http.StatusOK, "GET", fmt.Sprintf("/api/v1/streams/%d", id), nil)
					if h.Get("ETag") == etag {
						break
					}
					if time.Since(start) > 5*time.Second {
						t.Fatalf("edit %d: node %s still has %s, not %s", i, n.name, h.Get("ETag"), etag)
					}
					time.Sleep(time.Millisecond)
				}
			}
			delays = append(delays, time.Since(start))
		}
		slices.Sort(delays)
		p50, p99 := delays[len(delays)/2], delays[len(delays)*99/100]
		t.Logf("propagation of an edit on node a to nodes b and c, over %d edits: p50 %v, p99 %v, max %v", edits, p50, p99, delays[len(delays)-1])
		if p99 > time.Second {
			t.Errorf("p99 propagation %v, want at most 1s", p99)
		}
		if got, err := testenv.TryRoundTrip(open, "still there"); err != nil || got != "still there" {
			t.Fatalf("the connection open on node c through the edits: %q, %v", got, err)
		}
	})

	t.Run("updated on B, deleted on C", func(t *testing.T) {
		b.call(t, http.StatusOK, "PATCH", fmt.Sprintf("/api/v1/streams/%d", id), map[string]any{"listen_port": 7001})
		waitRelays(t, time.Second, 7001, a, c)
		waitRefused(t, time.Second, 7000, a, b, c)
		c.call(t, http.StatusNoContent, "DELETE", fmt.Sprintf("/api/v1/streams/%d", id), nil)
		waitRefused(t, time.Second, 7001, a, b, c)
		for _, n := range all {
			for n.versions(t) != "" {
				time.Sleep(10 * time.Millisecond)
			}
		}
	})

	t.Run("stale If-Match on B after an edit on A", func(t *testing.T) {
		body, h := a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("db", 7010))
		sid := idOf(t, body)
		waitSame(t, 2*time.Second, all...)
		path := fmt.Sprintf("/api/v1/streams/%d", sid)
		_, hb := b.call(t, http.StatusOK, "GET", path, nil)
		if hb.Get("ETag") != h.Get("ETag") {
			t.Fatalf("ETag on b %s, on a %s", hb.Get("ETag"), h.Get("ETag"))
		}
		a.call(t, http.StatusOK, "PATCH", path, map[string]any{"notes": "from a"})
		// At once, before B has been told: B's write is stale in the
		// database, B applies A's edit and the version check fails.
		body, _ = b.call(t, http.StatusPreconditionFailed, "PATCH", path, map[string]any{"notes": "from b"}, "If-Match", hb.Get("ETag"))
		t.Logf("stale If-Match on b: %s", body)
		body, _ = a.call(t, http.StatusOK, "GET", path, nil)
		if !strings.Contains(string(body), `"from a"`) {
			t.Fatalf("after the refused write: %s", body)
		}
		// At the same time: B's write with the version both loaded wins
		// (and comes first) or gets 412, whichever order the database took.
		for round := range 10 {
			waitSame(t, 2*time.Second, a, b)
			_, h := b.call(t, http.StatusOK, "GET", path, nil)
			loaded := h.Get("ETag")
			var wg sync.WaitGroup
			var codeA, codeB int
			var bodyB []byte
			var hA, hB http.Header
			wg.Go(func() { codeA, _, hA = a.try("PATCH", path, map[string]any{"notes": fmt.Sprintf("a %d", round)}) })
			wg.Go(func() {
				codeB, bodyB, hB = b.try("PATCH", path, map[string]any{"notes": fmt.Sprintf("b %d", round)}, "If-Match", loaded)
			})
			wg.Wait()
			if codeA != http.StatusOK {
				t.Fatalf("round %d: a's write: %d", round, codeA)
			}
			switch codeB {
			case http.StatusPreconditionFailed:
			case http.StatusOK:
				va, _ := strconv.ParseInt(strings.Trim(hA.Get("ETag"), `"`), 10, 64)
				vb, _ := strconv.ParseInt(strings.Trim(hB.Get("ETag"), `"`), 10, 64)
				if vb >= va {
					t.Fatalf("round %d: b's write with the loaded version %s won after a's: versions %d, %d", round, loaded, vb, va)
				}
			default:
				t.Fatalf("round %d: b's write: %d %s", round, codeB, bodyB)
			}
		}
	})

	t.Run("simultaneous creates of one port", func(t *testing.T) {
		for round := range 5 {
			port := 7100 + round
			var wg sync.WaitGroup
			codes := make([]int, 2)
			bodies := make([][]byte, 2)
			gate := make(chan struct{})
			for i, n := range []*node{a, b} {
				wg.Go(func() {
					<-gate
					codes[i], bodies[i], _ = n.try("POST", "/api/v1/streams", streamBody(fmt.Sprintf("race %d %s", round, n.name), port))
				})
			}
			close(gate)
			wg.Wait()
			ok, refused := slices.Index(codes, http.StatusCreated), slices.Index(codes, http.StatusBadRequest)
			if ok < 0 || refused < 0 {
				t.Fatalf("round %d: answers %v: %s / %s; want one 201 and one 400", round, codes, bodies[0], bodies[1])
			}
			if !strings.Contains(string(bodies[refused]), `"listen_port"`) || !strings.Contains(string(bodies[refused]), strconv.Itoa(port)) {
				t.Fatalf("round %d: the refusal does not name the port: %s", round, bodies[refused])
			}
		}
		waitSame(t, 2*time.Second, all...)
	})

	t.Run("certificate uploaded on A terminates TLS on C", func(t *testing.T) {
		cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"web.example"}})
		body, _ := a.call(t, http.StatusCreated, "POST", "/api/v1/certificates",
			map[string]any{"name": "web", "certificate": cert.CertPEM, "private_key": cert.KeyPEM})
		certID := idOf(t, body)
		a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("tls", 7200, "ssl_enabled", true, "ssl_cert_id", certID))
		deadline := time.Now().Add(2 * time.Second)
		for {
			err := func() error {
				raw, err := c.ns.dial(context.Background(), "tcp", "127.0.0.1:7200")
				if err != nil {
					return err
				}
				tc := tls.Client(raw, &tls.Config{ServerName: "web.example", RootCAs: cert.Pool()})
				defer tc.Close()
				tc.SetDeadline(time.Now().Add(2 * time.Second))
				if err := tc.Handshake(); err != nil {
					return err
				}
				_, err = testenv.TryRoundTrip(tc, "over tls")
				return err
			}()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("TLS through node c: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})

	t.Run("connection log rows of all nodes", func(t *testing.T) {
		body, _ := a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("logged", 7300))
		sid := idOf(t, body)
		waitRelays(t, 2*time.Second, 7300, all...)
		path := fmt.Sprintf("/api/v1/streams/%d/connections", sid)
		deadline := time.Now().Add(5 * time.Second)
		for {
			body, _ := a.call(t, http.StatusOK, "GET", path, nil)
			var page struct {
				Entries []struct {
					Node string `json:"node"`
				} `json:"entries"`
			}
			json.Unmarshal(body, &page)
			seen := map[string]bool{}
			for _, e := range page.Entries {
				seen[e.Node] = true
			}
			if seen["a"] && seen["b"] && seen["c"] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("connection log on node a: %s; want entries of nodes a, b and c", body)
			}
			time.Sleep(50 * time.Millisecond)
		}
		body, _ = c.call(t, http.StatusOK, "GET", path+"?node=b", nil)
		if strings.Contains(string(body), `"node":"a"`) || strings.Contains(string(body), `"node":"c"`) || !strings.Contains(string(body), `"node":"b"`) {
			t.Fatalf("node=b: %s", body)
		}
		// Other nodes' rows come from their heartbeats, every 2 s.
		deadline = time.Now().Add(10 * time.Second)
		for {
			body, _ := b.call(t, http.StatusOK, "GET", "/api/v1/streams/stats?node=all", nil)
			missing := slices.IndexFunc(all, func(n *node) bool { return !strings.Contains(string(body), `"node":"`+n.name+`"`) })
			v := a.cluster(t)
			bad := len(v.Nodes) != 3 || slices.ContainsFunc(v.Nodes, func(n clusterNode) bool { return n.Status != "up" || len(n.Streams) == 0 })
			if missing < 0 && !bad {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("stats?node=all: %s\ncluster view: %+v", body, v)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// The stream's row on any node sums every node's counters, from
		// their heartbeats; each node's own fields stay its own.
		deadline = time.Now().Add(10 * time.Second)
		for {
			var sum clusterTotals
			for _, n := range all {
				own := n.stream(t, sid).Status
				sum.Nodes++
				sum.Total += own.Total
				sum.Sent += own.Sent
				sum.Received += own.Received
			}
			row := b.stream(t, sid).Status
			if row.Cluster != nil && *row.Cluster == sum && sum.Total >= 3 && row.Total < sum.Total {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("stream %d on node b: %+v, cluster %+v; the nodes' own counters sum to %+v", sid, row, row.Cluster, sum)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})

	t.Run("database down", func(t *testing.T) {
		body, _ := a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("outage", 7400))
		sid := idOf(t, body)
		waitRelays(t, 2*time.Second, 7400, all...)
		waitSame(t, 2*time.Second, all...)
		open, err := b.ns.dial(context.Background(), "tcp", "127.0.0.1:7400")
		if err != nil {
			t.Fatal(err)
		}
		defer open.Close()
		testenv.RoundTrip(t, open, "before")
		logPath := fmt.Sprintf("/api/v1/streams/%d/connections?node=a&limit=1000", sid)
		logged := func() int {
			body, _ := a.call(t, http.StatusOK, "GET", logPath, nil)
			return strings.Count(string(body), `"node":"a"`)
		}
		if !testenv.Within(5*time.Second, func() bool { return logged() > 0 }) {
			t.Fatal("no log entry of node a's connection")
		}
		before := logged()
		certs, _ := a.call(t, http.StatusOK, "GET", "/api/v1/certificates", nil)

		pg.Stop()
		restarted := false
		defer func() {
			if !restarted {
				pg.Start()
			}
		}()
		waitRelays(t, time.Second, 7400, all...)
		if got, err := testenv.TryRoundTrip(open, "during"); err != nil || got != "during" {
			t.Fatalf("open connection while the database is down: %q, %v", got, err)
		}
		code, body, _ := a.try("POST", "/api/v1/streams", streamBody("refused", 7401))
		if code != http.StatusServiceUnavailable || !strings.Contains(string(body), "PostgreSQL at") ||
			!strings.Contains(string(body), "unreachable") || !strings.Contains(string(body), "nothing was changed") {
			t.Fatalf("write while the database is down: %d %s", code, body)
		}
		t.Logf("write while the database is down: %d %s", code, body)
		code, body, _ = b.try("PATCH", fmt.Sprintf("/api/v1/streams/%d", sid), map[string]any{"notes": "x"})
		if code != http.StatusServiceUnavailable {
			t.Fatalf("PATCH while the database is down: %d %s", code, body)
		}
		a.call(t, http.StatusOK, "GET", "/api/v1/streams", nil)
		a.call(t, http.StatusOK, "GET", fmt.Sprintf("/api/v1/streams/%d", sid), nil)
		if body, _ := a.call(t, http.StatusOK, "GET", "/api/v1/certificates", nil); string(body) != string(certs) {
			t.Fatalf("certificates while the database is down: %s; before: %s", body, certs)
		}
		// Connections while the database is down: their log entries wait
		// on node a, and are stored once it is back.
		for range 3 {
			if err := a.roundTrip(7400, "logged later"); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Second) // the log writer tries them while the database is down

		// C restarts meanwhile: it serves its snapshot and says so.
		c.kill(syscall.SIGTERM)
		c.start(t)
		if !strings.Contains(c.output(), "starts from its local snapshot") {
			t.Fatalf("node c's log does not say it runs from its snapshot:\n%s", c.output())
		}
		if v := c.cluster(t); len(v.Nodes) != 1 || v.Nodes[0].Status != "snapshot" {
			t.Fatalf("cluster view of node c while it runs from its snapshot: %+v", v)
		}
		waitRelays(t, time.Second, 7400, c)

		if err := pg.Start(); err != nil {
			t.Fatal(err)
		}
		restarted = true
		start := time.Now()
		for {
			code, body, _ := a.try("POST", "/api/v1/streams", streamBody("after", 7402))
			if code == http.StatusCreated {
				break
			}
			if time.Since(start) > 20*time.Second {
				t.Fatalf("write after the database came back: %d %s", code, body)
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("first write accepted %v after the database came back", time.Since(start))
		waitRelays(t, 10*time.Second, 7402, all...)
		waitSame(t, 5*time.Second, all...)
		if !testenv.Within(5*time.Second, func() bool { return logged() >= before+3 }) {
			t.Fatalf("%d log entries of node a after the outage, want %d", logged(), before+3)
		}
		for time.Since(start) < 20*time.Second {
			if v := c.cluster(t); len(v.Nodes) == 3 && !slices.ContainsFunc(v.Nodes, func(n clusterNode) bool {
				return n.Status != "up" || n.Lag != 0
			}) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("cluster view of node c after the outage: %+v", c.cluster(t))
	})

	t.Run("kill -9 of a node during writes", func(t *testing.T) {
		body, _ := a.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("busy a", 7500))
		ida := idOf(t, body)
		body, _ = b.call(t, http.StatusCreated, "POST", "/api/v1/streams", streamBody("busy b", 7501))
		idb := idOf(t, body)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var aFailures []string
		var mu sync.Mutex
		for _, w := range []struct {
			n  *node
			id int64
		}{{a, ida}, {b, idb}} {
			wg.Go(func() {
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					code, body, _ := w.n.try("PATCH", fmt.Sprintf("/api/v1/streams/%d", w.id), map[string]any{"notes": fmt.Sprintf("write %d", i)})
					if w.n == a && code != http.StatusOK {
						mu.Lock()
						aFailures = append(aFailures, fmt.Sprintf("%d %s", code, body))
						mu.Unlock()
					}
				}
			})
		}
		time.Sleep(500 * time.Millisecond)
		b.kill(syscall.SIGKILL)
		time.Sleep(time.Second)
		close(stop)
		wg.Wait()
		if len(aFailures) > 0 {
			t.Fatalf("writes on node a while node b was killed: %v", aFailures)
		}
		waitSame(t, 2*time.Second, a, c)
		waitRelays(t, time.Second, 7501, a, c)
		// B misses its heartbeats: stale after three.
		if !testenv.Within(10*time.Second, func() bool {
			v := a.cluster(t)
			i := slices.IndexFunc(v.Nodes, func(n clusterNode) bool { return n.Name == "b" })
			return i >= 0 && v.Nodes[i].Status == "stale"
		}) {
			t.Fatalf("node b is not stale in node a's view: %+v", a.cluster(t))
		}
		if row := a.stream(t, idb).Status; row.Cluster == nil || row.Cluster.Nodes != 2 {
			t.Fatalf("stream %d on node a while node b is stale: cluster %+v; want 2 nodes", idb, row.Cluster)
		}
		start := time.Now()
		b.start(t)
		waitSame(t, 5*time.Second, a, b, c)
		t.Logf("node b restarted and caught up in %v", time.Since(start))
	})
}
