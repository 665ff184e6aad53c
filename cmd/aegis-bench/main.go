// Command aegis-bench compares bin/aegis with HAProxy, nginx and no proxy at
// all on loopback: throughput, short connections per second, round-trip
// latency and memory per idle connection over TCP; for UDP (aegis, nginx
// and no proxy), 64-byte echo datagrams per second, their loss, and memory
// per NAT entry; and with TLS terminated by the proxy (aegis, HAProxy and
// nginx), full handshakes per second and throughput. Each proxy runs as a
// child process pinned to CPU 1 with one thread; the load and the upstreams
// run in this process on CPU 0. With -soak it runs the soak instead
// (soak.go, make soak); with -cluster, the bench of three nodes on one
// PostgreSQL (cluster.go, make bench-cluster).
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type config struct {
	aegis        string
	only         map[string]bool // empty: all
	w            window
	workers      int
	idle         int
	pin          bool
	keep         bool
	startTimeout time.Duration

	tcp, udp, tls bool // which tests run
	features      bool // the features test (features.go), not run by default
	udpSockets    int  // generator sockets
	udpWindow     int  // datagrams in flight per generator socket
	udpEntries    int  // NAT entries held for the memory test
	udpEntriesWhy string
}

func main() {
	var cfg config
	var only, tests string
	lo, hi := ephemeralRange()
	entries, entriesWhy := natDefault(fileLimit(), len(natClientPorts()), lo, hi)
	flag.StringVar(&cfg.aegis, "aegis", "bin/aegis", "path of the aegis binary")
	flag.StringVar(&only, "only", "", "comma-separated proxies to run, from direct,aegis,haproxy,nginx (default all)")
	flag.DurationVar(&cfg.w.dur, "duration", 3*time.Second, "counted time of each test")
	flag.DurationVar(&cfg.w.warmup, "warmup", 500*time.Millisecond, "uncounted warm-up before each test")
	flag.IntVar(&cfg.workers, "workers", 8, "workers for the short-connection and latency tests")
	flag.IntVar(&cfg.idle, "idle", 2000, "idle connections for the memory test")
	flag.BoolVar(&cfg.pin, "pin", true, "pin proxies to CPU 1 and the bench to CPU 0")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the temp dir with configs and logs")
	flag.DurationVar(&cfg.startTimeout, "start-timeout", defaultStartTimeout, "how long a proxy may take to start")
	flag.StringVar(&tests, "tests", "tcp,udp,tls", "comma-separated tests to run, from tcp,udp,tls,features (features, not in the default: stream settings on aegis and haproxy)")
	flag.IntVar(&cfg.udpSockets, "udp-sockets", 4, "generator sockets for the UDP rate test")
	flag.IntVar(&cfg.udpWindow, "udp-window", 32, "datagrams in flight per generator socket")
	flag.IntVar(&cfg.udpEntries, "udp-entries", entries,
		fmt.Sprintf("NAT entries held for the UDP memory test: %d, or as many as this machine allows if fewer", natTarget))
	soak := soakFlags()
	cluster := flag.Bool("cluster", false, "instead of the benchmark, measure three nodes on one PostgreSQL (make bench-cluster): propagation of edits, API writes per second on PostgreSQL and SQLite, catch-up after a restart")
	flag.Parse()
	if soak.dur > 0 {
		os.Exit(soakMain(cfg, *soak))
	}
	if *cluster {
		os.Exit(clusterMain(cfg))
	}

	if cfg.w.dur <= 0 || cfg.w.warmup < 0 || cfg.workers < 1 || cfg.idle < 1 {
		fmt.Fprintln(os.Stderr, "aegis-bench: -duration, -workers and -idle must be positive, -warmup not negative")
		os.Exit(2)
	}
	if cfg.udpSockets < 1 || cfg.udpWindow < 1 || cfg.udpEntries < 1 {
		fmt.Fprintln(os.Stderr, "aegis-bench: -udp-sockets, -udp-window and -udp-entries must be positive")
		os.Exit(2)
	}
	if cfg.udpEntries == entries {
		cfg.udpEntriesWhy = entriesWhy
	} else if cfg.udpEntries < natTarget {
		cfg.udpEntriesWhy = "so set by -udp-entries"
	}
	for name := range strings.SplitSeq(tests, ",") {
		switch name = strings.TrimSpace(name); name {
		case "":
		case "tcp":
			cfg.tcp = true
		case "udp":
			cfg.udp = true
		case "tls":
			cfg.tls = true
		case "features":
			cfg.features = true
		default:
			fmt.Fprintf(os.Stderr, "aegis-bench: unknown test %q in -tests\n", name)
			os.Exit(2)
		}
	}
	if !cfg.tcp && !cfg.udp && !cfg.tls && !cfg.features {
		fmt.Fprintln(os.Stderr, "aegis-bench: -tests selects no test")
		os.Exit(2)
	}
	cfg.only = map[string]bool{}
	for name := range strings.SplitSeq(only, ",") {
		if name = strings.TrimSpace(name); name == "" {
			continue
		}
		if !known(name) {
			fmt.Fprintf(os.Stderr, "aegis-bench: unknown proxy %q in -only\n", name)
			os.Exit(2)
		}
		cfg.only[name] = true
	}
	// The table is printed once everything is stopped and cleaned up.
	report, err := run(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench:", err)
		os.Exit(1)
	}
	fmt.Print(report)
}

// selected are the proxies -only names (all without it).
func selected(cfg config) []proxy {
	var ps []proxy
	for _, p := range proxies {
		if len(cfg.only) == 0 || cfg.only[p.name] {
			ps = append(ps, p)
		}
	}
	return ps
}

func known(name string) bool {
	for _, p := range proxies {
		if p.name == name {
			return true
		}
	}
	return false
}

// run measures every proxy and returns the report.
func run(cfg config) (string, error) {
	start := time.Now()
	if err := raiseFileLimit(); err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench: could not raise the open file limit:", err)
	}
	pinning := "off"
	if cfg.pin {
		if why := pinBlocker(); why != "" {
			cfg.pin = false
			pinning = "off (" + why + ")"
		} else if err := pinSelf(0); err != nil {
			cfg.pin = false
			pinning = fmt.Sprintf("off (%v)", err)
		} else {
			runtime.GOMAXPROCS(1)
			pinning = "proxies on CPU 1 (taskset -c 1), bench and upstreams on CPU 0"
		}
	}

	if cfg.tcp {
		fmt.Printf("aegis-bench: TCP proxies on 127.0.0.1\n")
		fmt.Printf("tests: %v counted after %v warm-up each; %s for short conns and latency, which take turns between the proxies in %d rounds (%v counted in all); %s for memory\n",
			cfg.w.dur, cfg.w.warmup, plural(cfg.workers, "worker"), turnRounds, turnRounds*turnWindow(cfg.w).dur, plural(cfg.idle, "idle conn"))
	}
	if cfg.udp {
		if !cfg.tcp {
			fmt.Printf("aegis-bench: UDP proxies on 127.0.0.1\n")
		}
		fmt.Printf("udp tests: %d-byte echo datagrams, %s x %d in flight (closed loop, batched), %d rounds taking turns between the proxies, %v counted in all after %v warm-up each; %d NAT entries for memory, each proxy restarted for it\n",
			udpSize, plural(cfg.udpSockets, "socket"), cfg.udpWindow, turnRounds, turnRounds*turnWindow(cfg.w).dur, cfg.w.warmup, cfg.udpEntries)
	}
	if cfg.tls {
		if !cfg.tcp && !cfg.udp {
			fmt.Printf("aegis-bench: TLS-terminating proxies on 127.0.0.1\n")
		}
		tw := tlsRound(cfg.w)
		fmt.Printf("tls tests: ECDSA P-256 certificate for %s (leaf and CA), X25519, TLS 1.3 with TLS_AES_128_GCM_SHA256 (TLS 1.2: ECDHE-ECDSA-AES128-GCM-SHA256), full handshakes only; %s for handshakes; %d rounds taking turns between the proxies, %v counted in all after %v warm-up each\n",
			tlsName, plural(cfg.workers, "worker"), turnRounds, turnRounds*tw.dur, tw.warmup)
	}
	if cfg.features {
		if !cfg.tcp && !cfg.udp && !cfg.tls {
			fmt.Printf("aegis-bench: stream settings on 127.0.0.1\n")
		}
		fmt.Printf("features tests: %v counted after %v warm-up each; %s for short conns, 1 conn for upload; the proxies run at once and take turns\n",
			cfg.w.dur, cfg.w.warmup, plural(cfg.workers, "worker"))
	}
	fmt.Printf("pinning: %s\n", pinning)
	fmt.Printf("threads: aegis GOMAXPROCS=1, haproxy nbthread 1, nginx worker_processes 1, bench GOMAXPROCS=%d\n",
		runtime.GOMAXPROCS(0))
	if b, _ := os.ReadFile("/proc/loadavg"); len(strings.Fields(string(b))) > 0 {
		// Other work on the machine skews every number.
		fmt.Printf("load average at start: %s\n", strings.Fields(string(b))[0])
	}
	fmt.Println()

	tmp, cleanup, err := workDir(cfg, "aegis-bench-", "stopped")
	if err != nil {
		return "", err
	}
	defer cleanup()

	up, err := startUpstreams()
	if err != nil {
		return "", err
	}
	defer up.close()

	var results, udpResults, tlsResults, featResults []result
	var tlsNotes, featNotes []string
	if cfg.tcp {
		results = runTCP(selected(cfg), cfg, up, tmp)
	}
	if cfg.udp {
		udpResults = runUDP(selected(cfg), cfg, up, tmp)
	}
	if cfg.tls {
		tlsResults, tlsNotes = runTLS(selected(cfg), cfg, up, tmp)
	}
	if cfg.features {
		featResults, featNotes = runFeatures(selected(cfg), cfg, up, tmp)
	}

	var b strings.Builder
	if cfg.tcp {
		b.WriteString("Each cell: value (value / direct, value / haproxy).\n")
		b.WriteString(table(results, metricList(cfg.workers, cfg.idle), "haproxy"))
		for _, r := range results {
			if r.skipped != "" {
				fmt.Fprintf(&b, "%s: skipped (%s)\n", r.name, r.skipped)
			}
			for _, n := range r.notes {
				fmt.Fprintf(&b, "%s: %s\n", r.name, n)
			}
		}
	}
	if cfg.udp {
		if cfg.tcp {
			b.WriteString("\n")
		}
		b.WriteString(udpReport(udpResults, cfg))
	}
	if cfg.tls {
		if cfg.tcp || cfg.udp {
			b.WriteString("\n")
		}
		b.WriteString(tlsReport(tlsResults, tlsNotes, cfg))
	}
	if cfg.features {
		if cfg.tcp || cfg.udp || cfg.tls {
			b.WriteString("\n")
		}
		b.WriteString(featReport(featResults, featNotes, cfg))
	}
	fmt.Fprintf(&b, "\nrun took %v\n", time.Since(start).Round(time.Second))
	return b.String(), nil
}

// udpReport is the UDP table and its notes.
func udpReport(results []result, cfg config) string {
	var b strings.Builder
	stepDown := false
	for _, r := range results {
		_, ok := r.values["dpsok"]
		stepDown = stepDown || ok
	}
	if stepDown {
		// Where the full load stayed under the loss target, its rate is
		// the best one.
		for _, r := range results {
			if _, ok := r.values["dpsok"]; !ok && r.values["loss"] < udpLossTarget {
				if v, ok := r.values["dps"]; ok {
					r.values["dpsok"] = v
				}
			}
		}
	}
	fmt.Fprintf(&b, "UDP, %d-byte echo datagrams. Each cell: value (value / direct, value / nginx).\n", udpSize)
	b.WriteString(table(results, udpMetrics(cfg.udpSockets, cfg.udpWindow, cfg.udpEntries, stepDown), "nginx"))
	for _, r := range results {
		switch {
		case r.skipped != "":
			fmt.Fprintf(&b, "%s: udp skipped (%s)\n", r.name, r.skipped)
		case r.na != "":
			fmt.Fprintf(&b, "%s: n/a (%s)\n", r.name, r.na)
		}
		for _, n := range r.notes {
			fmt.Fprintf(&b, "%s: %s\n", r.name, n)
		}
	}
	fmt.Fprintf(&b, "loss: datagrams sent in the counted part whose echo had not come %v after it.\n", udpDrain)
	b.WriteString("CPU: a proxy near 100% is the limit. The bench reads high at any rate: it answers datagrams as they come, in small batches.\n")
	fmt.Fprintf(&b, "NAT memory: proxy RSS growth with %d client sockets each holding a session, divided by %d (kernel socket memory not included).\n",
		cfg.udpEntries, cfg.udpEntries)
	if cfg.udpEntries < natTarget {
		fmt.Fprintf(&b, "NAT entries: %d, not %d: %s.\n", cfg.udpEntries, natTarget, cfg.udpEntriesWhy)
	}
	return b.String()
}

// pinBlocker says why pinning cannot be done, or "".
func pinBlocker() string {
	if runtime.NumCPU() < 2 {
		return "fewer than 2 CPUs"
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return "no taskset"
	}
	return ""
}

func raiseFileLimit() error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	lim.Cur = lim.Max
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}

func addr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// tcpRun is one proxy in the TCP tests.
type tcpRun struct {
	p     proxy
	res   *result
	c     *child // nil for direct
	front ports
	// What the short-connection and latency rounds measured.
	rates   []float64
	samples []time.Duration
}

// runTCP measures the proxies over TCP. Each starts in turn and has its
// idle memory, upload and download measured while the others wait; then
// the short-connection and latency tests take turns between them for
// turnRounds rounds, as the UDP rate test does, so that a change in the
// machine's speed during the run weighs on all of them alike (these are
// the figures closest to one another); then they stop.
func runTCP(ps []proxy, cfg config, up *upstreams, tmp string) []result {
	results := make([]result, len(ps))
	var runs []*tcpRun
	defer func() {
		for _, r := range runs {
			if r.c != nil {
				r.c.stop()
			}
		}
	}()
	for i, p := range ps {
		if r := startTCP(p, cfg, up, tmp, &results[i]); r != nil {
			runs = append(runs, r)
			r.measureAlone(cfg, up)
		}
	}
	round := turnWindow(cfg.w)
	for i := range turnRounds {
		for _, r := range runs {
			r.step(up, fmt.Sprintf("short conns, round %d of %d", i+1, turnRounds), func() error {
				v, failed := connRate(addr(r.front.Echo), cfg.workers, round)
				r.rates = append(r.rates, v)
				if failed > 0 {
					return fmt.Errorf("%d attempts failed", failed)
				}
				return nil
			})
		}
	}
	for i := range turnRounds {
		for _, r := range runs {
			r.step(up, fmt.Sprintf("latency, round %d of %d", i+1, turnRounds), func() error {
				got, err := latencySamples(addr(r.front.Echo), cfg.workers, round)
				r.samples = append(r.samples, got...)
				return err
			})
		}
	}
	for _, r := range runs {
		if len(r.rates) > 0 {
			var sum float64
			for _, v := range r.rates {
				sum += v
			}
			r.res.values["cps"] = sum / float64(len(r.rates))
		}
		if len(r.samples) > 0 {
			slices.Sort(r.samples)
			r.res.values["p50"] = float64(percentile(r.samples, 50).Nanoseconds()) / 1e3
			r.res.values["p99"] = float64(percentile(r.samples, 99).Nanoseconds()) / 1e3
		}
	}
	return results
}

// startTCP starts proxy p (nothing for direct) and waits until data
// passes through it; nil if it could not (res says why).
func startTCP(p proxy, cfg config, up *upstreams, tmp string, res *result) *tcpRun {
	*res = result{name: p.name, values: map[string]float64{}}
	direct := ports{Sink: up.sink.port(), Source: up.source.port(), Echo: up.echo.port()}
	r := &tcpRun{p: p, res: res, front: direct}
	if p.start == nil {
		return r
	}
	bin, err := lookBinary(p.binary(&cfg))
	if err != nil {
		res.skipped = err.Error()
		return nil
	}
	fp, err := freePorts(3)
	if err != nil {
		res.skipped = err.Error()
		return nil
	}
	r.front = ports{Sink: fp[0], Source: fp[1], Echo: fp[2]}
	s := setup{name: p.name, dir: filepath.Join(tmp, p.name), up: direct, front: r.front, binary: bin, pin: cfg.pin, idleConns: cfg.idle}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		res.skipped = err.Error()
		return nil
	}
	fmt.Fprintf(os.Stderr, "%s: starting\n", p.name)
	c, err := p.start(s)
	if err != nil {
		res.skipped = "start: " + err.Error()
		return nil
	}
	err = probe(c, r.front, up, cfg.startTimeout)
	up.closeConns()
	if err != nil {
		c.stop()
		res.skipped = err.Error()
		return nil
	}
	r.c = c
	return r
}

// step runs one test of r's proxy, unless it died, noting its error and
// whether the proxy died during it.
func (r *tcpRun) step(up *upstreams, what string, f func() error) {
	if r.c != nil && r.c.exited() {
		return
	}
	fmt.Fprintf(os.Stderr, "%s: %s\n", r.p.name, what)
	if err := f(); err != nil {
		r.res.notes = append(r.res.notes, what+": "+err.Error())
	}
	up.closeConns()
	if r.c != nil && r.c.exited() {
		r.res.notes = append(r.res.notes, "died during "+what+": "+r.c.why())
	}
}

// measureAlone runs the tests that need the proxy to itself: idle memory
// (first, while the proxy has seen little load), upload and download.
func (r *tcpRun) measureAlone(cfg config, up *upstreams) {
	record := func(key string, v float64, err error) error {
		if err == nil {
			r.res.values[key] = v
		}
		return err
	}
	if r.c != nil {
		r.step(up, "idle memory", func() error {
			pid, err := r.p.rssPID(r.c)
			if err != nil {
				return err
			}
			v, err := idleMemory(addr(r.front.Echo), cfg.idle, func() (int64, error) { return rssKB(pid) })
			return record("mem", v, err)
		})
	}
	for _, n := range []int{1, 8} {
		r.step(up, "upload, "+plural(n, "conn"), func() error {
			v, err := upload(addr(r.front.Sink), n, cfg.w, up.sink)
			return record(fmt.Sprintf("up%d", n), v, err)
		})
	}
	for _, n := range []int{1, 8} {
		r.step(up, "download, "+plural(n, "conn"), func() error {
			v, err := download(addr(r.front.Source), n, cfg.w)
			return record(fmt.Sprintf("down%d", n), v, err)
		})
	}
}

// probe waits until data passes through every front port of the proxy.
func probe(c *child, front ports, up *upstreams, timeout time.Duration) error {
	return waitReady(c, timeout, func() error { return probeOnce(front, up) })
}

// waitReady runs once until it succeeds, the child exits or timeout passes.
func waitReady(c *child, timeout time.Duration, once func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if c.exited() {
			return errors.New(c.why())
		}
		if last = once(); last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	if c.exited() {
		return errors.New(c.why())
	}
	return fmt.Errorf("no data through it within %v: %v", timeout, last)
}

func probeOnce(front ports, up *upstreams) error {
	dial := func(port int) (net.Conn, error) {
		c, err := net.DialTimeout("tcp", addr(port), time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(time.Second))
		}
		return c, err
	}
	return probeWith(dial, front, up)
}

// probeWith is probeOnce with connections that dial opens.
func probeWith(dial func(port int) (net.Conn, error), front ports, up *upstreams) error {
	// echo: one round trip
	c, err := dial(front.Echo)
	if err != nil {
		return err
	}
	err = roundTrip(c, []byte("probe"), make([]byte, 5))
	c.Close()
	if err != nil {
		return fmt.Errorf("echo: %v", err)
	}
	// source: some bytes arrive
	if c, err = dial(front.Source); err != nil {
		return err
	}
	_, err = c.Read(make([]byte, 1))
	c.Close()
	if err != nil {
		return fmt.Errorf("source: %v", err)
	}
	// sink: the bytes reach it
	if c, err = dial(front.Sink); err != nil {
		return err
	}
	defer c.Close()
	before := up.sink.read.Load()
	if _, err := c.Write([]byte("probe")); err != nil {
		return fmt.Errorf("sink: %v", err)
	}
	for range 100 {
		if up.sink.read.Load() >= before+5 {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("sink: bytes did not arrive")
}

// turnRounds is how many rounds the tests that take turns between the
// proxies run (short connections, latency, UDP rate and new flows, TLS,
// stream settings):
// each proxy runs once per round, so that a change in the machine's speed
// during the run weighs on all of them alike.
const turnRounds = 3

// turnWindow is the window of one round: -duration shared out between the
// rounds, each with the whole warm-up.
func turnWindow(w window) window {
	return window{warmup: w.warmup, dur: max((w.dur / turnRounds).Round(time.Millisecond), 100*time.Millisecond)}
}

// udpRun is one proxy in the UDP rate test.
type udpRun struct {
	p       proxy
	res     *result
	c       *child // nil for direct
	front   int
	meter   *cpuMeter
	st      udpStats
	counted time.Duration
	errs    map[string]bool // notes already made
}

// runUDP measures the proxies over UDP. All of them start, the rate test
// takes turns between them for turnRounds rounds, and they stop; then the
// NAT entry test runs on a fresh process of each, so that neither test
// sees what the other left in the proxy.
func runUDP(ps []proxy, cfg config, up *upstreams, tmp string) []result {
	results := make([]result, len(ps))
	var runs []*udpRun
	for i, p := range ps {
		res := &results[i]
		*res = result{name: p.name, values: map[string]float64{}}
		if p.noUDP != "" {
			res.na = p.noUDP
			continue
		}
		c, front, err := launchUDP(p, cfg, up, tmp, "udp", 0, udpEnding{})
		if err != nil {
			res.skipped = err.Error()
			continue
		}
		pids := []string{"self"}
		if c != nil {
			if pid, err := p.rssPID(c); err != nil {
				res.notes = append(res.notes, "proxy CPU: "+err.Error())
			} else {
				pids = append(pids, strconv.Itoa(pid))
			}
		}
		runs = append(runs, &udpRun{p: p, res: res, c: c, front: front, meter: newCPUMeter(pids...), errs: map[string]bool{}})
	}
	defer func() {
		for _, r := range runs {
			if r.c != nil {
				r.c.stop()
			}
		}
	}()

	round := turnWindow(cfg.w)
	for i := range turnRounds {
		for _, r := range runs {
			if r.c != nil && r.c.exited() {
				continue // noted when it died
			}
			udpStep(r.p, r.c, r.res, fmt.Sprintf("udp rate, round %d of %d", i+1, turnRounds), func() error {
				st, err := udpLoad(addr(r.front), cfg.udpSockets, cfg.udpWindow, round, r.meter.mark)
				r.st.add(st)
				r.counted += round.dur
				return newNote(r.errs, err)
			})
		}
	}
	for _, r := range runs {
		r.report(cfg)
		if r.res.values["loss"] >= udpLossTarget {
			r.stepDown(cfg)
		}
	}
	for _, r := range runs {
		if r.c != nil {
			r.c.stop()
			r.c = nil
		}
	}
	for _, r := range runs {
		if r.p.start != nil { // direct holds no NAT entries
			natUDP(r.p, cfg, up, tmp, r.res)
		}
	}
	flowsUDP(runs, cfg, up, tmp)
	return results
}

// report puts what the rounds measured in the result.
func (r *udpRun) report(cfg config) {
	st, res := r.st, r.res
	if st.rcvd[phaseCount] == 0 {
		return
	}
	res.values["dps"] = st.rate(window{dur: r.counted})
	res.values["loss"] = st.lossPercent()
	for i, key := range []string{"cpubench", "cpuproxy"}[:len(r.meter.pids)] {
		if v, ok := r.meter.percent(i); ok {
			res.values[key] = v
		}
	}
	if v, ok := res.values["cpuproxy"]; ok {
		res.values["cpudgram"] = v / 100 * 1e6 / res.values["dps"]
	}
	if cfg.pin {
		res.notes = append(res.notes, otherLoad(r.meter, res.values)...)
	}
	if lost := st.sent[phaseCount] - st.echoed[phaseCount]; lost > 0 {
		res.notes = append(res.notes, fmt.Sprintf("udp: %d of %d datagrams lost", lost, st.sent[phaseCount]))
	}
}

// stepDown looks for the best rate under the loss target: it halves the
// window, up to three times, with short runs.
func (r *udpRun) stepDown(cfg config) {
	short := window{warmup: cfg.w.warmup, dur: min(cfg.w.dur, time.Second)}
	last := cfg.udpWindow
	for win, tries := cfg.udpWindow/2, 0; win >= 1 && tries < 3 && (r.c == nil || !r.c.exited()); win, tries = win/2, tries+1 {
		last = win
		found := false
		udpStep(r.p, r.c, r.res, fmt.Sprintf("udp rate, %s x %d", plural(cfg.udpSockets, "socket"), win), func() error {
			st, err := udpLoad(addr(r.front), cfg.udpSockets, win, short, nil)
			if err == nil && st.lossPercent() < udpLossTarget {
				r.res.values["dpsok"] = st.rate(short)
				r.res.notes = append(r.res.notes, fmt.Sprintf("udp: loss %.3f%% with %d in flight per socket", st.lossPercent(), win))
				found = true
			}
			return err
		})
		if found {
			return
		}
	}
	r.res.notes = append(r.res.notes, fmt.Sprintf("udp: loss stayed at %g%% or more down to %d in flight per socket", udpLossTarget, last))
}

// launchUDP starts p relaying a UDP port to the UDP echo, in a dir of its
// own, and waits until an echo comes through. For direct it returns no
// child and the echo's own port.
func launchUDP(p proxy, cfg config, up *upstreams, tmp, phase string, entries int, end udpEnding) (*child, int, error) {
	echo := up.udp.port()
	if p.start == nil {
		return nil, echo, nil
	}
	bin, err := lookBinary(p.binary(&cfg))
	if err != nil {
		return nil, 0, err
	}
	front, err := freeUDPPort()
	if err != nil {
		return nil, 0, err
	}
	s := setup{name: p.name, dir: filepath.Join(tmp, p.name+"-"+phase), up: ports{UDP: echo}, front: ports{UDP: front},
		binary: bin, pin: cfg.pin, udpEntries: entries, udpEnd: end}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return nil, 0, err
	}
	fmt.Fprintf(os.Stderr, "%s: %s: starting\n", p.name, phase)
	c, err := p.start(s)
	if err != nil {
		return nil, 0, fmt.Errorf("start: %v", err)
	}
	if err := waitReady(c, cfg.startTimeout, func() error { return probeUDP(addr(front)) }); err != nil {
		c.stop()
		if dirSays(s.dir, noUDPYet) {
			return nil, 0, fmt.Errorf("%s has no UDP relay yet: %q", p.name, noUDPYet)
		}
		return nil, 0, err
	}
	return c, front, nil
}

// noUDPYet is what bin/aegis says of a UDP stream before it has a UDP relay.
const noUDPYet = "UDP streams are not available in this version yet"

// dirSays reports whether a file in dir, such as the child's output or
// its log, holds s.
func dirSays(dir, s string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join(dir, e.Name())); err == nil && strings.Contains(string(b), s) {
			return true
		}
	}
	return false
}

// probeUDP sends one datagram to addr and waits for its echo.
func probeUDP(addr string) error {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Write([]byte("probe")); err != nil {
		return err
	}
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != "probe" {
		return fmt.Errorf("echo %q, want %q", buf[:n], "probe")
	}
	return nil
}

// udpStep runs a UDP test on c, noting its error and whether c died.
func udpStep(p proxy, c *child, res *result, what string, f func() error) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", p.name, what)
	if err := f(); err != nil {
		res.notes = append(res.notes, what+": "+err.Error())
	}
	if c != nil && c.exited() {
		res.notes = append(res.notes, "died during "+what+": "+c.why())
	}
}

// natUDP measures memory per NAT entry on a fresh proxy process.
func natUDP(p proxy, cfg config, up *upstreams, tmp string, res *result) {
	c, front, err := launchUDP(p, cfg, up, tmp, "udp-nat", cfg.udpEntries, udpEnding{})
	if err != nil {
		res.notes = append(res.notes, "NAT entries: "+err.Error())
		return
	}
	defer c.stop()
	udpStep(p, c, res, fmt.Sprintf("NAT entries, %d", cfg.udpEntries), func() error {
		pid, err := p.rssPID(c)
		if err != nil {
			return err
		}
		r, err := natEntries(addr(front), cfg.udpEntries, natClientPorts(),
			func() (int64, error) { return rssKB(pid) }, func() (int, error) { return openFDs(pid) })
		if r.entries > 0 {
			res.values["natmem"] = r.kb
			res.values["nat"] = float64(r.entries)
			if r.fdsAdded >= 0 {
				res.values["natfds"] = float64(r.fdsAdded)
				if r.fdsAdded < r.entries*99/100 {
					res.notes = append(res.notes, fmt.Sprintf("NAT entries: the proxy opened %d sockets for %d client sockets: it did not hold them all",
						r.fdsAdded, r.entries))
				}
			}
		}
		return err
	})
}

// otherLoad notes other work on the bench's CPU 0 and the proxy's CPU 1
// during the counted part: on a shared machine it skews the rates.
func otherLoad(m *cpuMeter, values map[string]float64) []string {
	return cpuNotes("udp: ", m, values)
}

// cpuNotes is otherLoad for any test: each note starts with prefix, and
// values holds the test's cpubench and cpuproxy.
func cpuNotes(prefix string, m *cpuMeter, values map[string]float64) []string {
	var out []string
	for cpu, key := range []string{"cpubench", "cpuproxy"} {
		own, ran := values[key]
		busy, ok := m.cpuPercent(cpu)
		if !ok || !ran {
			continue // direct: nothing of ours on CPU 1
		}
		if other := busy - own; other >= 10 {
			out = append(out, fmt.Sprintf("%sother work took about %.0f%% of CPU %d during the counted part: the rate is skewed", prefix, other, cpu))
		}
	}
	// In a closed loop one side or the other is busy; when neither is and
	// no other work explains it, something outside the machine's view
	// (such as the VM's host) held them back.
	b, okb := values["cpubench"]
	p, okp := values["cpuproxy"]
	if len(out) == 0 && okb && okp && b < 80 && p < 80 {
		out = append(out, fmt.Sprintf("%sneither the proxy (%.0f%% CPU) nor the bench (%.0f%%) kept its CPU busy: the rate is skewed", prefix, p, b))
	}
	return out
}

// workDir makes the run's temporary directory, which cleanup removes
// unless -keep is set, and on Ctrl-C or SIGTERM kills every child group,
// removes it and exits saying the run was stopped.
func workDir(cfg config, prefix, stopped string) (dir string, cleanup func(), err error) {
	dir, err = os.MkdirTemp("", prefix)
	if err != nil {
		return "", nil, err
	}
	cleanup = func() {}
	if cfg.keep {
		fmt.Fprintln(os.Stderr, "configs, databases and logs in", dir)
	} else {
		cleanup = func() { os.RemoveAll(dir) }
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		killAll()
		cleanup()
		fmt.Fprintf(os.Stderr, "\naegis-bench: %v, %s\n", s, stopped)
		os.Exit(130)
	}()
	return dir, cleanup, nil
}

// newNote returns err unless errs holds it already (it was noted in an
// earlier round), and records it.
func newNote(errs map[string]bool, err error) error {
	if err == nil || errs[err.Error()] {
		return nil
	}
	errs[err.Error()] = true
	return err
}
