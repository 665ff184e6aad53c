package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// The soak (make soak, aegis-bench -soak 10m): bin/aegis runs for the
// whole time under a steady mix of TCP, UDP and TLS clients while the
// REST API changes something every second; then the load stops and the
// checks run: no goroutine, fd or memory growth beyond the bounds below,
// and every connection accounted for (accepted = closed + active).

// soakConfig is what -soak and the -soak-* flags set.
type soakConfig struct {
	dur    time.Duration // load time; 0: no soak
	warmup time.Duration // load before the baseline sample
	every  time.Duration // time between samples
	rate   float64       // scales every connection rate
}

// soakFlags registers the soak's flags.
func soakFlags() *soakConfig {
	s := &soakConfig{}
	flag.DurationVar(&s.dur, "soak", 0, "instead of the benchmark, soak bin/aegis for this long (make soak): TCP, UDP and TLS load with an API change every second, then leak and accounting checks")
	flag.DurationVar(&s.warmup, "soak-warmup", time.Minute, "soak load before the baseline sample (at most a third of -soak)")
	flag.DurationVar(&s.every, "soak-sample", 10*time.Second, "time between the soak's samples of the aegis process")
	flag.Float64Var(&s.rate, "soak-rate", 1, "scales the soak's connection rates (1: about 200 connections a second)")
	return s
}

// The bounds of the leak checks. The idle samples, before and after the
// load, see the same streams and certificates, the same database
// connections (warmed up before the first) and no API connection: what
// differs is transient.
const (
	// Goroutines at rest after the load, over those at rest before it:
	// timers and pool workers of the runtime and Caddy that come and go.
	// A leak of one goroutine per thousand connections would pass 100.
	boundGoroutinesIdle = 16
	// Over the baseline taken under load: that one holds the load's own
	// goroutines (two per proxied connection), so at rest it is lower.
	boundGoroutinesBase = 32
	// Open fds at rest after the load, over those at rest before: a
	// database connection reopened (db and wal files) or a log file.
	boundFDsIdle = 8
	// Over the baseline under load.
	boundFDsBase = 16
	// RSS over the baseline: the Go heap's and SQLite's caches may grow
	// with the connection log; more is a leak.
	boundRSSMB  = 30
	boundRSSPct = 25
	// The live Go heap (after a collection) at rest after the load over
	// the one before: 100 bytes kept per connection would pass it.
	boundHeapMB = 16
)

// soakMain runs the soak and prints its report. It returns the exit code:
// 1 if a check failed or the soak could not run.
func soakMain(cfg config, s soakConfig) int {
	if s.every <= 0 || s.rate <= 0 || s.warmup < 0 {
		fmt.Fprintln(os.Stderr, "aegis-bench: -soak-sample and -soak-rate must be positive, -soak-warmup not negative")
		return 2
	}
	s.warmup = min(s.warmup, s.dur/3)
	if err := raiseFileLimit(); err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench: could not raise the open file limit:", err)
	}
	tmp, cleanup, err := workDir(cfg, "aegis-soak-", "soak stopped")
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench:", err)
		return 1
	}
	defer cleanup()

	r := &soakRun{s: s, started: time.Now()}
	err = r.run(cfg, tmp)
	if r.reported {
		fmt.Print(r.report())
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "aegis-bench: soak:", err)
		return 1
	}
	if r.failed() > 0 {
		return 1
	}
	return 0
}

// loadKind is one kind of client load on one stream.
type loadKind struct {
	st   *soakStream
	what string // "short", "long" or "udp"
	mode connMode
	rate float64 // short and udp: attempts a second, before -soak-rate
	held int     // long: connections held at once
	t    *tally
}

// soakRun is one soak.
type soakRun struct {
	s       soakConfig
	started time.Time
	loadAvg [2]string

	a     *soakAegis
	up    *soakUpstreams
	ss    *soakStreams
	ring  *certRing
	load  *soakLoad
	churn *churn
	plan  []*loadKind

	loadTime                              time.Duration
	idleStart, baseline, endLoad, idleEnd soakSample
	haveBaseline                          bool
	samples                               []soakSample
	acct                                  []acctRow
	scan                                  logScan
	exit                                  string // how aegis ended
	crash                                 string
	checks                                []soakCheck
	reported                              bool // run got far enough for a report
}

// acctRow is one stream's accounting at the end.
type acctRow struct {
	st      *soakStream
	exact   bool  // the clients' count must equal total_connections
	reached int64 // connections (and UDP sessions) the clients saw accepted
	status  spec.Status
	log     logCount
	lines   int64 // "connection" lines in aegis's log file
	// bytes: the clients' byte counts must equal the stats' and the log's
	// (plain echo streams, where every byte the client sends or reads
	// passes the proxy's counters as it is).
	bytes      bool
	sent, rcvd int64
}

// soakCheck is one pass/fail line of the report.
type soakCheck struct {
	name   string
	ok     bool
	detail string
}

func (r *soakRun) check(name string, ok bool, format string, args ...any) {
	r.checks = append(r.checks, soakCheck{name: name, ok: ok, detail: fmt.Sprintf(format, args...)})
}

func (r *soakRun) failed() int {
	n := 0
	for _, c := range r.checks {
		if !c.ok {
			n++
		}
	}
	return n
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "soak: "+format+"\n", args...)
}

// run sets up, loads, winds down and checks.
func (r *soakRun) run(cfg config, tmp string) error {
	r.loadAvg[0] = loadAverage()
	var err error
	if r.up, err = startSoakUpstreams(); err != nil {
		return fmt.Errorf("upstreams: %v", err)
	}
	defer r.up.close()
	// One certificate per replacement (one every 8 s), and room to spare.
	if r.ring, err = newCertRing(int(r.s.dur/(8*time.Second)) + 8); err != nil {
		return fmt.Errorf("certificates: %v", err)
	}
	spare, err := newBenchCert(time.Now())
	if err != nil {
		return fmt.Errorf("certificates: %v", err)
	}
	if r.load, err = newSoakLoad(r.ring); err != nil {
		return err
	}

	progress("starting %s", cfg.aegis)
	if r.a, err = startSoakAegis(cfg.aegis, tmp, cfg.startTimeout); err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			r.a.c.stop()
		}
	}()
	var cs spec.CertStatus
	if err := r.a.call("POST", "/api/v1/certificates", certInput("soak", r.ring.gens[0]), http.StatusCreated, &cs); err != nil {
		return fmt.Errorf("uploading the certificate: %v", err)
	}
	if r.ss, err = createSoakStreams(r.a, r.up.echo.port(), r.up.pp2.port(), cs.ID); err != nil {
		return fmt.Errorf("creating the streams: %v", err)
	}
	r.churn = newChurn(r.a, r.ss, r.ring, cs.ID, spare)
	r.makePlan()
	if err := r.probe(); err != nil {
		return err
	}
	if err := r.waitIdle(time.Minute); err != nil {
		return fmt.Errorf("waiting for the probes' connections to end: %v", err)
	}
	r.warmReaders()
	if r.idleStart, err = r.a.idleSample("idle start", 0); err != nil {
		return fmt.Errorf("sampling aegis: %v", err)
	}
	r.reported = true

	progress("load for %v, baseline after %v, a sample every %v", r.s.dur, r.s.warmup, r.s.every)
	if err := r.runLoad(); err != nil {
		return err
	}

	progress("load stopped; restoring soak-toggle, soak-temp and the certificates as they were")
	r.churn.restore()
	if err := r.waitIdle(90 * time.Second); err != nil {
		return fmt.Errorf("waiting for every connection and UDP session to end: %v", err)
	}
	if err := r.account(); err != nil {
		return err
	}
	if r.idleEnd, err = r.a.idleSample("idle end", r.loadTime); err != nil {
		return fmt.Errorf("sampling aegis: %v", err)
	}

	r.a.c.stop()
	stopped = true
	r.exit = fmt.Sprint(r.a.c.err)
	r.crash = crashed(r.a.c.out)
	if r.scan, err = scanAegisLog(r.a.logFile); err != nil {
		return fmt.Errorf("reading aegis's log: %v", err)
	}
	for i := range r.acct {
		r.acct[i].lines = r.scan.conns[r.acct[i].st.spec.ID]
	}
	r.loadAvg[1] = loadAverage()
	r.evaluate()
	return nil
}

// makePlan sets the load: about 200 connections a second in all at
// -soak-rate 1, and 20 long-lived ones (those of soak-toggle and
// soak-temp are cut when the API turns their stream off).
func (r *soakRun) makePlan() {
	ss := r.ss
	add := func(st *soakStream, what string, mode connMode, rate float64, held int) {
		kind := what
		switch {
		case what == "udp":
			kind = "udp sessions"
		case mode == modePP2:
			kind += " pp2"
		case mode == modeTLS:
			kind += " tls"
		default:
			kind += " tcp"
		}
		gaps := st == ss.toggle || st == ss.temp
		r.plan = append(r.plan, &loadKind{st: st, what: what, mode: mode, rate: rate, held: held, t: newTally(st.spec.Name, kind, gaps)})
	}
	add(ss.tcp, "short", modePlain, 80, 0)
	add(ss.tcp, "long", modePlain, 0, 6)
	add(ss.pp2, "short", modePP2, 30, 0)
	add(ss.pp2, "long", modePP2, 0, 4)
	add(ss.udp, "udp", modePlain, 10, 0)
	add(ss.mixed, "short", modePlain, 20, 0)
	add(ss.mixed, "long", modePlain, 0, 3)
	add(ss.mixed, "udp", modePlain, 5, 0)
	add(ss.tls, "short", modeTLS, 20, 0)
	add(ss.tls, "long", modeTLS, 0, 3)
	add(ss.toggle, "short", modePlain, 10, 0)
	add(ss.toggle, "long", modePlain, 0, 2)
	add(ss.temp, "short", modePlain, 10, 0)
	add(ss.temp, "long", modePlain, 0, 2)
}

// probe makes one short connection (or UDP session) of each kind, counted
// like the load's, and fails if one does not succeed.
func (r *soakRun) probe() error {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 16<<10)
	for _, k := range r.plan {
		ok := k.t.outcomes[outOK].Load()
		switch k.what {
		case "short":
			r.load.shortConn(k.t, k.st.tg, k.mode, rng, buf)
		case "udp":
			r.load.udpSession(context.Background(), k.t, k.st.tg, rng, buf)
		default:
			continue
		}
		if k.t.outcomes[outOK].Load() == ok {
			return fmt.Errorf("probing %s (%s): %s", k.st.spec.Name, k.t.kind, strings.Join(k.t.failures(), "; "))
		}
	}
	return nil
}

// warmReaders opens the database's read connections (up to 4, kept 5
// minutes) with concurrent reads, as the counting at the end will, so
// that both idle samples see them open.
func (r *soakRun) warmReaders() {
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			r.a.connLog(r.ss.tcp.spec.ID)
		})
	}
	wg.Wait()
}

// waitIdle waits until no stream has an open connection or UDP session.
func (r *soakRun) waitIdle(timeout time.Duration) error {
	var last string
	err := waitFor(timeout, func() (bool, error) {
		st, err := r.a.stats()
		if err != nil {
			return false, err
		}
		var busy []string
		for _, s := range st {
			if s.ActiveConnections != 0 {
				busy = append(busy, fmt.Sprintf("%s: %d", s.Name, s.ActiveConnections))
			}
		}
		last = strings.Join(busy, ", ")
		return len(busy) == 0, nil
	})
	if err != nil && last != "" {
		return fmt.Errorf("%v; still active: %s", err, last)
	}
	return err
}

// runLoad runs the clients, the API churn and the sampler for the
// soak's duration.
func (r *soakRun) runLoad() error {
	ctx, cancel := context.WithTimeout(context.Background(), r.s.dur)
	defer cancel()
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, k := range r.plan {
		rate := k.rate * r.s.rate
		switch k.what {
		case "short":
			paced(ctx, &wg, rate, int(math.Ceil(rate/10))+2, func(rng *rand.Rand, buf []byte) {
				r.load.shortConn(k.t, k.st.tg, k.mode, rng, buf)
			})
		case "udp":
			// A session takes up to about 1.3 s.
			paced(ctx, &wg, rate, int(math.Ceil(rate*1.5))+2, func(rng *rand.Rand, buf []byte) {
				r.load.udpSession(ctx, k.t, k.st.tg, rng, buf)
			})
		case "long":
			held(ctx, &wg, k.held, r.s.dur, func(life time.Duration, rng *rand.Rand, buf []byte) {
				r.load.longConn(ctx, k.t, k.st.tg, k.mode, life, rng, buf)
			})
		}
	}

	// The API churn: one change a second.
	var side sync.WaitGroup
	side.Go(func() {
		tk := time.NewTicker(time.Second)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				r.churn.next()
			}
		}
	})
	// The sampler.
	var sampleErr error
	side.Go(func() {
		tk := time.NewTicker(r.s.every)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
			}
			at := time.Since(t0).Round(time.Second)
			s, err := r.a.sample("", at, false)
			if err != nil {
				sampleErr = fmt.Errorf("sampling aegis at %v: %v", at, err)
				cancel()
				return
			}
			r.samples = append(r.samples, s)
			if !r.haveBaseline && at >= r.s.warmup {
				r.baseline, r.haveBaseline = s, true
				r.baseline.label = "baseline"
			}
			calls, bad := r.churn.total()
			progress("%4v  goroutines %d  fds %d  RSS %.1f MB  heap %.1f MB  |  %s  |  API calls %d, unexpected %d",
				at, s.goroutines, s.fds, float64(s.rssKB)/1024, mb(s.heapInuse), r.loadSummary(), calls, bad)
			if r.a.c.exited() {
				sampleErr = fmt.Errorf("aegis %s", r.a.c.why())
				cancel()
				return
			}
		}
	})
	<-ctx.Done()
	r.loadTime = time.Since(t0).Round(time.Second)
	end, err := r.a.sample("end of load", r.loadTime, false)
	side.Wait()
	wg.Wait()
	if sampleErr != nil {
		return sampleErr
	}
	if err != nil {
		return fmt.Errorf("sampling aegis at the end of the load: %v", err)
	}
	r.endLoad = end
	if !r.haveBaseline {
		r.baseline, r.haveBaseline = end, true
		r.baseline.label = "baseline"
	}
	return nil
}

// loadSummary is the clients' counts so far, for the progress line.
func (r *soakRun) loadSummary() string {
	var ok, bad int64
	for _, k := range r.plan {
		ok += k.t.outcomes[outOK].Load()
		bad += k.t.unexpected()
	}
	return fmt.Sprintf("clients ok %d, failed %d", ok, bad)
}

// account reads each accounted stream's stats and connection log once
// every connection has ended, waiting for the log writer, which batches.
func (r *soakRun) account() error {
	reached := map[*soakStream]int64{}
	sent := map[*soakStream]int64{}
	rcvd := map[*soakStream]int64{}
	for _, k := range r.plan {
		reached[k.st] += k.t.reached.Load()
		sent[k.st] += k.t.sent.Load()
		rcvd[k.st] += k.t.rcvd.Load()
	}
	for _, st := range r.ss.accounted() {
		row := acctRow{st: st, exact: st != r.ss.toggle, reached: reached[st],
			bytes: st == r.ss.tcp || st == r.ss.pp2, sent: sent[st], rcvd: rcvd[st]}
		// Up to 15 s for the log writer (it writes a batch at least every
		// 200 ms) to catch up.
		for try := 0; ; try++ {
			stats, err := r.a.stats()
			if err != nil {
				return err
			}
			row.status = stats[st.spec.ID]
			if row.log, err = r.a.connLog(st.spec.ID); err != nil {
				return err
			}
			if row.log.rows+int64(row.status.LogEntriesDropped) >= int64(row.status.TotalConnections) || try == 5 {
				break
			}
			time.Sleep(3 * time.Second)
		}
		r.acct = append(r.acct, row)
	}
	return nil
}

// evaluate makes the checks.
func (r *soakRun) evaluate() {
	// Clients.
	var bad []string
	for _, k := range r.plan {
		if n := k.t.unexpected(); n > 0 {
			bad = append(bad, fmt.Sprintf("%s %s: %d (%s)", k.t.stream, k.t.kind, n, strings.Join(k.t.failures(), "; ")))
		}
	}
	r.check("clients: no unexpected failure", len(bad) == 0, "%s",
		orText(strings.Join(bad, "\n      "), "refused or cut only on soak-toggle and soak-temp, while the API had them off"))
	// The long-lived connections of soak-toggle and soak-temp outlive
	// the 4 s their stream stays on: cut when it goes off is their
	// success.
	var idle []string
	for _, k := range r.plan {
		t := k.t
		if t.outcomes[outOK].Load() == 0 && !(t.gaps && k.what == "long" && t.outcomes[outCut].Load() > 0) {
			idle = append(idle, t.stream+" "+t.kind)
		}
	}
	r.check("clients: every kind of load got through", len(idle) == 0, "%s",
		orText(strings.Join(idle, ", "), "each at least once (the long-lived ones of soak-toggle and soak-temp until the API cut them)"))

	// TLS certificates.
	cur := r.ring.current.Load()
	var unseen []string
	for g := int64(0); g < cur; g++ {
		if r.ring.served[g].Load() == 0 {
			unseen = append(unseen, fmt.Sprint(g))
		}
	}
	r.check("TLS: each certificate served until replaced, never after", len(unseen) == 0 && r.ring.stale.Load() == 0,
		"%d replacements; handshakes that got a replaced certificate: %d; certificates never served: %s",
		cur, r.ring.stale.Load(), orText(strings.Join(unseen, ", "), "none"))

	// API.
	calls, unexpected := r.churn.total()
	r.check("API: every call got the answer wanted", unexpected == 0 && calls > 0, "%d calls, %d unexpected%s",
		calls, unexpected, orText(prefixed("\n      ", r.churn.errs), ""))

	// Accounting.
	var acctBad []string
	for _, a := range r.acct {
		s := a.status
		name := a.st.spec.Name
		if s.ActiveConnections != 0 {
			acctBad = append(acctBad, fmt.Sprintf("%s: %d still active", name, s.ActiveConnections))
		}
		if a.log.rows+s.ActiveConnections != int64(s.TotalConnections) {
			acctBad = append(acctBad, fmt.Sprintf("%s: accepted %d != closed %d (log rows) + active %d", name, s.TotalConnections, a.log.rows, s.ActiveConnections))
		}
		if a.lines != int64(s.TotalConnections) {
			acctBad = append(acctBad, fmt.Sprintf("%s: accepted %d != %d connection lines in the log file", name, s.TotalConnections, a.lines))
		}
		if s.LogEntriesDropped != 0 {
			acctBad = append(acctBad, fmt.Sprintf("%s: %d log entries dropped", name, s.LogEntriesDropped))
		}
		if a.log.blocked != 0 || s.BlockedConnections != 0 {
			acctBad = append(acctBad, fmt.Sprintf("%s: %d blocked (%d logged), want none", name, s.BlockedConnections, a.log.blocked))
		}
		if a.exact && a.reached != int64(s.TotalConnections) {
			acctBad = append(acctBad, fmt.Sprintf("%s: accepted %d, but the clients connected %d times", name, s.TotalConnections, a.reached))
		}
		if !a.exact && int64(s.TotalConnections) > a.reached {
			acctBad = append(acctBad, fmt.Sprintf("%s: accepted %d, more than the clients' %d connections", name, s.TotalConnections, a.reached))
		}
	}
	r.check("accounting: accepted = closed + active, for every stream", len(acctBad) == 0, "%s",
		orText(strings.Join(acctBad, "\n      "), "stats, log rows (API), log file lines and the clients' own count agree; none active, none dropped"))
	var bytesBad []string
	for _, a := range r.acct {
		if !a.bytes {
			continue
		}
		s := a.status
		if uint64(a.sent) != s.BytesSent || a.log.sent != a.sent || uint64(a.rcvd) != s.BytesReceived || a.log.rcvd != a.rcvd {
			bytesBad = append(bytesBad, fmt.Sprintf("%s: up: clients %d, stats %d, log %d; down: clients %d, stats %d, log %d",
				a.st.spec.Name, a.sent, s.BytesSent, a.log.sent, a.rcvd, s.BytesReceived, a.log.rcvd))
		}
	}
	r.check("accounting: every byte of soak-tcp and soak-pp2 counted", len(bytesBad) == 0, "%s",
		orText(strings.Join(bytesBad, "\n      "), "the clients' bytes each way = stats = sum of the log rows"))

	// Leaks.
	is, ie, b := r.idleStart, r.idleEnd, r.baseline
	gd := fmt.Sprintf("idle %d -> %d (bound +%d), baseline %d (bound +%d)", is.goroutines, ie.goroutines, boundGoroutinesIdle, b.goroutines, boundGoroutinesBase)
	if ie.goroutines > is.goroutines {
		if grown := groupGrowth(is.profile, ie.profile, 5); len(grown) > 0 {
			gd += "; grown:" + prefixed("\n      ", grown)
		}
	}
	r.check("goroutines back to where they were", ie.goroutines <= is.goroutines+boundGoroutinesIdle && ie.goroutines <= b.goroutines+boundGoroutinesBase, "%s", gd)
	r.check("open fds back to where they were", ie.fds <= is.fds+boundFDsIdle && ie.fds <= b.fds+boundFDsBase,
		"idle %d -> %d (bound +%d), baseline %d (bound +%d)", is.fds, ie.fds, boundFDsIdle, b.fds, boundFDsBase)
	rssBound := max(b.rssKB+boundRSSMB<<10, b.rssKB*(100+boundRSSPct)/100)
	r.check("RSS growth bounded", r.endLoad.rssKB <= rssBound && ie.rssKB <= rssBound,
		"baseline %.1f MB, end of load %.1f MB, idle end %.1f MB; bound %.1f MB (baseline + %d MB or + %d%%, whichever is more)",
		kbMB(b.rssKB), kbMB(r.endLoad.rssKB), kbMB(ie.rssKB), kbMB(rssBound), boundRSSMB, boundRSSPct)
	r.check("live Go heap back to where it was", ie.heapAlloc <= is.heapAlloc+boundHeapMB<<20,
		"after a GC at rest: %.1f MB -> %.1f MB (bound +%d MB)", mb(is.heapAlloc), mb(ie.heapAlloc), boundHeapMB)

	// The process.
	r.check("aegis log: no error", r.scan.errorLevel() == 0 && r.crash == "",
		"%d lines: %s%s", r.scan.lines, levelList(r.scan.levels), orText(prefixed("\n      ", append(r.scan.trouble, nonEmpty(r.crash)...)), ""))
	r.check("aegis stops on SIGTERM", !strings.Contains(r.exit, "killed"), "exit: %s", r.exit)
}

func orText(s, dflt string) string {
	if s == "" {
		return dflt
	}
	return s
}

func prefixed(p string, lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(p + l)
	}
	return b.String()
}

func nonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return []string{s}
}

func levelList(levels map[string]int) string {
	var out []string
	for _, l := range []string{"debug", "info", "warn", "error", "dpanic", "panic", "fatal", "not JSON"} {
		if n := levels[l]; n > 0 {
			out = append(out, fmt.Sprintf("%s %d", l, n))
		}
	}
	return strings.Join(out, ", ")
}

func mb(b uint64) float64   { return float64(b) / (1 << 20) }
func kbMB(kb int64) float64 { return float64(kb) / 1024 }
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "?"
}

// report is the summary: the load, the API changes, the process samples,
// the accounting and the checks.
func (r *soakRun) report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "Aegis soak: %v of load (asked %v), baseline after %v, a sample every %v\n", r.loadTime, r.s.dur, r.s.warmup, r.s.every)
	fmt.Fprintf(&b, "load average: %s at start, %s at end (2 CPUs, shared)\n\n", r.loadAvg[0], orText(r.loadAvg[1], "?"))

	rows := [][]string{{"stream", "load", "attempts", "reached", "ok", "refused", "cut", "failed", "mismatch", "ok/s"}}
	var resent []string
	for _, k := range r.plan {
		t := k.t
		row := []string{t.stream, t.kind, fmt.Sprint(t.attempts.Load()), fmt.Sprint(t.reached.Load())}
		for o := range numOutcomes {
			row = append(row, fmt.Sprint(t.outcomes[o].Load()))
		}
		row = append(row, fmt.Sprintf("%.1f", float64(t.outcomes[outOK].Load())/max(r.loadTime.Seconds(), 1)))
		rows = append(rows, row)
		if k.what == "udp" {
			resent = append(resent, fmt.Sprintf("%s %d", t.stream, t.resent.Load()))
		}
	}
	b.WriteString("Clients (reached: TCP connections accepted, UDP sessions echoed; refused and cut are expected on soak-toggle and soak-temp only)\n")
	b.WriteString(grid(rows))
	fmt.Fprintf(&b, "UDP datagrams sent again after %v without an echo: %s\n", udpWait, strings.Join(resent, ", "))
	fmt.Fprintf(&b, "TLS: %d certificate replacements; handshakes that got a replaced certificate: %d\n\n", r.ring.current.Load(), r.ring.stale.Load())

	calls, unexpected := r.churn.total()
	fmt.Fprintf(&b, "API changes: %d calls, %d unexpected answers, streams moved off a port taken meanwhile: %d\n", calls, unexpected, r.churn.moved)
	rows = [][]string{{"change", "calls", "unexpected"}}
	for _, k := range r.churn.kinds {
		rows = append(rows, []string{k.name, fmt.Sprint(k.n), fmt.Sprint(k.unexpected)})
	}
	b.WriteString(grid(rows))
	b.WriteString("\n")

	b.WriteString("aegis process (idle: no connection, API connections closed, after a GC)\n")
	cols := []soakSample{r.idleStart, r.baseline, r.endLoad, r.idleEnd}
	rows = [][]string{{"", "idle start", fmt.Sprintf("baseline (%v)", r.baseline.at), fmt.Sprintf("end of load (%v)", r.endLoad.at), "idle end", "bound"}}
	line := func(name string, f func(s soakSample) string, bound string) {
		row := []string{name}
		for _, s := range cols {
			row = append(row, f(s))
		}
		rows = append(rows, append(row, bound))
	}
	line("goroutines", func(s soakSample) string { return fmt.Sprint(s.goroutines) },
		fmt.Sprintf("idle end <= idle start + %d and <= baseline + %d", boundGoroutinesIdle, boundGoroutinesBase))
	line("open fds", func(s soakSample) string { return fmt.Sprint(s.fds) },
		fmt.Sprintf("idle end <= idle start + %d and <= baseline + %d", boundFDsIdle, boundFDsBase))
	line("RSS, MB", func(s soakSample) string { return fmt.Sprintf("%.1f", kbMB(s.rssKB)) },
		fmt.Sprintf("<= baseline + max(%d MB, %d%%)", boundRSSMB, boundRSSPct))
	line("Go heap alloc, MB", func(s soakSample) string { return fmt.Sprintf("%.1f", mb(s.heapAlloc)) },
		fmt.Sprintf("idle end <= idle start + %d MB", boundHeapMB))
	line("Go heap in use, MB", func(s soakSample) string { return fmt.Sprintf("%.1f", mb(s.heapInuse)) }, "")
	b.WriteString(grid(rows))
	if tr := r.trend(); tr != "" {
		b.WriteString(tr)
	}
	b.WriteString("\n")

	b.WriteString("Samples under load\n")
	rows = [][]string{{"t", "goroutines", "fds", "RSS MB", "heap alloc MB", "heap in use MB", "GCs"}}
	for _, s := range r.samples {
		rows = append(rows, []string{s.at.String(), fmt.Sprint(s.goroutines), fmt.Sprint(s.fds), fmt.Sprintf("%.1f", kbMB(s.rssKB)),
			fmt.Sprintf("%.1f", mb(s.heapAlloc)), fmt.Sprintf("%.1f", mb(s.heapInuse)), fmt.Sprint(s.numGC)})
	}
	b.WriteString(grid(rows))
	b.WriteString("\n")

	if len(r.acct) > 0 {
		b.WriteString("Accounting at the end: accepted (total_connections) = closed (connection-log rows) + active\n")
		rows = [][]string{{"stream", "accepted", "active", "log rows", "log lines", "dropped", "clients reached", "disconnect reasons"}}
		for _, a := range r.acct {
			reached := fmt.Sprint(a.reached)
			if !a.exact {
				reached += " (>= accepted)"
			}
			rows = append(rows, []string{a.st.spec.Name, fmt.Sprint(a.status.TotalConnections), fmt.Sprint(a.status.ActiveConnections),
				fmt.Sprint(a.log.rows), fmt.Sprint(a.lines), fmt.Sprint(a.status.LogEntriesDropped), reached, reasonList(a.log.reasons)})
		}
		b.WriteString(grid(rows))
		b.WriteString("\n")
	}

	b.WriteString("Checks\n")
	for _, c := range r.checks {
		mark := "PASS"
		if !c.ok {
			mark = "FAIL"
		}
		fmt.Fprintf(&b, "%s  %s: %s\n", mark, c.name, c.detail)
	}
	if n := r.failed(); n > 0 {
		fmt.Fprintf(&b, "\nsoak: FAIL, %d of %d checks\n", n, len(r.checks))
	} else if len(r.checks) > 0 {
		fmt.Fprintf(&b, "\nsoak: PASS, all %d checks\n", len(r.checks))
	} else {
		b.WriteString("\nsoak: did not finish\n")
	}
	fmt.Fprintf(&b, "run took %v\n", time.Since(r.started).Round(time.Second))
	return b.String()
}

// trend is the least-squares slope, per minute, of each measure over the
// samples from the baseline on: a leak that the end's checks would
// only see in a longer run shows as a steady climb.
func (r *soakRun) trend() string {
	var xs []float64
	var ys [4][]float64
	for _, s := range r.samples {
		if s.at < r.baseline.at {
			continue
		}
		xs = append(xs, s.at.Minutes())
		ys[0] = append(ys[0], float64(s.goroutines))
		ys[1] = append(ys[1], float64(s.fds))
		ys[2] = append(ys[2], kbMB(s.rssKB))
		ys[3] = append(ys[3], mb(s.heapAlloc))
	}
	if len(xs) < 3 {
		return ""
	}
	return fmt.Sprintf("trend under load from the baseline on (%d samples), per minute: goroutines %+.1f, fds %+.1f, RSS %+.2f MB, heap alloc %+.2f MB\n",
		len(xs), slope(xs, ys[0]), slope(xs, ys[1]), slope(xs, ys[2]), slope(xs, ys[3]))
}

// slope is the least-squares slope of ys over xs.
func slope(xs, ys []float64) float64 {
	n := float64(len(xs))
	var sx, sy, sxx, sxy float64
	for i, x := range xs {
		sx += x
		sy += ys[i]
		sxx += x * x
		sxy += x * ys[i]
	}
	d := n*sxx - sx*sx
	if d == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / d
}

func reasonList(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var out []string
	for _, k := range keys {
		out = append(out, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(out, ", ")
}

// grid lays rows out in columns: the first left-aligned, the rest right.
func grid(rows [][]string) string {
	var widths []int
	for _, row := range rows {
		for i, s := range row {
			if i >= len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], len(s))
		}
	}
	var b strings.Builder
	for _, row := range rows {
		for i, s := range row {
			if i == 0 {
				fmt.Fprintf(&b, "%-*s", widths[i], s)
			} else {
				fmt.Fprintf(&b, "  %*s", widths[i], s)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// soakUpstreams are the soak's upstreams: a TCP and a UDP echo on the
// same port (for the tcp+udp stream, whose upstream port serves both),
// and the PROXY v2 echo.
type soakUpstreams struct {
	echo *upstream
	udp  *udpEcho
	pp2  *upstream
}

func startSoakUpstreams() (*soakUpstreams, error) {
	u := &soakUpstreams{}
	for try := 0; u.echo == nil; try++ {
		udp, err := startUDPEcho()
		if err != nil {
			return nil, err
		}
		ln, err := net.Listen("tcp", addr(udp.port()))
		if err != nil {
			udp.close()
			if try == 20 {
				return nil, fmt.Errorf("no port free for both TCP and UDP: %v", err)
			}
			continue
		}
		u.udp, u.echo = udp, &upstream{ln: ln, handle: serveEcho, conns: map[net.Conn]struct{}{}}
	}
	var err error
	if u.pp2, err = listenUpstream(servePP2Echo); err != nil {
		u.echo.ln.Close()
		u.udp.close()
		return nil, err
	}
	for _, s := range []*upstream{u.echo, u.pp2} {
		s.wg.Add(1)
		go s.accept()
	}
	return u, nil
}

func (u *soakUpstreams) close() {
	u.echo.close()
	u.pp2.close()
	u.udp.close()
}
