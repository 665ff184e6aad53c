package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// noGoroutineGrowth fails the test if, 5 s after it, more goroutines run
// than before it.
func noGoroutineGrowth(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		if !testenv.Within(5*time.Second, func() bool { return runtime.NumGoroutine() <= before }) {
			t.Errorf("%d goroutines after the test, %d before", runtime.NumGoroutine(), before)
		}
	})
}

// serveTCP runs handle for each connection to a 127.0.0.1 listener
// until the test ends.
func serveTCP(t *testing.T, handle func(net.Conn)) *upstream {
	t.Helper()
	s, err := listenUpstream(handle)
	if err != nil {
		t.Fatal(err)
	}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.close)
	return s
}

func testLoad(t *testing.T, ring *certRing) *soakLoad {
	t.Helper()
	l, err := newSoakLoad(ring)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func testRNG() *rand.Rand { return rand.New(rand.NewPCG(1, 2)) }

// TestShortConnOutcomes: a short connection is ok through an echo,
// refused on a port nothing listens on, cut by a server that closes at
// once, and a mismatch through a server that changes a byte.
func TestShortConnOutcomes(t *testing.T) {
	noGoroutineGrowth(t)
	l := testLoad(t, nil)
	echo := serveTCP(t, serveEcho)
	closer := serveTCP(t, func(c net.Conn) {})
	corrupt := serveTCP(t, func(c net.Conn) {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				buf[0] ^= 0xff
				c.Write(buf[:n])
			}
			if err != nil {
				return
			}
		}
	})
	for _, tc := range []struct {
		name    string
		port    int
		want    outcome
		reached int64
	}{
		{"echo", echo.port(), outOK, 1},
		{"nothing listening", testenv.FreePort(t), outRefused, 0},
		{"closed at once", closer.port(), outCut, 1},
		{"changed byte", corrupt.port(), outMismatch, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ta := newTally("s", "short tcp", false)
			l.shortConn(ta, newTarget("s", tc.port), modePlain, testRNG(), make([]byte, 16<<10))
			if got := ta.outcomes[tc.want].Load(); got != 1 || ta.attempts.Load() != 1 {
				t.Errorf("outcome %s counted %d times of %d attempts, want once; failures: %v", outcomeNames[tc.want], got, ta.attempts.Load(), ta.failures())
			}
			if ta.reached.Load() != tc.reached {
				t.Errorf("reached %d, want %d", ta.reached.Load(), tc.reached)
			}
			if tc.want == outOK && (ta.sent.Load() == 0 || ta.sent.Load() != ta.rcvd.Load()) {
				t.Errorf("sent %d bytes, read %d", ta.sent.Load(), ta.rcvd.Load())
			}
			if got := ta.unexpected(); (got == 0) != (tc.want == outOK) {
				t.Errorf("unexpected %d for outcome %s", got, outcomeNames[tc.want])
			}
		})
	}
}

// TestTallyGaps: on a stream the churn turns off, refused and cut are
// expected; a mismatch never is.
func TestTallyGaps(t *testing.T) {
	ta := newTally("soak-toggle", "short tcp", true)
	ta.record(outRefused, errors.New("refused"))
	ta.record(outCut, io.EOF)
	ta.record(outOK, nil)
	if n := ta.unexpected(); n != 0 || len(ta.failures()) != 0 {
		t.Errorf("unexpected %d, failures %v; want none", n, ta.failures())
	}
	ta.record(outMismatch, &mismatchError{"echo differs"})
	ta.record(outMismatch, &mismatchError{"echo differs"})
	ta.record(outFailed, errors.New("i/o timeout"))
	if n := ta.unexpected(); n != 3 {
		t.Errorf("unexpected %d, want 3", n)
	}
	if f := ta.failures(); len(f) != 2 || f[0] != "2x mismatch: echo differs" || f[1] != "1x failed: i/o timeout" {
		t.Errorf("failures %q", f)
	}
	for i := range 2 * maxErrs {
		ta.record(outFailed, fmt.Errorf("error %d", i))
	}
	if n := len(ta.failures()); n != maxErrs {
		t.Errorf("%d failure descriptions kept, want %d", n, maxErrs)
	}
}

// TestLongConn: a long-lived connection echoes until its life is over,
// or until the context ends, and is ok either way.
func TestLongConn(t *testing.T) {
	noGoroutineGrowth(t)
	l := testLoad(t, nil)
	echo := serveTCP(t, serveEcho)
	ta := newTally("s", "long tcp", false)
	start := time.Now()
	l.longConn(context.Background(), ta, newTarget("s", echo.port()), modePlain, 1500*time.Millisecond, testRNG(), make([]byte, 16<<10))
	if took := time.Since(start); took < 1500*time.Millisecond || took > 5*time.Second {
		t.Errorf("a connection with 1.5 s to live took %v", took)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start = time.Now()
	l.longConn(ctx, ta, newTarget("s", echo.port()), modePlain, time.Hour, testRNG(), make([]byte, 16<<10))
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("a connection whose context ended took %v to close", took)
	}
	if ta.outcomes[outOK].Load() != 2 || ta.unexpected() != 0 {
		t.Errorf("ok %d, unexpected %d (%v); want 2 ok", ta.outcomes[outOK].Load(), ta.unexpected(), ta.failures())
	}
	// Two echoes at least on the first (at 0 s and 1 s), one on the second.
	if ta.sent.Load() < 3*64 || ta.sent.Load() != ta.rcvd.Load() {
		t.Errorf("sent %d, read %d", ta.sent.Load(), ta.rcvd.Load())
	}
}

// TestPP2: the PROXY v2 upstream answers the source of the header it got;
// the client accepts only its own address.
func TestPP2(t *testing.T) {
	noGoroutineGrowth(t)
	l := testLoad(t, nil)
	up := serveTCP(t, servePP2Echo)
	// A stand-in for the proxy: it writes a PROXY v2 header naming
	// source (the client's own address when source is nil), then relays.
	front := func(source net.Addr) *upstream {
		return serveTCP(t, func(c net.Conn) {
			u, err := net.Dial("tcp", addr(up.port()))
			if err != nil {
				return
			}
			defer u.Close()
			src := source
			if src == nil {
				src = c.RemoteAddr()
			}
			if _, err := proxyproto.HeaderProxyFromAddrs(2, src, c.LocalAddr()).WriteTo(u); err != nil {
				return
			}
			var wg sync.WaitGroup
			wg.Go(func() {
				io.Copy(u, c)
				u.(*net.TCPConn).CloseWrite()
			})
			io.Copy(c, u)
			wg.Wait()
		})
	}
	good := front(nil)
	bad := front(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 9), Port: 9})
	ta := newTally("soak-pp2", "short pp2", false)
	l.shortConn(ta, newTarget("g", good.port()), modePP2, testRNG(), make([]byte, 16<<10))
	if ta.outcomes[outOK].Load() != 1 {
		t.Fatalf("through a proxy that names the client: %v", ta.failures())
	}
	// The answer's bytes count as read, as the proxy counts them: a length
	// byte and "2 127.0.0.1:<port>".
	if extra := int(ta.rcvd.Load() - ta.sent.Load()); extra < 1+len("2 127.0.0.1:1") || extra > 1+len("2 127.0.0.1:65535") {
		t.Errorf("read %d bytes, sent %d: the PROXY answer is not counted as it is", ta.rcvd.Load(), ta.sent.Load())
	}
	l.shortConn(ta, newTarget("b", bad.port()), modePP2, testRNG(), make([]byte, 16<<10))
	if ta.outcomes[outMismatch].Load() != 1 || !strings.Contains(strings.Join(ta.failures(), ""), "127.0.0.9:9") {
		t.Errorf("through a proxy that names another source: outcomes ok %d, mismatch %d, failures %v",
			ta.outcomes[outOK].Load(), ta.outcomes[outMismatch].Load(), ta.failures())
	}
}

// TestUDPSession: a session through the UDP echo is ok and reached; to a
// port nothing listens on it is refused (the ICMP error comes back).
func TestUDPSession(t *testing.T) {
	noGoroutineGrowth(t)
	l := testLoad(t, nil)
	e, err := startUDPEcho()
	if err != nil {
		t.Fatal(err)
	}
	defer e.close()
	ta := newTally("soak-udp", "udp sessions", false)
	l.udpSession(context.Background(), ta, newTarget("u", e.port()), testRNG(), make([]byte, 2048))
	if ta.outcomes[outOK].Load() != 1 || ta.reached.Load() != 1 || ta.resent.Load() != 0 {
		t.Errorf("through the echo: ok %d, reached %d, resent %d; failures %v", ta.outcomes[outOK].Load(), ta.reached.Load(), ta.resent.Load(), ta.failures())
	}
	ta = newTally("soak-udp", "udp sessions", false)
	l.udpSession(context.Background(), ta, newTarget("u", testenv.FreePort(t)), testRNG(), make([]byte, 2048))
	if ta.outcomes[outRefused].Load() != 1 || ta.reached.Load() != 0 {
		t.Errorf("to a closed port: refused %d, reached %d; failures %v", ta.outcomes[outRefused].Load(), ta.reached.Load(), ta.failures())
	}
}

// TestUDPExchangeResends: a datagram whose first echo is lost is sent
// again; a late echo of an earlier datagram is skipped; a server that
// never answers fails after udpTries.
func TestUDPExchangeResends(t *testing.T) {
	noGoroutineGrowth(t)
	srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer srv.Close()
	wg.Go(func() {
		buf := make([]byte, 2048)
		seen := 0
		for {
			n, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			seen++
			if seen == 1 {
				continue // lose the first
			}
			srv.WriteToUDP([]byte{0, 0, 0, 0, 'o', 'l', 'd'}, from) // a late echo of datagram 0
			srv.WriteToUDP(buf[:n], from)
		}
	})
	c, err := net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	l := testLoad(t, nil)
	ta := newTally("u", "udp sessions", false)
	msg := []byte{0, 0, 0, 1, 'h', 'i'}
	if err := l.udpExchange(ta, c, msg, 1, make([]byte, 2048)); err != nil {
		t.Fatal(err)
	}
	if ta.resent.Load() != 1 {
		t.Errorf("resent %d, want 1", ta.resent.Load())
	}

	quiet, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer quiet.Close()
	c2, err := net.DialUDP("udp4", nil, quiet.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	start := time.Now()
	err = l.udpExchange(ta, c2, msg, 1, make([]byte, 2048))
	if err == nil || outcomeOf(err) != outFailed || time.Since(start) < udpTries*udpWait {
		t.Errorf("no answer: %v after %v, want a failure after %v", err, time.Since(start), udpTries*udpWait)
	}
}

// TestSrcAlloc: UDP source addresses do not come back for 2.5 million
// sessions.
func TestSrcAlloc(t *testing.T) {
	var a srcAlloc
	seen := map[string]bool{}
	for range 20000 {
		s := a.take().String()
		if seen[s] {
			t.Fatalf("%s handed out twice", s)
		}
		seen[s] = true
	}
	a.n.Store(250*10000 - 1)
	last := a.take()
	first := a.take()
	if last.String() != "127.0.1.250:19999" || first.String() != "127.0.1.1:10000" {
		t.Errorf("around the wrap: %v then %v", last, first)
	}
}

// TestCertRing: a handshake is checked against the generation current at
// its start; an older certificate is stale, one not of the ring fails.
func TestCertRing(t *testing.T) {
	noGoroutineGrowth(t)
	ring, err := newCertRing(3)
	if err != nil {
		t.Fatal(err)
	}
	other, err := newBenchCert(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	serving := ring.gens[1]
	cert := func(bc *benchCert) tls.Certificate {
		c, err := tls.X509KeyPair([]byte(bc.chainPEM), []byte(bc.keyPEM))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		mu.Lock()
		defer mu.Unlock()
		c := cert(serving)
		return &c, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				serveEcho(c)
			})
		}
	})
	port := ln.Addr().(*net.TCPAddr).Port
	l := testLoad(t, ring)
	conn := func() *tally {
		ta := newTally("soak-tls", "short tls", false)
		l.shortConn(ta, newTarget("t", port), modeTLS, testRNG(), make([]byte, 16<<10))
		return ta
	}

	ring.current.Store(1)
	if ta := conn(); ta.outcomes[outOK].Load() != 1 || ring.served[1].Load() != 1 {
		t.Errorf("the current certificate: %v, served %d", ta.failures(), ring.served[1].Load())
	}
	ring.current.Store(2) // replaced, but the server still has 1
	if ta := conn(); ta.outcomes[outMismatch].Load() != 1 || ring.stale.Load() != 1 {
		t.Errorf("a replaced certificate: outcomes %v, stale %d", ta.failures(), ring.stale.Load())
	}
	mu.Lock()
	serving = other
	mu.Unlock()
	if ta := conn(); ta.outcomes[outFailed].Load() != 1 || !strings.Contains(strings.Join(ta.failures(), ""), "none the soak uploaded") {
		t.Errorf("a certificate not of the ring: %v", ta.failures())
	}
}

// TestGoroutineProfile reads the total and the groups of a real debug=1
// goroutine profile, and finds the stack that grew.
func TestGoroutineProfile(t *testing.T) {
	noGoroutineGrowth(t)
	prof := func() string {
		var b bytes.Buffer
		if err := pprof.Lookup("goroutine").WriteTo(&b, 1); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	before := prof()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 7 {
		wg.Go(func() { parkedForProfile(stop) })
	}
	defer wg.Wait()
	defer close(stop)
	testenv.Eventually(t, "7 goroutines parked", func() bool {
		return groupCount(prof(), "parkedForProfile") == 7
	})
	after := prof()
	n, err := goroutineTotal(after)
	if err != nil {
		t.Fatal(err)
	}
	if n < 7 {
		t.Errorf("total %d with 7 parked", n)
	}
	grown := groupGrowth(before, after, 3)
	if len(grown) == 0 || !strings.HasPrefix(grown[0], "+7 ") || !strings.Contains(grown[0], "parkedForProfile") {
		t.Errorf("growth %q, want +7 in parkedForProfile first", grown)
	}
	var total int
	for _, k := range goroutineGroups(after) {
		total += k
	}
	if total != n {
		t.Errorf("the groups hold %d goroutines, the total says %d", total, n)
	}
	if _, err := goroutineTotal("goroutine 1 [running]:\n"); err == nil {
		t.Error("a debug=2 dump was taken for a debug=1 profile")
	}
}

// groupCount is the goroutines whose stack holds fn.
func groupCount(prof, fn string) int {
	n := 0
	for stack, k := range goroutineGroups(prof) {
		if strings.Contains(stack, fn) {
			n += k
		}
	}
	return n
}

func parkedForProfile(stop chan struct{}) { <-stop }

// TestLogScan counts connection lines by stream and entries by level.
func TestLogScan(t *testing.T) {
	var ls logScan
	ls.conns, ls.levels = map[int64]int64{}, map[string]int{}
	in := `{"level":"info","ts":1,"logger":"streams","msg":"connection","stream":"a","stream_id":3,"bytes_sent":5}
{"level":"info","ts":1,"logger":"streams","msg":"connection","stream":"a","stream_id":3}
{"level":"info","ts":1,"logger":"streams","msg":"connection","stream":"b","stream_id":4}
{"level":"info","ts":1,"logger":"streams","msg":"stream created","stream_id":4}
{"level":"warn","ts":1,"logger":"admin","msg":"slow"}
{"level":"error","ts":1,"logger":"streams","msg":"writing the connection log to storage","error":"disk full"}
not json at all
`
	if err := ls.read(strings.NewReader(in)); err != nil {
		t.Fatal(err)
	}
	if ls.conns[3] != 2 || ls.conns[4] != 1 || ls.lines != 7 {
		t.Errorf("conns %v, lines %d", ls.conns, ls.lines)
	}
	if ls.errorLevel() != 2 || ls.levels["warn"] != 1 {
		t.Errorf("levels %v", ls.levels)
	}
	if len(ls.trouble) != 3 || !strings.Contains(ls.trouble[1], "disk full") {
		t.Errorf("trouble %q", ls.trouble)
	}
}

// TestEvaluate: the checks fail on what they are there to catch.
func TestEvaluate(t *testing.T) {
	ring, err := newCertRing(2)
	if err != nil {
		t.Fatal(err)
	}
	st := &soakStream{spec: spec.Stream{ID: 1, Name: "soak-tcp"}}
	good := func() *soakRun {
		ta := newTally("soak-tcp", "short tcp", false)
		ta.attempts.Store(10)
		ta.reached.Store(10)
		ta.outcomes[outOK].Store(10)
		ta.sent.Store(100)
		ta.rcvd.Store(100)
		// The long-lived connections of a stream the API turns off get
		// cut, and that is all they do.
		cut := newTally("soak-toggle", "long tcp", true)
		cut.attempts.Store(3)
		cut.reached.Store(3)
		cut.outcomes[outCut].Store(3)
		r := &soakRun{ring: ring, churn: newChurn(nil, nil, ring, 1, nil),
			plan: []*loadKind{{st: st, what: "short", t: ta}, {st: st, what: "long", t: cut}}}
		r.churn.count(kindUpdate, nil)
		r.acct = []acctRow{{st: st, exact: true, reached: 10, bytes: true, sent: 100, rcvd: 100, lines: 10,
			status: spec.Status{TotalConnections: 10, BytesSent: 100, BytesReceived: 100},
			log:    logCount{rows: 10, sent: 100, rcvd: 100}}}
		r.idleStart = soakSample{goroutines: 30, fds: 31, rssKB: 70 << 10, heapAlloc: 14 << 20}
		r.baseline = soakSample{goroutines: 150, fds: 160, rssKB: 80 << 10}
		r.endLoad = soakSample{goroutines: 160, fds: 150, rssKB: 90 << 10}
		r.idleEnd = soakSample{goroutines: 31, fds: 31, rssKB: 90 << 10, heapAlloc: 13 << 20}
		r.scan = logScan{levels: map[string]int{"info": 20}, lines: 20}
		r.exit = "<nil>"
		return r
	}
	r := good()
	r.evaluate()
	if n := r.failed(); n != 0 {
		t.Fatalf("%d checks fail on a good run:\n%s", n, r.report())
	}
	for _, tc := range []struct {
		name  string
		spoil func(r *soakRun)
		check string
	}{
		{"a failed client", func(r *soakRun) { r.plan[0].t.record(outFailed, errors.New("timeout")) }, "clients: no unexpected failure"},
		{"a kind of load that never got through", func(r *soakRun) {
			r.plan[0].t.outcomes[outOK].Store(0)
			r.plan[0].t.outcomes[outCut].Store(10)
			r.plan[0].t.gaps = true
		}, "clients: every kind"},
		{"a log row missing", func(r *soakRun) { r.acct[0].log.rows = 9 }, "accounting: accepted"},
		{"a connection still active", func(r *soakRun) { r.acct[0].status.ActiveConnections = 1 }, "accounting: accepted"},
		{"a log line missing", func(r *soakRun) { r.acct[0].lines = 9 }, "accounting: accepted"},
		{"clients connected more than accepted", func(r *soakRun) { r.acct[0].reached = 11 }, "accounting: accepted"},
		{"bytes lost", func(r *soakRun) { r.acct[0].status.BytesReceived = 99 }, "accounting: every byte"},
		{"goroutines leaked", func(r *soakRun) { r.idleEnd.goroutines = 30 + boundGoroutinesIdle + 1 }, "goroutines"},
		{"fds leaked", func(r *soakRun) { r.idleEnd.fds = 31 + boundFDsIdle + 1 }, "open fds"},
		{"RSS grew", func(r *soakRun) { r.endLoad.rssKB = (80 + boundRSSMB + 1) << 10 }, "RSS"},
		{"heap grew", func(r *soakRun) { r.idleEnd.heapAlloc = (14 + boundHeapMB + 1) << 20 }, "live Go heap"},
		{"an unexpected API answer", func(r *soakRun) { r.churn.count(kindToggle, errors.New("status 500")) }, "API"},
		{"a stale certificate", func(r *soakRun) { r.ring.stale.Store(1) }, "TLS"},
		{"an error logged", func(r *soakRun) { r.scan.levels["error"] = 1 }, "aegis log"},
		{"killed at stop", func(r *soakRun) { r.exit = "signal: killed" }, "aegis stops"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := good()
			ring.stale.Store(0)
			tc.spoil(r)
			r.evaluate()
			var failed []string
			for _, c := range r.checks {
				if !c.ok {
					failed = append(failed, c.name)
				}
			}
			if len(failed) != 1 || !strings.HasPrefix(failed[0], tc.check) {
				t.Errorf("failed checks %q, want only %q", failed, tc.check)
			}
		})
	}
}

func TestSlope(t *testing.T) {
	xs := []float64{0, 1, 2, 3}
	for _, tc := range []struct {
		ys   []float64
		want float64
	}{
		{[]float64{5, 5, 5, 5}, 0},
		{[]float64{1, 3, 5, 7}, 2},
		{[]float64{7, 5, 3, 1}, -2},
		{[]float64{0, 1, 0, 1}, 0.2},
	} {
		if got := slope(xs, tc.ys); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("slope of %v = %v, want %v", tc.ys, got, tc.want)
		}
	}
}

// TestSparePorts: distinct ports below the ephemeral range, free for
// TCP and UDP.
func TestSparePorts(t *testing.T) {
	ports, err := sparePorts(7, true, true)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if p < 20000 || p > 32767 || seen[p] {
			t.Errorf("port %d: out of 20000-32767 or given twice (%v)", p, ports)
		}
		seen[p] = true
		ln, err := net.Listen("tcp", addr(p))
		if err != nil {
			t.Errorf("port %d: %v", p, err)
			continue
		}
		ln.Close()
	}
}
