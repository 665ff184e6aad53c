package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// The features test (-tests features): the stream settings of issues 16,
// 17 and 22 on Aegis, and the same set-up on HAProxy, each measured as
// short connections per second and single-connection upload beside the
// plain stream of the same proxy in the same run. Both proxies run at
// once, each pinned to CPU 1, and take turns.

// featCase is one row pair of the features table: a set-up of one proxy
// port that carries the echo (short connections) or the sink (upload).
type featCase struct {
	key, label string
	// rr balances each port over three upstreams, round robin.
	rr bool
	// sni shares each port between two streams told apart by the TLS
	// server name (fu.certA's, fu.certB's), passed through to TLS
	// upstreams with those certificates; the clients speak TLS to the
	// upstream and send certA's name.
	sni bool
	// upstreamTLS has the proxy open TLS to a TLS upstream (certA's),
	// verified against its CA.
	upstreamTLS bool
	// perIP turns on the per-source connection cap, set high enough that
	// it refuses nothing.
	perIP bool
	// proxyProto has the clients go through a front HAProxy that sends a
	// PROXY v2 header, which the proxy requires.
	proxyProto bool
	// acl is the length of the whitelist, which admits the client with its
	// last entry; 0 is the plain one-entry whitelist (127.0.0.0/8).
	acl int
}

// featCases are the rows, plain first: the others' ratios are to it.
var featCases = []featCase{
	{key: "plain", label: "plain stream"},
	{key: "rr", label: "3 upstreams, round robin", rr: true},
	{key: "sni", label: "SNI-shared port, TLS passed through", sni: true},
	{key: "perip", label: fmt.Sprintf("max_connections_per_ip %d", perIPCap), perIP: true},
	{key: "pp", label: "PROXY v2 required, behind a front HAProxy", proxyProto: true},
	{key: "uptls", label: "TLS to the upstream, verified", upstreamTLS: true},
	{key: "acl10", label: "whitelist of 10 entries", acl: 10},
	{key: "acl100k", label: "whitelist of 100,000 entries", acl: 100_000},
}

// perIPCap is the per-source cap of the perip row: far above the 8
// workers' connections, so that only the counting costs.
const perIPCap = 1000

// The names of the TLS upstreams' certificates.
const (
	featNameA = "a.bench.test"
	featNameB = "b.bench.test"
)

// featUps are the features test's upstreams: the TCP test's echo and sink,
// two more of each for round robin (the extra sinks count into up.sink's
// bytes, so that an upload counts wherever it went), and TLS servers.
type featUps struct {
	*upstreams
	echoes, sinks []*upstream // the round robin groups, up.echo and up.sink first
	certA, certB  *benchCert
	tlsEchoA      *upstream // TLS echo with certA
	tlsSinkA      *upstream // TLS sink with certA
	tlsEchoB      *upstream // TLS echo with certB
	extra         []*upstream
	// handshakes the TLS upstreams completed: full ones and resumed ones
	full, resumed atomic.Int64
}

func startFeatUps(up *upstreams) (fu *featUps, err error) {
	fu = &featUps{upstreams: up, echoes: []*upstream{up.echo}, sinks: []*upstream{up.sink}}
	defer func() {
		if err != nil {
			fu.close()
		}
	}()
	add := func(handle func(s *upstream, c net.Conn)) (*upstream, error) {
		s, err := listenUpstream(nil)
		if err != nil {
			return nil, err
		}
		s.handle = func(c net.Conn) { handle(s, c) }
		fu.extra = append(fu.extra, s)
		s.serve()
		return s, nil
	}
	echo := func(_ *upstream, c net.Conn) { serveEcho(c) }
	for range 2 {
		e, err := add(echo)
		if err != nil {
			return nil, err
		}
		s, err := add(func(_ *upstream, c net.Conn) { up.sink.serveSink(c) })
		if err != nil {
			return nil, err
		}
		fu.echoes, fu.sinks = append(fu.echoes, e), append(fu.sinks, s)
	}
	now := time.Now()
	if fu.certA, err = newBenchCertFor(now, featNameA); err != nil {
		return nil, err
	}
	if fu.certB, err = newBenchCertFor(now, featNameB); err != nil {
		return nil, err
	}
	overTLS := func(bc *benchCert, serve func(s *upstream, c net.Conn)) (*upstream, error) {
		pair, err := tls.X509KeyPair([]byte(bc.chainPEM), []byte(bc.keyPEM))
		if err != nil {
			return nil, err
		}
		cfg := &tls.Config{Certificates: []tls.Certificate{pair}}
		return add(func(s *upstream, c net.Conn) {
			tc := tls.Server(c, cfg)
			c.SetDeadline(time.Now().Add(dialTimeout))
			if tc.Handshake() != nil {
				return
			}
			c.SetDeadline(time.Time{})
			if tc.ConnectionState().DidResume {
				fu.resumed.Add(1)
			} else {
				fu.full.Add(1)
			}
			serve(s, tc)
		})
	}
	if fu.tlsEchoA, err = overTLS(fu.certA, echo); err != nil {
		return nil, err
	}
	if fu.tlsSinkA, err = overTLS(fu.certA, (*upstream).serveSink); err != nil {
		return nil, err
	}
	if fu.tlsEchoB, err = overTLS(fu.certB, echo); err != nil {
		return nil, err
	}
	return fu, nil
}

func (fu *featUps) closeConns() {
	fu.upstreams.closeConns()
	for _, s := range fu.extra {
		s.closeConns()
	}
}

// close stops the upstreams started here, not the TCP test's.
func (fu *featUps) close() {
	for _, s := range fu.extra {
		s.close()
	}
}

// groups are the upstreams of c's echo (sink false) or sink port: one
// group per stream on the port (two with sni, for certA's and certB's
// names), each balanced over its upstreams.
func (c *featCase) groups(fu *featUps, sink bool) [][]*upstream {
	switch {
	case c.rr && sink:
		return [][]*upstream{fu.sinks}
	case c.rr:
		return [][]*upstream{fu.echoes}
	case c.sni && sink:
		return [][]*upstream{{fu.tlsSinkA}, {fu.tlsEchoB}}
	case c.sni:
		return [][]*upstream{{fu.tlsEchoA}, {fu.tlsEchoB}}
	case c.upstreamTLS && sink:
		return [][]*upstream{{fu.tlsSinkA}}
	case c.upstreamTLS:
		return [][]*upstream{{fu.tlsEchoA}}
	case sink:
		return [][]*upstream{{fu.sink}}
	}
	return [][]*upstream{{fu.echo}}
}

// certs are the certificates whose names pick the streams of an SNI
// port, one per group; nil for the other cases.
func (c *featCase) certs(fu *featUps) []*benchCert {
	if c.sni {
		return []*benchCert{fu.certA, fu.certB}
	}
	return nil
}

// whitelist is c's whitelist: acl-1 addresses that are not the client's,
// every other one of 10.0.0.0/8 so that none merge, then 127.0.0.0/8.
func (c *featCase) whitelist() []string {
	n := max(c.acl, 1)
	out := make([]string, 0, n)
	for i := range n - 1 {
		ip := 0x0a000000 + 2*uint32(i)
		out = append(out, fmt.Sprintf("%d.%d.%d.%d/32", ip>>24, ip>>16&255, ip>>8&255, ip&255))
	}
	return append(out, "127.0.0.0/8")
}

// featRoute is one port of one case on one proxy.
type featRoute struct {
	c    *featCase
	sink bool
	port int // the proxy's port
	dial int // where the clients connect: port, or the front's port for it
}

func (r *featRoute) name() string {
	if r.sink {
		return r.c.key + "_sink"
	}
	return r.c.key + "_echo"
}

// aegisFeatures is the aegis config of routes: one stream per group of
// each route, with the case's settings.
func aegisFeatures(adminPort int, logFile string, fu *featUps, routes []*featRoute) ([]byte, error) {
	var hosts []spec.Stream
	for _, r := range routes {
		certs := r.c.certs(fu)
		for i, g := range r.c.groups(fu, r.sink) {
			h := benchStream(int64(len(hosts)+1), fmt.Sprintf("bench-%s-%d", r.name(), i), r.port, g[0].port())
			if len(g) > 1 {
				for _, u := range g {
					h.Upstreams = append(h.Upstreams, spec.Upstream{Host: "127.0.0.1", Port: u.port()})
				}
				h.LoadBalancing = "round_robin"
			}
			if certs != nil {
				h.SNI = []string{certs[i].name}
			}
			if r.c.upstreamTLS {
				h.UpstreamTLS, h.UpstreamTLSServerName, h.UpstreamTLSCA = true, fu.certA.name, fu.certA.caPEM
			}
			if r.c.perIP {
				h.MaxConnectionsPerIP = perIPCap
			}
			if r.c.proxyProto {
				h.AcceptProxyProtocol, h.TrustedProxyCIDRs = "required", []string{"127.0.0.1/32"}
			}
			if r.c.acl > 0 {
				h.WhitelistCIDRs = r.c.whitelist()
			}
			hosts = append(hosts, h)
		}
	}
	return aegisJSON(adminPort, logFile, hosts, "")
}

// haproxyFeatures is the HAProxy config of routes, with the files it
// names (the whitelists and the CA), by name in dir.
func haproxyFeatures(dir string, fu *featUps, routes []*featRoute) (string, map[string]string) {
	files := map[string]string{}
	var b strings.Builder
	b.WriteString(haproxyHead)
	for _, r := range routes {
		c, name := r.c, r.name()
		fmt.Fprintf(&b, "\nfrontend fe_%s\n    bind 127.0.0.1:%d", name, r.port)
		if c.proxyProto {
			b.WriteString(" accept-proxy")
		}
		if c.acl > 0 {
			file := filepath.Join(dir, "whitelist-"+c.key+".txt")
			files[file] = strings.Join(c.whitelist(), "\n") + "\n"
			fmt.Fprintf(&b, "\n    tcp-request connection reject if !{ src -f %s }\n", file)
		} else {
			b.WriteString("\n    tcp-request connection reject if !{ src 127.0.0.0/8 }\n")
		}
		if c.perIP {
			fmt.Fprintf(&b, "    stick-table type ip size 100k expire 30s store conn_cur\n"+
				"    tcp-request connection track-sc0 src\n"+
				"    tcp-request connection reject if { sc0_conn_cur gt %d }\n", perIPCap)
		}
		certs := c.certs(fu)
		if certs != nil {
			b.WriteString("    tcp-request inspect-delay 5s\n    tcp-request content accept if { req.ssl_hello_type 1 }\n")
		}
		groups := c.groups(fu, r.sink)
		for i := range groups {
			if certs != nil {
				fmt.Fprintf(&b, "    use_backend be_%s_%d if { req.ssl_sni -i %s }\n", name, i, certs[i].name)
			} else {
				fmt.Fprintf(&b, "    default_backend be_%s_%d\n", name, i)
			}
		}
		opts := ""
		if c.upstreamTLS {
			file := filepath.Join(dir, "ca-"+fu.certA.name+".pem")
			files[file] = fu.certA.caPEM
			opts = fmt.Sprintf(" ssl verify required ca-file %s sni str(%s) verifyhost %s", file, fu.certA.name, fu.certA.name)
		}
		for i, g := range groups {
			fmt.Fprintf(&b, "\nbackend be_%s_%d\n", name, i)
			if len(g) > 1 {
				b.WriteString("    balance roundrobin\n")
			}
			for j, u := range g {
				fmt.Fprintf(&b, "    server s%d 127.0.0.1:%d%s\n", j, u.port(), opts)
			}
		}
	}
	return b.String(), files
}

// haproxyFront is the config of the front HAProxy: each route relayed from
// its dial port to its proxy's port with a PROXY v2 header.
func haproxyFront(routes []*featRoute) string {
	var b strings.Builder
	b.WriteString(haproxyHead)
	for i, r := range routes {
		fmt.Fprintf(&b, "\nfrontend fe_%d\n    bind 127.0.0.1:%d\n    default_backend be_%d\n\nbackend be_%d\n    server s0 127.0.0.1:%d send-proxy-v2\n",
			i, r.dial, i, i, r.port)
	}
	return b.String()
}

// featStarters start the proxies of the features test.
var featStarters = map[string]func(s setup, fu *featUps, routes []*featRoute, admin int) (*child, error){
	"aegis": func(s setup, fu *featUps, routes []*featRoute, admin int) (*child, error) {
		cfg, err := aegisFeatures(admin, filepath.Join(s.dir, "aegis.log"), fu, routes)
		if err != nil {
			return nil, err
		}
		return launchAegis(s, cfg)
	},
	"haproxy": func(s setup, fu *featUps, routes []*featRoute, _ int) (*child, error) {
		cfg, files := haproxyFeatures(s.dir, fu, routes)
		for file, text := range files {
			if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
				return nil, err
			}
		}
		return launchHAProxy(s, cfg)
	},
}

// featRun is one proxy in the features test.
type featRun struct {
	p      proxy
	res    *result
	c      *child
	dir    string
	admin  int                   // aegis's admin port
	routes map[string]*featRoute // by name()
	sums   map[string]float64    // by metric key, summed over the rounds
	rounds map[string]int        // by metric key, the rounds summed
	rr     []int64               // round robin: connections per upstream, all rounds
	hs     map[string][2]int64   // by case key: full and resumed handshakes at the TLS upstream in its short conns
	pid    string                // the proxy's process, for its CPU, or ""
	meters map[string]*cpuMeter  // by case key: the proxy's CPU in the short conns
	errs   map[string]bool       // notes already made
}

// runFeatures measures the features test on the proxies of ps that have a
// starter, and returns their results and what the checks found.
func runFeatures(ps []proxy, cfg config, up *upstreams, tmp string) ([]result, []string) {
	fu, err := startFeatUps(up)
	if err != nil {
		return nil, []string{"features: the upstreams: " + err.Error()}
	}
	defer fu.close()
	var results []result
	var skippedNames []string
	for _, p := range ps {
		if featStarters[p.name] != nil {
			results = append(results, result{name: p.name, values: map[string]float64{}})
		} else if p.name != "direct" {
			skippedNames = append(skippedNames, p.name)
		}
	}
	var notes []string
	if len(skippedNames) > 0 {
		notes = append(notes, "features: not set up for "+strings.Join(skippedNames, ", "))
	}
	var runs []*featRun
	defer func() {
		for _, r := range runs {
			r.c.stop()
		}
	}()
	var viaFront []*featRoute
	for i := range results {
		res := &results[i]
		r, err := launchFeatures(ps, res.name, cfg, fu, tmp)
		if err != nil {
			res.skipped = err.Error()
			continue
		}
		r.res = res
		runs = append(runs, r)
		for _, rt := range r.routes {
			if rt.c.proxyProto {
				viaFront = append(viaFront, rt)
			}
		}
	}
	if len(viaFront) > 0 {
		front, err := launchFront(cfg, viaFront, fu, tmp)
		if err != nil {
			notes = append(notes, "features: the front HAProxy: "+err.Error())
		} else {
			defer front.stop()
		}
	}

	w, rounds := featRound(cfg.w)
	for round := range rounds {
		for i := range featCases {
			c := &featCases[i]
			for _, sink := range []bool{false, true} {
				// Each case and round starts with another proxy.
				for j := range runs {
					r := runs[(round+i+j)%len(runs)]
					if r.c.exited() {
						continue // noted when it died
					}
					rt := r.routes[(&featRoute{c: c, sink: sink}).name()]
					what := c.label + ", short conns"
					if sink {
						what = c.label + ", upload"
					}
					udpStep(r.p, r.c, r.res, fmt.Sprintf("features: %s, round %d of %d", what, round+1, rounds), func() error {
						var err error
						if sink {
							err = r.upload(rt, fu, w)
						} else {
							err = r.shortConns(rt, fu, cfg.workers, w)
						}
						return newNote(r.errs, err)
					})
					fu.closeConns()
				}
			}
		}
	}
	for _, r := range runs {
		for key, sum := range r.sums {
			r.res.values[key] = sum / float64(r.rounds[key])
		}
		for key, m := range r.meters {
			if p, ok := m.percent(0); ok && r.res.values["cps_"+key] > 0 && r.pid != "" {
				r.res.values["cpu_"+key] = p / 100 * 1e6 / r.res.values["cps_"+key]
			}
		}
		r.checkRR()
		for _, c := range featCases {
			if hs, ok := r.hs[c.key]; ok {
				r.res.notes = append(r.res.notes, fmt.Sprintf("check: %s: the TLS upstream completed %d handshakes in the short conns, %d of them resumed",
					c.label, hs[0]+hs[1], hs[1]))
			}
		}
		if r.p.name == "aegis" {
			r.aegisChecks()
		}
	}
	return results, notes
}

// featRound is the window of one test in one round, and the rounds:
// -duration shared out between turnRounds rounds after a warm-up of at
// most 200 ms, or all of it in one round if that would be under 100 ms.
func featRound(w window) (window, int) {
	warmup := min(w.warmup, 200*time.Millisecond)
	if w.dur/turnRounds < 100*time.Millisecond {
		return window{warmup: warmup, dur: w.dur}, 1
	}
	return window{warmup: warmup, dur: (w.dur / turnRounds).Round(time.Millisecond)}, turnRounds
}

// record adds one round's value of key.
func (fr *featRun) record(key string, v float64) {
	fr.sums[key] += v
	fr.rounds[key]++
}

// launchFeatures starts the proxy named name with every case on ports of
// its own, and waits until each port not behind the front relays.
func launchFeatures(ps []proxy, name string, cfg config, fu *featUps, tmp string) (*featRun, error) {
	var p proxy
	for _, q := range ps {
		if q.name == name {
			p = q
		}
	}
	bin, err := lookBinary(p.binary(&cfg))
	if err != nil {
		return nil, err
	}
	fp, err := freePorts(4*len(featCases) + 1)
	if err != nil {
		return nil, err
	}
	r := &featRun{p: p, admin: fp[0], routes: map[string]*featRoute{}, sums: map[string]float64{}, rounds: map[string]int{},
		errs: map[string]bool{}, hs: map[string][2]int64{}, meters: map[string]*cpuMeter{}}
	var routes []*featRoute
	for i := range featCases {
		for k, sink := range []bool{false, true} {
			rt := &featRoute{c: &featCases[i], sink: sink, port: fp[1+4*i+2*k]}
			rt.dial = rt.port
			if rt.c.proxyProto {
				rt.dial = fp[2+4*i+2*k]
			}
			routes = append(routes, rt)
			r.routes[rt.name()] = rt
		}
	}
	s := setup{name: p.name, dir: filepath.Join(tmp, p.name+"-features"), binary: bin, pin: cfg.pin, timeout: cfg.startTimeout}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return nil, err
	}
	r.dir = s.dir
	fmt.Fprintf(os.Stderr, "%s: features: starting\n", p.name)
	if r.c, err = featStarters[p.name](s, fu, routes, r.admin); err != nil {
		return nil, fmt.Errorf("start: %v", err)
	}
	err = waitReady(r.c, cfg.startTimeout, func() error {
		for _, rt := range routes {
			if !rt.c.proxyProto {
				if err := probeFeature(rt, fu); err != nil {
					return err
				}
			}
		}
		return nil
	})
	fu.closeConns()
	if err != nil {
		r.c.stop()
		return nil, err
	}
	if pid, err := p.rssPID(r.c); err == nil {
		r.pid = fmt.Sprint(pid)
	}
	for _, c := range featCases {
		r.meters[c.key] = newCPUMeter(r.pid)
	}
	return r, nil
}

// launchFront starts the front HAProxy of routes, pinned with the bench,
// and waits until each route relays through it.
func launchFront(cfg config, routes []*featRoute, fu *featUps, tmp string) (*child, error) {
	bin, err := lookBinary("haproxy")
	if err != nil {
		return nil, err
	}
	s := setup{name: "haproxy-front", dir: filepath.Join(tmp, "haproxy-front"), binary: bin, pin: cfg.pin, benchCPU: true}
	if err := os.Mkdir(s.dir, 0o755); err != nil {
		return nil, err
	}
	fmt.Fprintln(os.Stderr, "haproxy-front: features: starting")
	c, err := launchHAProxy(s, haproxyFront(routes))
	if err != nil {
		return nil, err
	}
	err = waitReady(c, cfg.startTimeout, func() error {
		for _, rt := range routes {
			if err := probeFeature(rt, fu); err != nil {
				return err
			}
		}
		return nil
	})
	fu.closeConns()
	if err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// clientConfig is what the clients of an SNI route verify: the first
// certificate's chain and name. Nil for plain TCP clients.
func (r *featRoute) clientConfig(fu *featUps) *tls.Config {
	if certs := r.c.certs(fu); certs != nil {
		return certs[0].verifyingConfig()
	}
	return nil
}

// dialer is how the load connects to r.
func (r *featRoute) dialer(fu *featUps) dialer {
	if cfg := r.clientConfig(fu); cfg != nil {
		return tlsDialer(addr(r.dial), cfg)
	}
	return tcpDialer(addr(r.dial))
}

// probeFeature checks that r relays: an echo round trip, or bytes that
// reach the sink. On an SNI port each name must reach the upstream with
// its certificate, which the client verifies.
func probeFeature(r *featRoute, fu *featUps) error {
	end := time.Now().Add(time.Second)
	for i, bc := range r.c.certs(fu) {
		if i == 0 {
			continue // below
		}
		c, err := dialTLS(addr(r.dial), bc.verifyingConfig(), end)
		if err != nil {
			return fmt.Errorf("%s, %s: %v", r.name(), bc.name, err)
		}
		c.Close()
	}
	c, err := r.dialer(fu)(end)
	if err != nil {
		return fmt.Errorf("%s: %v", r.name(), err)
	}
	defer c.Close()
	c.SetDeadline(end)
	if !r.sink {
		if err := roundTrip(c, []byte("probe"), make([]byte, 5)); err != nil {
			return fmt.Errorf("%s: %v", r.name(), err)
		}
		return nil
	}
	sink := r.c.groups(fu, true)[0][0]
	before := sink.read.Load()
	if _, err := c.Write([]byte("probe")); err != nil {
		return fmt.Errorf("%s: %v", r.name(), err)
	}
	for time.Now().Before(end) {
		if sink.read.Load() >= before+5 {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("%s: bytes did not reach the sink", r.name())
}

// shortConns measures r's short connections per second; with rr it checks
// that the upstreams got equal shares.
func (fr *featRun) shortConns(r *featRoute, fu *featUps, workers int, w window) error {
	g := r.c.groups(fu, false)[0]
	before := make([]int64, len(g))
	for i, u := range g {
		before[i] = u.accepted.Load()
	}
	full, resumed := fu.full.Load(), fu.resumed.Load()
	var rate float64
	var failed int64
	var lastErr error
	var mark func()
	if fr.pid != "" {
		mark = fr.meters[r.c.key].mark
	}
	if cfg := r.clientConfig(fu); cfg != nil {
		st := handshakes(addr(r.dial), cfg, workers, w, mark)
		rate, failed, lastErr = st.ok.rate(), st.failed, st.lastErr
	} else {
		rate, failed = connRateMarked(addr(r.dial), workers, w, mark)
	}
	if rate > 0 {
		fr.record("cps_"+r.c.key, rate)
	}
	if r.c.sni || r.c.upstreamTLS {
		time.Sleep(100 * time.Millisecond) // a handshake under way when the client gave up
		hs := fr.hs[r.c.key]
		hs[0] += fu.full.Load() - full
		hs[1] += fu.resumed.Load() - resumed
		fr.hs[r.c.key] = hs
	}
	if r.c.rr {
		time.Sleep(100 * time.Millisecond) // a dial the proxy made after the client gave up
		if fr.rr == nil {
			fr.rr = make([]int64, len(g))
		}
		for i, u := range g {
			fr.rr[i] += u.accepted.Load() - before[i]
		}
	}
	switch {
	case failed > 0 && lastErr != nil:
		return fmt.Errorf("%d attempts failed, the last: %v", failed, lastErr)
	case failed > 0:
		return fmt.Errorf("%d attempts failed", failed)
	case rate == 0:
		return errors.New("no connection completed")
	}
	return nil
}

// upload measures r's upload MB/s on one connection.
func (fr *featRun) upload(r *featRoute, fu *featUps, w window) error {
	got, err := uploadWith(r.dialer(fu), 1, w, r.c.groups(fu, true)[0][0], nil)
	if err != nil {
		return err
	}
	if got.n == 0 {
		return errors.New("no bytes reached the sink")
	}
	fr.record("up1_"+r.c.key, got.rate()/1e6)
	return nil
}

// checkRR notes how the round robin rows shared the short connections out
// between the three upstreams: equal shares, give or take one per round.
func (fr *featRun) checkRR() {
	if fr.rr == nil {
		return
	}
	var counts []string
	lo, hi := fr.rr[0], fr.rr[0]
	for _, n := range fr.rr {
		counts = append(counts, fmt.Sprint(n))
		lo, hi = min(lo, n), max(hi, n)
	}
	if lo == 0 || hi-lo > max(2*turnRounds, hi/1000) { // one or two per round
		fr.res.notes = append(fr.res.notes, "check failed: round robin: uneven connections per upstream: "+strings.Join(counts, ", "))
		return
	}
	fr.res.notes = append(fr.res.notes, "check: round robin: connections per upstream: "+strings.Join(counts, ", "))
}

// aegisChecks notes what aegis's stats say of the per-source cap (it
// counted the connections and blocked none), and the warnings in its log.
func (fr *featRun) aegisChecks() {
	// The SNI streams pass TLS through, as they should.
	if n, first := aegisLogTrouble(filepath.Join(fr.dir, "aegis.log"), "without ssl_enabled the TLS bytes pass through"); n > 0 {
		fr.res.notes = append(fr.res.notes, fmt.Sprintf("its log has %d warnings or errors, the first: %s", n, first))
	}
	var list []spec.Status
	if err := newAegisAPI(fr.admin).call("GET", "/api/v1/streams/stats", nil, http.StatusOK, &list); err != nil {
		fr.res.notes = append(fr.res.notes, "check: stats: "+err.Error())
		return
	}
	var total, blocked uint64
	for _, s := range list {
		if strings.HasPrefix(s.Name, "bench-perip_") {
			total += s.TotalConnections
			blocked += s.BlockedConnections
		}
	}
	if blocked > 0 || total == 0 {
		fr.res.notes = append(fr.res.notes, fmt.Sprintf("check failed: max_connections_per_ip: %d connections, %d blocked", total, blocked))
		return
	}
	fr.res.notes = append(fr.res.notes, fmt.Sprintf("check: max_connections_per_ip: %d connections, none blocked", total))
}

// featMetrics are the rows of the features table.
func featMetrics(workers int) []metric {
	var out []metric
	for _, c := range featCases {
		out = append(out,
			metric{key: "cps_" + c.key, label: c.label + ": short conns/s, " + plural(workers, "worker"), format: "%.0f"},
			metric{key: "cpu_" + c.key, label: c.label + ": proxy CPU us per short conn (lower is better)", format: "%.0f"},
			metric{key: "up1_" + c.key, label: c.label + ": upload, 1 conn, MB/s", format: "%.0f"})
	}
	return out
}

// featTable is the features table: each cell is the value and its ratios
// to the plain stream of the same proxy and to HAProxy.
func featTable(results []result, workers int) string {
	var ran []result
	var hap result
	for _, r := range results {
		if r.skipped == "" {
			ran = append(ran, r)
			if r.name == "haproxy" {
				hap = r
			}
		}
	}
	rows := [][]string{{""}}
	for _, r := range ran {
		rows[0] = append(rows[0], r.name)
	}
	for _, m := range featMetrics(workers) {
		row := []string{m.label}
		plainKey := m.key[:strings.IndexByte(m.key, '_')] + "_plain"
		for _, r := range ran {
			plain := result{values: map[string]float64{}}
			if v, ok := r.values[plainKey]; ok {
				plain.values[m.key] = v
			}
			row = append(row, cell(m, r, []result{plain, hap}))
		}
		rows = append(rows, row)
	}
	return grid(rows)
}

// featReport is the features table and its notes.
func featReport(results []result, notes []string, cfg config) string {
	var b strings.Builder
	b.WriteString("Features (issues 16, 17, 22), each beside the plain stream of the same proxy. Each cell: value (value / plain, value / haproxy).\n")
	b.WriteString(featTable(results, cfg.workers))
	for _, r := range results {
		if r.skipped != "" {
			fmt.Fprintf(&b, "%s: features skipped (%s)\n", r.name, r.skipped)
		}
		for _, n := range r.notes {
			fmt.Fprintf(&b, "%s: %s\n", r.name, n)
		}
	}
	for _, n := range notes {
		b.WriteString(n + "\n")
	}
	b.WriteString("proxy CPU: the proxy process's own CPU time (from /proc) in the counted part, per short connection; the front HAProxy of the PROXY rows is not in it.\n")
	b.WriteString("Every stream has the whitelist and the connection log (HAProxy: tcp-request connection reject, option tcplog).\n")
	b.WriteString("round robin: aegis upstreams + load_balancing round_robin; haproxy balance roundrobin.\n")
	b.WriteString("SNI: two aegis streams with sni on one port, no ssl_enabled; haproxy inspect-delay and use_backend if { req.ssl_sni -i ... }. At start each name reached the upstream with its own certificate (or the proxy would be skipped); the load's clients send a.bench.test and verify the upstream's chain; the bench, on its own CPU, does both TLS ends, so it and not the proxy may set the rate.\n")
	fmt.Fprintf(&b, "per-IP: aegis max_connections_per_ip %d; haproxy stick-table conn_cur, track-sc0 src, reject if sc0_conn_cur gt %d.\n", perIPCap, perIPCap)
	b.WriteString("PROXY: a third process, HAProxy with send-proxy-v2, in front of each proxy's ports (pinned with the bench); aegis accept_proxy_protocol required; haproxy bind ... accept-proxy. The ratio to plain includes the front's hop.\n")
	b.WriteString("TLS to the upstream: aegis upstream_tls with upstream_tls_ca; haproxy server ... ssl verify required ca-file; both keep TLS sessions to resume.\n")
	b.WriteString("whitelist: the client matches the last entry; haproxy reject if !{ src -f file }.\n")
	return b.String()
}
