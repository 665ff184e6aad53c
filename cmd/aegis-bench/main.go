// Command aegis-bench compares bin/aegis with HAProxy, nginx and no proxy at
// all on loopback: throughput, short connections per second, round-trip
// latency and memory per idle connection. Each proxy runs as a child process
// pinned to CPU 1 with one thread; the load and the upstreams run in this
// process on CPU 0.
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
}

func main() {
	var cfg config
	var only string
	flag.StringVar(&cfg.aegis, "aegis", "bin/aegis", "path of the aegis binary")
	flag.StringVar(&only, "only", "", "comma-separated proxies to run, from direct,aegis,haproxy,nginx (default all)")
	flag.DurationVar(&cfg.w.dur, "duration", 3*time.Second, "counted time of each test")
	flag.DurationVar(&cfg.w.warmup, "warmup", 500*time.Millisecond, "uncounted warm-up before each test")
	flag.IntVar(&cfg.workers, "workers", 8, "workers for the short-connection and latency tests")
	flag.IntVar(&cfg.idle, "idle", 2000, "idle connections for the memory test")
	flag.BoolVar(&cfg.pin, "pin", true, "pin proxies to CPU 1 and the bench to CPU 0")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the temp dir with configs and logs")
	flag.DurationVar(&cfg.startTimeout, "start-timeout", 10*time.Second, "how long a proxy may take to start")
	flag.Parse()

	if cfg.w.dur <= 0 || cfg.w.warmup < 0 || cfg.workers < 1 || cfg.idle < 1 {
		fmt.Fprintln(os.Stderr, "aegis-bench: -duration, -workers and -idle must be positive, -warmup not negative")
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

	fmt.Printf("aegis-bench: TCP proxies on 127.0.0.1\n")
	fmt.Printf("tests: %v counted after %v warm-up each; %s for short conns and latency; %s for memory\n",
		cfg.w.dur, cfg.w.warmup, plural(cfg.workers, "worker"), plural(cfg.idle, "idle conn"))
	fmt.Printf("pinning: %s\n", pinning)
	fmt.Printf("threads: aegis GOMAXPROCS=1, haproxy nbthread 1, nginx worker_processes 1, bench GOMAXPROCS=%d\n",
		runtime.GOMAXPROCS(0))
	if b, _ := os.ReadFile("/proc/loadavg"); len(strings.Fields(string(b))) > 0 {
		// Other work on the machine skews every number.
		fmt.Printf("load average at start: %s\n", strings.Fields(string(b))[0])
	}
	fmt.Println()

	tmp, err := os.MkdirTemp("", "aegis-bench-")
	if err != nil {
		return "", err
	}
	if cfg.keep {
		fmt.Fprintln(os.Stderr, "configs and logs in", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}

	// On Ctrl-C: kill every child group, clean up, and leave.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		killAll()
		if !cfg.keep {
			os.RemoveAll(tmp)
		}
		fmt.Fprintf(os.Stderr, "\naegis-bench: %v, stopped\n", s)
		os.Exit(130)
	}()

	up, err := startUpstreams()
	if err != nil {
		return "", err
	}
	defer up.close()

	var results []result
	for _, p := range proxies {
		if len(cfg.only) > 0 && !cfg.only[p.name] {
			continue
		}
		results = append(results, runOne(p, cfg, up, tmp))
	}

	var b strings.Builder
	b.WriteString("Each cell: value (value / direct, value / haproxy).\n")
	b.WriteString(table(results, metricList(cfg.workers, cfg.idle)))
	for _, r := range results {
		if r.skipped != "" {
			fmt.Fprintf(&b, "%s: skipped (%s)\n", r.name, r.skipped)
		}
		for _, n := range r.notes {
			fmt.Fprintf(&b, "%s: %s\n", r.name, n)
		}
	}
	fmt.Fprintf(&b, "\nrun took %v\n", time.Since(start).Round(time.Second))
	return b.String(), nil
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

// runOne starts a proxy, measures it, and stops it.
func runOne(p proxy, cfg config, up *upstreams, tmp string) result {
	res := result{name: p.name, values: map[string]float64{}}
	direct := ports{up.sink.port(), up.source.port(), up.echo.port()}
	front := direct
	var c *child
	if p.start != nil {
		bin, err := lookBinary(p.binary(&cfg))
		if err != nil {
			res.skipped = err.Error()
			return res
		}
		fp, err := freePorts(3)
		if err != nil {
			res.skipped = err.Error()
			return res
		}
		front = ports{fp[0], fp[1], fp[2]}
		s := setup{name: p.name, dir: filepath.Join(tmp, p.name), up: direct, front: front, binary: bin, pin: cfg.pin}
		if err := os.Mkdir(s.dir, 0o755); err != nil {
			res.skipped = err.Error()
			return res
		}
		fmt.Fprintf(os.Stderr, "%s: starting\n", p.name)
		if c, err = p.start(s); err != nil {
			res.skipped = "start: " + err.Error()
			return res
		}
		defer c.stop()
		err = probe(c, front, up, cfg.startTimeout)
		up.closeConns()
		if err != nil {
			res.skipped = err.Error()
			return res
		}
	}

	step := func(what string, f func() error) {
		if c != nil && c.exited() {
			return
		}
		fmt.Fprintf(os.Stderr, "%s: %s\n", p.name, what)
		if err := f(); err != nil {
			res.notes = append(res.notes, what+": "+err.Error())
		}
		up.closeConns()
		if c != nil && c.exited() {
			res.notes = append(res.notes, "died during "+what+": "+c.why())
		}
	}
	record := func(key string, v float64, err error) error {
		if err == nil {
			res.values[key] = v
		}
		return err
	}

	// Memory first, while the proxy has seen little load.
	if c != nil {
		step("idle memory", func() error {
			pid, err := p.rssPID(c)
			if err != nil {
				return err
			}
			v, err := idleMemory(addr(front.Echo), cfg.idle, func() (int64, error) { return rssKB(pid) })
			return record("mem", v, err)
		})
	}
	for _, n := range []int{1, 8} {
		step("upload, "+plural(n, "conn"), func() error {
			v, err := upload(addr(front.Sink), n, cfg.w, up.sink)
			return record(fmt.Sprintf("up%d", n), v, err)
		})
	}
	for _, n := range []int{1, 8} {
		step("download, "+plural(n, "conn"), func() error {
			v, err := download(addr(front.Source), n, cfg.w)
			return record(fmt.Sprintf("down%d", n), v, err)
		})
	}
	step("short conns", func() error {
		v, failed := connRate(addr(front.Echo), cfg.workers, cfg.w)
		res.values["cps"] = v
		if failed > 0 {
			return fmt.Errorf("%d attempts failed", failed)
		}
		return nil
	})
	step("latency", func() error {
		p50, p99, err := latency(addr(front.Echo), cfg.workers, cfg.w)
		if err == nil {
			res.values["p50"] = float64(p50.Nanoseconds()) / 1e3
			res.values["p99"] = float64(p99.Nanoseconds()) / 1e3
		}
		return err
	})
	return res
}

// probe waits until data passes through every front port of the proxy.
func probe(c *child, front ports, up *upstreams, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if c.exited() {
			return errors.New(c.why())
		}
		if last = probeOnce(front, up); last == nil {
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
