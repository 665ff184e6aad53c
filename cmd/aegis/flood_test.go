//go:build linux

package main

// Issue 22, item 2: under an open-file limit of 4,096, neither a UDP flood
// from 5,000 sources nor 1,024 idle TCP connections from one source to a
// TLS stream takes the process's descriptors or a stream's handshake
// slots: the admin API answers, the other streams accept, a TLS client from
// another source completes its handshake, and the counters say what was
// refused and why. The real binary runs under prlimit.

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// The figures the README gives for an open-file limit of 4,096.
const (
	floodLimit        = 4096
	floodNATCap       = 1792 // (4096 - 512) / 2
	floodHSPerSource  = 128  // 1024 / 8
	floodNATPerSource = 224  // 1792 / 8
)

// aegisProc is bin/aegis running in the background.
type aegisProc struct {
	t     *testing.T
	admin string
	out   *bytes.Buffer
	mu    *sync.Mutex
}

// startLimited runs aegis with config under prlimit --nofile=limit and
// waits for its admin endpoint.
func startLimited(t *testing.T, dir string, limit int, config map[string]any) *aegisProc {
	t.Helper()
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("no prlimit (util-linux) to run aegis under a low open-file limit")
	}
	adminPort := testenv.FreePort(t)
	config["admin"] = map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", adminPort)}
	b, err := json.Marshal(config)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	bin := os.Getenv("AEGIS_BIN")
	if bin == "" {
		bin = os.Args[0]
	}
	n := strconv.Itoa(limit)
	cmd := exec.Command(prlimit, "--nofile="+n+":"+n, "--", bin, "run", "--config", path)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), asAegis+"=1", "HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	p := &aegisProc{t: t, admin: fmt.Sprintf("127.0.0.1:%d", adminPort), out: new(bytes.Buffer), mu: new(sync.Mutex)}
	w := &lockedWriter{mu: p.mu, w: p.out}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("aegis output:\n%s", p.output())
		}
	})
	if !testenv.Within(30*time.Second, func() bool { _, err := p.get("/api/v1/streams/stats"); return err == nil }) {
		t.Fatalf("aegis's admin endpoint did not answer within 30s; output:\n%s", p.output())
	}
	return p
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (p *aegisProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

var adminClient = &http.Client{Timeout: 5 * time.Second}

// get GETs path from the admin endpoint.
func (p *aegisProc) get(path string) ([]byte, error) {
	resp, err := adminClient.Get("http://" + p.admin + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return b, err
}

// stats is GET /api/v1/streams/stats by stream id; it fails the test when
// the admin API does not answer.
func (p *aegisProc) stats() map[int64]spec.Status {
	p.t.Helper()
	b, err := p.get("/api/v1/streams/stats")
	if err != nil {
		p.t.Fatalf("the admin API: %v", err)
	}
	var list []spec.Status
	if err := json.Unmarshal(b, &list); err != nil {
		p.t.Fatal(err)
	}
	out := map[int64]spec.Status{}
	for _, s := range list {
		out[s.ID] = s
	}
	return out
}

// metric reads the value of the metric name whose labels include all of
// labels ("k=v") from the admin endpoint's /metrics.
func (p *aegisProc) metric(name string, labels ...string) float64 {
	p.t.Helper()
	b, err := p.get("/metrics")
	if err != nil {
		p.t.Fatalf("the admin endpoint's /metrics: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
lines:
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		for _, l := range labels {
			k, v, _ := strings.Cut(l, "=")
			if !strings.Contains(line, k+`="`+v+`"`) {
				continue lines
			}
		}
		f := strings.Fields(line)
		v, _ := strconv.ParseFloat(f[len(f)-1], 64)
		return v
	}
	p.t.Fatalf("no metric %s with %v", name, labels)
	return 0
}

// alive checks, during a flood, that the admin API answers, the plain
// stream on tcpPort relays and a TLS client from 127.0.0.1 completes its
// handshake on tlsPort.
func alive(t *testing.T, p *aegisProc, tcpPort, tlsPort int, pool *tls.Config) {
	t.Helper()
	start := time.Now()
	p.stats()
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the admin API took %s to answer", took)
	}
	if got := testenv.RoundTrip(t, testenv.Dial(t, tcpPort), "plain"); got != "plain" {
		t.Fatalf("the plain stream: got %q", got)
	}
	d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
	tc, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("127.0.0.1:%d", tlsPort), pool)
	if err != nil {
		t.Fatalf("a TLS client from 127.0.0.1: %v", err)
	}
	defer tc.Close()
	if got := testenv.RoundTrip(t, tc, "tls"); got != "tls" {
		t.Fatalf("the TLS stream: got %q", got)
	}
}

func TestFloodUnderOpenFileLimit(t *testing.T) {
	dir := t.TempDir()
	udpUp := loopback.ServeUDP(t, "127.0.0.1:0", func(*net.UDPConn, []byte, netip.AddrPort) {})
	echo := loopback.Serve(t, "127.0.0.1:0", func(c net.Conn) { _, _ = io.Copy(c, c) })
	cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"flood.test"}})
	udpPort, tcpPort, tlsPort := testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)
	stream := func(id int64, proto string, port, up int, extra map[string]any) map[string]any {
		h := map[string]any{"id": id, "name": fmt.Sprint("flood-", id), "protocol": proto, "listen_address": "127.0.0.1",
			"listen_port": port, "upstream_host": "127.0.0.1", "upstream_port": up}
		for k, v := range extra {
			h[k] = v
		}
		return h
	}
	p := startLimited(t, dir, floodLimit, map[string]any{
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "INFO"}}},
		"apps": map[string]any{
			"tls": map[string]any{"certificates": map[string]any{"load_pem": []any{
				map[string]any{"certificate": cert.ChainPEM, "key": cert.KeyPEM, "tags": []string{"flood"}}}}},
			"streams": map[string]any{
				"storage": map[string]any{"path": filepath.Join(dir, "streams.db")},
				"hosts": []any{
					stream(1, "udp", udpPort, udpUp.Port, nil),
					stream(2, "tcp", tcpPort, echo.Port, nil),
					stream(3, "tcp", tlsPort, echo.Port, map[string]any{"ssl_enabled": true, "ssl_cert_tag": "flood"}),
				},
			},
		},
	})
	tlsClient := &tls.Config{ServerName: "flood.test", RootCAs: cert.Pool()}
	if !testenv.Within(30*time.Second, func() bool {
		st := p.stats()
		return st[1].Listening && st[2].Listening && st[3].Listening
	}) {
		t.Fatalf("the streams did not listen within 30s: %+v", p.stats())
	}
	// The figures at start.
	if out := p.output(); !strings.Contains(out, `"file descriptor budget"`) || !strings.Contains(out, `"open_file_limit":4096`) ||
		!strings.Contains(out, fmt.Sprintf(`"udp_entries_per_stream":%d`, floodNATCap)) {
		t.Errorf("no file descriptor budget for a limit of 4096 in the log")
	}
	alive(t, p, tcpPort, tlsPort, tlsClient)

	// One source, 300 ports: it holds at most its share of the NAT cap.
	const onePorts = 300
	for range onePorts { // each socket open till the end: 300 ports
		if _, err := testenv.DialUDP(t, "127.0.0.10", "127.0.0.1", udpPort).Write([]byte("one")); err != nil {
			t.Fatal(err)
		}
	}
	var one spec.Status
	if !testenv.Within(5*time.Second, func() bool {
		one = p.stats()[1]
		return uint64(one.ActiveConnections)+one.BlockedConnections == onePorts
	}) || one.ActiveConnections != floodNATPerSource ||
		p.metric("aegis_stream_connections_blocked_total", "id=1", "reason=source_share") != onePorts-floodNATPerSource {
		t.Errorf("%d datagrams from 127.0.0.10's ports: %d entries, %d blocked; want %d entries (an eighth of %d), the rest source_share",
			onePorts, one.ActiveConnections, one.BlockedConnections, floodNATPerSource, floodNATCap)
	}

	// 5,000 UDP datagrams from 5,000 sources, as fast as they go.
	const sources = 5000
	var sent, failed atomic.Int64
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range 4 {
		wg.Go(func() {
			to := &syscall.SockaddrInet4{Port: udpPort, Addr: [4]byte{127, 0, 0, 1}}
			for k := int(next.Add(1) - 1); k < sources; k = int(next.Add(1) - 1) {
				from := &syscall.SockaddrInet4{Port: 40000, Addr: [4]byte{127, 21, byte(k / 250), byte(1 + k%250)}}
				fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
				if err != nil {
					failed.Add(1)
					continue
				}
				if syscall.Bind(fd, from) != nil || syscall.Sendto(fd, []byte("flood"), 0, to) != nil {
					failed.Add(1)
				} else {
					sent.Add(1)
				}
				syscall.Close(fd)
			}
		})
	}
	wg.Wait()
	floodTook := time.Since(start)
	if failed.Load() > 0 {
		t.Fatalf("UDP flood: %d sent, %d failed", sent.Load(), failed.Load())
	}
	// Every datagram read: an entry, or a refusal at the cap.
	var st spec.Status
	testenv.Within(10*time.Second, func() bool {
		st = p.stats()[1]
		st.TotalConnections -= uint64(one.ActiveConnections)
		st.BlockedConnections -= one.BlockedConnections
		return st.TotalConnections+st.BlockedConnections >= sources
	})
	// The NAT entries hold their sockets (60 s idle timeout) while the
	// rest of the process goes on.
	alive(t, p, tcpPort, tlsPort, tlsClient)
	natFull := p.metric("aegis_stream_connections_blocked_total", "id=1", "reason=nat_table_full")
	if st.ActiveConnections != floodNATCap || natFull == 0 || float64(st.BlockedConnections) != natFull ||
		st.TotalConnections+st.BlockedConnections > sources {
		t.Errorf("after %d datagrams from %d sources: %d entries (want the default cap %d), %d blocked (%v nat_table_full), %d opened",
			sent.Load(), sources, st.ActiveConnections, floodNATCap, st.BlockedConnections, natFull, st.TotalConnections)
	}
	t.Logf("UDP: one source's %d ports got %d entries (the rest source_share); then %d sources in %s got %d more entries, %d refused nat_table_full, %d lost before the relay read them; %d entries in all (cap %d)",
		onePorts, one.ActiveConnections, sources, floodTook.Round(time.Millisecond), st.TotalConnections, st.BlockedConnections,
		sources-int(st.TotalConnections+st.BlockedConnections), st.ActiveConnections, floodNATCap)

	// 1,024 idle TCP connections from one source to the TLS stream,
	// nothing sent.
	const held = 1024
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 9)}}
	start = time.Now()
	for range held {
		c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", tlsPort))
		if err != nil {
			t.Fatalf("connection %d from 127.0.0.9: %v", len(conns)+1, err)
		}
		conns = append(conns, c)
	}
	holdTook := time.Since(start)
	// Those past the source's share are closed at once.
	var perIP float64
	if !testenv.Within(5*time.Second, func() bool {
		perIP = p.metric("aegis_stream_tls_handshakes_total", "id=3", "outcome=max_handshakes_per_ip")
		return perIP >= held-floodHSPerSource
	}) {
		t.Errorf("%v connections refused max_handshakes_per_ip, want %d", perIP, held-floodHSPerSource)
	}
	alive(t, p, tcpPort, tlsPort, tlsClient)
	closed := 0
	for _, c := range conns {
		_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			closed++
		}
	}
	share := p.metric("aegis_stream_connections_blocked_total", "id=3", "reason=source_share")
	if perIP != held-floodHSPerSource || share != perIP || closed != held-floodHSPerSource {
		t.Errorf("%d idle connections from one source: %v refused max_handshakes_per_ip, %v blocked source_share, %d seen closed; want %d",
			held, perIP, share, closed, held-floodHSPerSource)
	}
	ok := p.metric("aegis_stream_tls_handshakes_total", "id=3", "outcome=ok")
	t.Logf("TLS hold: %d idle connections from 127.0.0.9 opened in %s; %d held a handshake slot, %v closed at once (source_share); %v handshakes from 127.0.0.1 completed meanwhile",
		held, holdTook.Round(time.Millisecond), held-closed, perIP, ok)
}
