package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/template"
	"time"
)

// The TLS test: each proxy terminates TLS on its three front ports with
// the same certificate and relays plain TCP to the same upstreams as in the
// TCP test. The rates are full handshakes per second and bulk throughput.

// --- configs ---

// The proxies are held to the work that Aegis (Go's crypto/tls) does with
// the bench's clients: TLS 1.2 or 1.3, X25519, AES-128-GCM.
const (
	tlsCiphersuites = "TLS_AES_128_GCM_SHA256"        // TLS 1.3
	tlsCiphers      = "ECDHE-ECDSA-AES128-GCM-SHA256" // TLS 1.2, tls12Suite
	tlsCurves       = "X25519"                        // tlsGroups[0]
)

// haproxyTLSTmpl is haproxyTmpl with "ssl crt" on each bind. HAProxy's
// session cache and tickets keep their defaults: the clients keep no
// session, so no handshake can resume one.
var haproxyTLSTmpl = template.Must(template.New("haproxy-tls").Parse(`global
    nbthread 1
    maxconn 9000
    log stdout format raw local0
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-bind-ciphersuites ` + tlsCiphersuites + `
    ssl-default-bind-ciphers ` + tlsCiphers + `
    ssl-default-bind-curves ` + tlsCurves + `

defaults
    mode tcp
    log global
    option tcplog
    maxconn 9000
    timeout connect 10s
    timeout client 1h
    timeout server 1h
{{range .Routes}}{{if not .UDP}}
frontend fe_{{.Kind}}
    bind 127.0.0.1:{{.Front}} ssl crt {{$.PEM}}
    tcp-request connection reject if !{ src 127.0.0.0/8 }
    default_backend be_{{.Kind}}

backend be_{{.Kind}}
    server up 127.0.0.1:{{.Up}}
{{end}}{{end}}`))

func haproxyTLSConfig(pem string, up, front ports) (string, error) {
	var b bytes.Buffer
	err := haproxyTLSTmpl.Execute(&b, map[string]any{"PEM": pem, "Routes": routes(up, front)})
	return b.String(), err
}

// nginxTLSTmpl is nginxTmpl's TCP part with "ssl" on each listen. The one
// PEM file holds the chain and the key. Session tickets and the session
// cache keep their defaults, as for HAProxy.
var nginxTLSTmpl = template.Must(template.New("nginx-tls").Parse(`load_module {{.Module}};
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
master_process on;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/nginx-error.log warn;

events {
    worker_connections 10000;
}

stream {
    log_format bench '$remote_addr [$time_local] $protocol $status '
                     '$bytes_sent $bytes_received $session_time "$upstream_addr"';
    access_log {{.Dir}}/nginx-access.log bench;
    ssl_certificate {{.PEM}};
    ssl_certificate_key {{.PEM}};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers ` + tlsCiphers + `;
    ssl_conf_command Ciphersuites ` + tlsCiphersuites + `;
    ssl_ecdh_curve ` + tlsCurves + `;
{{range .Routes}}{{if not .UDP}}
    server {
        listen 127.0.0.1:{{.Front}} ssl;
        allow 127.0.0.0/8;
        deny all;
        proxy_connect_timeout 10s;
        proxy_timeout 1h;
        proxy_pass 127.0.0.1:{{.Up}};
    }
{{end}}{{end}}}
`))

func nginxTLSConfig(dir, module, pem string, up, front ports) (string, error) {
	var b bytes.Buffer
	err := nginxTLSTmpl.Execute(&b, map[string]any{"Dir": dir, "Module": module, "PEM": pem, "Routes": routes(up, front)})
	return b.String(), err
}

// writePEM writes the certificate chain and key as one file in s.dir.
func writePEM(s setup) (string, error) {
	file := filepath.Join(s.dir, "bench.pem")
	return file, os.WriteFile(file, []byte(s.cert.combinedPEM()), 0o600)
}

func startHAProxyTLS(s setup) (*child, error) {
	pem, err := writePEM(s)
	if err != nil {
		return nil, err
	}
	cfg, err := haproxyTLSConfig(pem, s.up, s.front)
	if err != nil {
		return nil, err
	}
	return launchHAProxy(s, cfg)
}

func startNginxTLS(s setup) (*child, error) {
	if _, err := os.Stat(nginxModule); err != nil {
		return nil, fmt.Errorf("no stream module (apt-get install libnginx-mod-stream): %v", err)
	}
	pem, err := writePEM(s)
	if err != nil {
		return nil, err
	}
	cfg, err := nginxTLSConfig(s.dir, nginxModule, pem, s.up, s.front)
	if err != nil {
		return nil, err
	}
	file := filepath.Join(s.dir, "nginx.conf")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	return startChild(s, nil, s.binary, "-p", s.dir, "-e", filepath.Join(s.dir, "nginx-error.log"), "-c", file)
}

// --- load ---

// hsStats is what a handshake run counted.
type hsStats struct {
	ok      counted // connections that completed, in the counted part
	failed  int64   // attempts that failed in the counted part
	resumed int64   // handshakes that resumed a session (none should)
	state   string  // what the first connection negotiated
	lastErr error   // the last failure
}

// handshakes runs workers that each connect to the echo through addr,
// complete a full handshake with cfg, send 32 bytes and read them back,
// and close, over and over, until the window ends. The round trip makes
// sure that the proxy finished its side of the handshake and reached the
// upstream. mark is called as measureMarked does.
func handshakes(addr string, cfg *tls.Config, workers int, w window, mark func()) hsStats {
	end := time.Now().Add(w.warmup + w.dur)
	countFrom := time.Now().Add(w.warmup)
	var ok, failed, resumed atomic.Int64
	var mu sync.Mutex
	var st hsStats
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			msg, buf := make([]byte, 32), make([]byte, 32)
			for time.Now().Before(end) {
				cs, err := func() (tls.ConnectionState, error) {
					// A connection under way when the test ends may finish:
					// cut off in the middle, it would leave errors in the
					// proxies' logs.
					c, err := dialTLS(addr, cfg, time.Time{})
					if err != nil {
						return tls.ConnectionState{}, err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(dialTimeout))
					if err := roundTrip(c, msg, buf); err != nil {
						return tls.ConnectionState{}, err
					}
					return c.ConnectionState(), nil
				}()
				if err == nil {
					ok.Add(1)
					if cs.DidResume {
						resumed.Add(1)
					}
					mu.Lock()
					if st.state == "" {
						st.state = describeTLS(cs)
					}
					mu.Unlock()
				} else if now := time.Now(); now.Before(end) {
					if now.After(countFrom) {
						failed.Add(1)
						mu.Lock()
						st.lastErr = err
						mu.Unlock()
					}
					time.Sleep(time.Millisecond)
				}
			}
		})
	}
	st.ok = measureMarked(w, ok.Load, mark)
	wg.Wait()
	st.failed, st.resumed = failed.Load(), resumed.Load()
	return st
}

// probeTLS checks every front port of a TLS-terminating proxy, as
// probeOnce does, verifying the served chain as a real client would.
func probeTLS(front ports, up *upstreams, bc *benchCert) error {
	dial := func(port int) (net.Conn, error) {
		c, err := dialTLS(addr(port), bc.verifyingConfig(), time.Time{})
		if err == nil {
			c.SetDeadline(time.Now().Add(time.Second))
		}
		return c, err
	}
	return probeWith(dial, front, up)
}

// --- the test ---

// tlsRound is the window of one test in one round: -duration shared out
// between the rounds and halved (there are six tests), after a warm-up of
// at most 200 ms.
func tlsRound(w window) window {
	return window{
		warmup: min(w.warmup, 200*time.Millisecond),
		dur:    max((w.dur / (2 * turnRounds)).Round(time.Millisecond), 100*time.Millisecond),
	}
}

// tlsTest is one of the TLS tests: its result key and what it does.
type tlsTest struct {
	key, what string
	hs        uint16 // a handshake test for this version, or 0
	conns     int    // bulk: connections
	down      bool   // bulk: download, not upload
}

func tlsTestList(workers int) []tlsTest {
	return []tlsTest{
		{key: "hs13", what: "TLS 1.3 handshakes, " + plural(workers, "worker"), hs: tls.VersionTLS13},
		{key: "hs12", what: "TLS 1.2 handshakes, " + plural(workers, "worker"), hs: tls.VersionTLS12},
		{key: "up1", what: "upload, 1 conn", conns: 1},
		{key: "up8", what: "upload, 8 conns", conns: 8},
		{key: "down1", what: "download, 1 conn", conns: 1, down: true},
		{key: "down8", what: "download, 8 conns", conns: 8, down: true},
	}
}

// tlsRun is one proxy in the TLS test.
type tlsRun struct {
	p      proxy
	res    *result
	c      *child
	dir    string
	front  ports
	pid    string               // the process whose CPU is measured, or ""
	got    map[string]*counted  // by test key, summed over the rounds
	meters map[string]*cpuMeter // by test key
	hs     map[string]*hsStats  // handshake tests, summed over the rounds
	errs   map[string]bool      // notes already made
	states map[uint16]string    // negotiated, by the version asked for
}

// runTLS measures the proxies that can terminate TLS (direct cannot):
// all of them start, the tests take turns between them for turnRounds
// rounds, and they stop.
func runTLS(ps []proxy, cfg config, up *upstreams, tmp string) ([]result, []string) {
	bc, err := newBenchCert(time.Now())
	if err != nil {
		return nil, []string{"tls: making the certificate: " + err.Error()}
	}
	var results []result
	for _, p := range ps {
		if p.startTLS != nil {
			results = append(results, result{name: p.name, values: map[string]float64{}})
		}
	}
	if len(results) == 0 {
		return nil, []string{"tls: no proxy selected that terminates TLS"}
	}
	tests := tlsTestList(cfg.workers)
	var runs []*tlsRun
	k := 0
	for _, p := range ps {
		if p.startTLS == nil {
			continue
		}
		res := &results[k]
		k++
		c, s, err := launchTLS(p, cfg, up, tmp, bc)
		if err != nil {
			res.skipped = err.Error()
			continue
		}
		r := &tlsRun{p: p, res: res, c: c, dir: s.dir, front: s.front, got: map[string]*counted{},
			meters: map[string]*cpuMeter{}, hs: map[string]*hsStats{}, errs: map[string]bool{}, states: map[uint16]string{}}
		if pid, err := p.rssPID(c); err != nil {
			res.notes = append(res.notes, "proxy CPU: "+err.Error())
		} else {
			r.pid = strconv.Itoa(pid)
		}
		for _, t := range tests {
			pids := []string{"self"}
			if r.pid != "" {
				pids = append(pids, r.pid)
			}
			r.got[t.key], r.meters[t.key] = &counted{}, newCPUMeter(pids...)
			if t.hs != 0 {
				r.hs[t.key] = &hsStats{}
			}
		}
		runs = append(runs, r)
	}
	defer func() {
		for _, r := range runs {
			if r.c != nil {
				r.c.stop()
			}
		}
	}()

	round := tlsRound(cfg.w)
	for i := range turnRounds {
		for _, t := range tests {
			// Each round starts with another proxy.
			for j := range runs {
				r := runs[(i+j)%len(runs)]
				if r.c.exited() {
					continue // noted when it died
				}
				udpStep(r.p, r.c, r.res, fmt.Sprintf("tls %s, round %d of %d", t.what, i+1, turnRounds), func() error {
					err := r.runTest(t, bc, cfg, up, round)
					return newNote(r.errs, err)
				})
				up.closeConns()
			}
		}
	}
	for _, r := range runs {
		// Before it stops: Caddy says goodbye at level warn.
		if r.p.name == "aegis" {
			if n, first := aegisLogTrouble(filepath.Join(r.dir, "aegis.log")); n > 0 {
				r.res.notes = append(r.res.notes, fmt.Sprintf("tls: its log has %d warnings or errors, the first: %s", n, first))
			}
		}
		r.c.stop()
		r.c = nil
		r.report(tests, cfg)
	}
	return results, negotiated(runs)
}

// launchTLS starts p terminating TLS with bc on three front ports, in a
// dir of its own, and waits until data passes through each.
func launchTLS(p proxy, cfg config, up *upstreams, tmp string, bc *benchCert) (*child, setup, error) {
	bin, err := lookBinary(p.binary(&cfg))
	if err != nil {
		return nil, setup{}, err
	}
	fp, err := freePorts(3)
	if err != nil {
		return nil, setup{}, err
	}
	s := setup{name: p.name, dir: filepath.Join(tmp, p.name+"-tls"),
		up:    ports{Sink: up.sink.port(), Source: up.source.port(), Echo: up.echo.port()},
		front: ports{Sink: fp[0], Source: fp[1], Echo: fp[2]}, binary: bin, pin: cfg.pin, cert: bc,
		timeout: cfg.startTimeout}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return nil, s, err
	}
	fmt.Fprintf(os.Stderr, "%s: tls: starting\n", p.name)
	c, err := p.startTLS(s)
	if err != nil {
		return nil, s, fmt.Errorf("start: %v", err)
	}
	err = waitReady(c, cfg.startTimeout, func() error { return probeTLS(s.front, up, bc) })
	up.closeConns()
	if err != nil {
		c.stop()
		return nil, s, err
	}
	return c, s, nil
}

// runTest runs test t once on r, adding what it counted to r.
func (r *tlsRun) runTest(t tlsTest, bc *benchCert, cfg config, up *upstreams, w window) error {
	mark := r.meters[t.key].mark
	if t.hs != 0 {
		st := handshakes(addr(r.front.Echo), bc.clientConfig(t.hs), cfg.workers, w, mark)
		r.got[t.key].add(st.ok)
		sum := r.hs[t.key]
		sum.failed += st.failed
		sum.resumed += st.resumed
		if st.lastErr != nil {
			sum.lastErr = st.lastErr
		}
		if r.states[t.hs] == "" {
			r.states[t.hs] = st.state
		}
		if st.ok.n == 0 {
			if st.lastErr != nil {
				return fmt.Errorf("no handshake completed: %v", st.lastErr)
			}
			return errors.New("no handshake completed")
		}
		return nil
	}
	var got counted
	var err error
	if t.down {
		got, err = downloadWith(tlsDialer(addr(r.front.Source), bc.clientConfig(tls.VersionTLS13)), t.conns, w, mark)
	} else {
		got, err = uploadWith(tlsDialer(addr(r.front.Sink), bc.clientConfig(tls.VersionTLS13)), t.conns, w, up.sink, mark)
	}
	if err != nil {
		return err
	}
	r.got[t.key].add(got)
	return nil
}

// report puts what the rounds measured in the result.
func (r *tlsRun) report(tests []tlsTest, cfg config) {
	v := r.res.values
	var other [2]float64 // the most other work took of CPU 0 and 1, in percent
	var otherIn [2]int   // in how many tests it took 10% or more
	metered := 0
	var benchBound []string
	for _, t := range tests {
		got := r.got[t.key]
		if got.secs <= 0 || got.n <= 0 {
			continue
		}
		rate := got.rate()
		if t.hs == 0 {
			rate /= 1e6 // MB/s
		}
		v[t.key] = rate
		m := r.meters[t.key]
		own := map[string]float64{}
		for i, key := range []string{"cpubench", "cpuproxy"}[:len(m.pids)] {
			if p, ok := m.percent(i); ok {
				own[key] = p
				v[key+"_"+t.key] = p
			}
		}
		if p, ok := own["cpuproxy"]; ok {
			per := p / 100 * 1e6 / got.rate() // us per handshake, or per byte
			if t.hs == 0 {
				per *= 1e6 // us per MB
			}
			v["cpu_"+t.key] = per
		}
		if st := r.hs[t.key]; st != nil {
			if st.resumed > 0 {
				r.res.notes = append(r.res.notes, fmt.Sprintf("tls %s: %d handshakes resumed a session: not all were full handshakes", t.what, st.resumed))
			}
			if st.failed > 0 {
				r.res.notes = append(r.res.notes, fmt.Sprintf("tls %s: %d attempts failed, the last: %v", t.what, st.failed, st.lastErr))
			}
		}
		if !cfg.pin || len(own) != 2 {
			continue
		}
		metered++
		var busy [2]float64
		skewed := false
		for cpu, key := range []string{"cpubench", "cpuproxy"} {
			b, ok1 := m.cpuPercent(cpu)
			soft, ok2 := m.softPercent(cpu)
			if !ok1 || !ok2 {
				continue
			}
			busy[cpu] = b
			o := b - soft - own[key]
			other[cpu] = max(other[cpu], o)
			if o >= 10 {
				otherIn[cpu]++
				skewed = true
			}
		}
		switch {
		case skewed:
		case busy[0] >= 95 && busy[1] < 85:
			benchBound = append(benchBound, fmt.Sprintf("%s (CPU 0 %.0f%% busy, CPU 1 %.0f%%)", t.what, busy[0], busy[1]))
		case busy[0] < 80 && busy[1] < 80:
			r.res.notes = append(r.res.notes, fmt.Sprintf("tls %s: neither CPU was kept busy (CPU 0 %.0f%%, CPU 1 %.0f%%): the rate is skewed",
				t.what, busy[0], busy[1]))
		}
	}
	if otherIn[0]+otherIn[1] > 0 {
		r.res.notes = append(r.res.notes, fmt.Sprintf("tls: other work took up to %.0f%% of CPU 0 (10%% or more in %d of %d tests) and up to %.0f%% of CPU 1 (in %d of %d) during the counted parts: the rates are skewed",
			other[0], otherIn[0], metered, other[1], otherIn[1], metered))
	}
	if len(benchBound) > 0 {
		r.res.notes = append(r.res.notes, "tls: the bench, not the proxy, set the rate of "+strings.Join(benchBound, ", ")+
			": compare the proxy's CPU per handshake or per MB")
	}
}

// negotiated says what the handshakes negotiated: one line if all the
// proxies agree, else one per proxy.
func negotiated(runs []*tlsRun) []string {
	desc := map[string]string{}
	var order []string
	for _, r := range runs {
		var parts []string
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			if s := r.states[v]; s != "" {
				parts = append(parts, s)
			}
		}
		if len(parts) > 0 {
			desc[r.p.name] = strings.Join(parts, "; ")
			order = append(order, r.p.name)
		}
	}
	same := true
	for _, name := range order {
		same = same && desc[name] == desc[order[0]]
	}
	switch {
	case len(order) == 0:
		return nil
	case same:
		return []string{"negotiated by all: " + desc[order[0]]}
	}
	var out []string
	for _, name := range order {
		out = append(out, name+": negotiated "+desc[name])
	}
	return out
}

// aegisLogTrouble counts the entries of aegis's JSON log at level warn or
// above, but those that hold one of the expected texts, and describes the
// first.
func aegisLogTrouble(file string, expected ...string) (int, string) {
	f, err := os.Open(file)
	if err != nil {
		return 0, ""
	}
	defer f.Close()
	return logTrouble(f, expected)
}

func logTrouble(f *os.File, expected []string) (int, string) {
	n, first := 0, ""
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if d := troubleEntry(sc.Bytes()); d != "" && !slices.ContainsFunc(expected, func(e string) bool { return bytes.Contains(sc.Bytes(), []byte(e)) }) {
			if n == 0 {
				first = d
			}
			n++
		}
	}
	return n, first
}

// troubleEntry describes a JSON log line at level warn or above, or is "".
func troubleEntry(line []byte) string {
	var e struct {
		Level, Logger, Msg, Error string
	}
	if json.Unmarshal(line, &e) != nil {
		return ""
	}
	switch e.Level {
	case "warn", "error", "dpanic", "panic", "fatal":
	default:
		return ""
	}
	d := e.Level + " " + e.Logger + ": " + e.Msg
	if e.Error != "" {
		d += ": " + e.Error
	}
	return d
}

// tlsMetrics are the rows of the TLS table.
func tlsMetrics(workers int) []metric {
	return []metric{
		{key: "hs13", label: "TLS 1.3 handshakes/s, " + plural(workers, "worker"), format: "%.0f"},
		{key: "hs12", label: "TLS 1.2 handshakes/s, " + plural(workers, "worker"), format: "%.0f"},
		{key: "cpubench_hs13", label: "bench CPU %, TLS 1.3 handshakes", format: "%.0f", noRatio: true},
		{key: "cpuproxy_hs13", label: "proxy CPU %, TLS 1.3 handshakes", format: "%.0f", noRatio: true},
		{key: "cpu_hs13", label: "proxy CPU us per TLS 1.3 handshake (lower is better)", format: "%.0f"},
		{key: "cpu_hs12", label: "proxy CPU us per TLS 1.2 handshake (lower is better)", format: "%.0f"},
		{key: "up1", label: "upload, 1 conn, MB/s", format: "%.0f"},
		{key: "up8", label: "upload, 8 conns, MB/s", format: "%.0f"},
		{key: "down1", label: "download, 1 conn, MB/s", format: "%.0f"},
		{key: "down8", label: "download, 8 conns, MB/s", format: "%.0f"},
		{key: "cpubench_down8", label: "bench CPU %, download, 8 conns", format: "%.0f", noRatio: true},
		{key: "cpuproxy_down8", label: "proxy CPU %, download, 8 conns", format: "%.0f", noRatio: true},
		{key: "cpu_up8", label: "proxy CPU us per MB, upload, 8 conns (lower is better)", format: "%.0f"},
		{key: "cpu_down8", label: "proxy CPU us per MB, download, 8 conns (lower is better)", format: "%.0f"},
	}
}

// tlsReport is the TLS table and its notes.
func tlsReport(results []result, notes []string, cfg config) string {
	var b strings.Builder
	if len(results) == 0 {
		b.WriteString("TLS: no table.\n")
		for _, n := range notes {
			b.WriteString(n + "\n")
		}
		return b.String()
	}
	b.WriteString("TLS, terminated by the proxy, plain TCP to the upstream. Each cell: value (value / haproxy).\n")
	b.WriteString(tableRefs(results, tlsMetrics(cfg.workers), "haproxy"))
	for _, r := range results {
		if r.skipped != "" {
			fmt.Fprintf(&b, "%s: tls skipped (%s)\n", r.name, r.skipped)
		}
		for _, n := range r.notes {
			fmt.Fprintf(&b, "%s: %s\n", r.name, n)
		}
	}
	for _, n := range notes {
		b.WriteString(n + "\n")
	}
	fmt.Fprintf(&b, "handshakes: each worker connects, completes a full handshake (no session is kept, so none resumes), sends 32 bytes to the echo, reads them back and closes.\n")
	b.WriteString("CPU: from /proc, in the counted part; the kernel's softirq time for the loopback traffic is charged to no process, and not counted as other work. Where the bench and not the proxy is the limit, compare the proxy's CPU per handshake or per MB.\n")
	return b.String()
}
