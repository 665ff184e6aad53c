package streams_test

// Client floods (issue 7): 8,000 TCP connections held at once, a UDP flood
// from 100,000 source addresses against the NAT cap, and slow TLS
// handshakes against the handshake timeout and max_handshakes.

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// usage is what this process (the proxy) holds at one moment.
type usage struct {
	fds, goroutines int
	rss             uint64 // resident set size, bytes
	heap            uint64 // Go heap and goroutine stacks in use, bytes
}

func measure(t testing.TB) usage {
	t.Helper()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	return usage{fds: len(ents), goroutines: runtime.NumGoroutine(), rss: rss(t), heap: ms.HeapInuse + ms.StackInuse}
}

// rss reads this process's resident set size.
func rss(t testing.TB) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status:", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	t.Skip("no VmRSS in /proc/self/status")
	return 0
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// The Go runtime raises the soft open-file limit to the hard one (less
// one) when a program starts, so the proxy (bin/aegis, and this test
// binary, built alike) needs no ulimit -n: a process started with a soft
// limit of 1024 runs with hard-1.
func TestFloodOpenFileLimitRaisedAtStart(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max <= 1025 {
		t.Skipf("hard open-file limit %d: nothing to raise", lim.Max)
	}
	child := startHelper(t, "rlimit")
	f := child.expect("nofile", 30*time.Second)
	cur, _ := strconv.ParseUint(f[0], 10, 64)
	hard, _ := strconv.ParseUint(f[1], 10, 64)
	if hard != lim.Max || cur < hard-1 {
		t.Fatalf("started with a soft limit of 1024 (hard %d): runs with %d (hard %d), want %d or more", lim.Max, cur, hard, lim.Max-1)
	}
	t.Logf("this process: soft %d, hard %d; one started with 1024 runs with %d", lim.Cur, lim.Max, cur)
}

// 8,000 TCP connections held open at once through one stream, then
// released. Clients and upstream live in a helper process, since the four
// sockets of each connection do not fit in one process's 20,000.
func TestFloodTCP8000(t *testing.T) {
	const n = 8000
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if need := uint64(2*n + 1000); lim.Cur < need {
		t.Skipf("open-file limit %d (hard %d): the proxy needs %d for %d connections", lim.Cur, lim.Max, need, n)
	}
	checkNoLeaksOrFDs(t)
	child := startHelper(t, "flood")
	upPort := child.intAfter("port", 30*time.Second)
	port := freePort(t)
	// Without the connection log: its writer and storage (SQLite, slowed
	// down many times over by the race detector) would take the shared
	// cores from the relay. The faults tests check the log.
	// max_connections set: by default a stream takes at most its share of
	// the open-file limit (4,375 connections with 20,000).
	inst, stop := startWithBystander(t, port, upPort, map[string]any{"log_connections": false, "max_connections": n})
	inst.stats() // the admin endpoint's keep-alive connection, in the baseline
	base := measure(t)

	child.send("open 127.0.0.1:%d %d", port, n)
	f := child.expect("opened", 100*time.Second)
	if f[1] != "0" {
		t.Fatalf("opening %d connections through the proxy: %s opened, %s failed, first: %s", n, f[0], f[1], strings.Join(f[4:], " "))
	}
	openMS, _ := strconv.Atoi(f[2])
	st := inst.waitStats(1, fmt.Sprintf("%d active", n), func(s spec.Status) bool { return s.ActiveConnections == n })
	held := measure(t)
	// All of them relay while all are open.
	child.send("echo")
	e := child.expect("echoed", 60*time.Second)
	if e[0] != strconv.Itoa(n) {
		t.Fatalf("second round trip on the %d open connections: %s echoed, %s failed, first: %s", n, e[0], e[1], strings.Join(e[3:], " "))
	}
	// Two descriptors per connection (client side and upstream side). The
	// baseline may have caught one of the other stream's short connections
	// of the moment: its client, the proxy's two sockets and its upstream's
	// are all in this process, 4 descriptors that are gone by now.
	if st.TotalConnections != n || held.fds-base.fds < 2*n-4 {
		t.Fatalf("with %d connections open: stats %+v, %d more file descriptors (want %d or more)", n, st, held.fds-base.fds, 2*n-4)
	}

	released := time.Now()
	child.send("close")
	child.expect("closed", 30*time.Second)
	if !testenv.Within(30*time.Second, func() bool { return inst.stats()[1].ActiveConnections == 0 }) {
		t.Fatalf("30s after the clients closed: %+v", inst.stats()[1])
	}
	releaseTook := time.Since(released)
	// Back to the baseline, give or take the admin endpoint's and the
	// other stream's connections of the moment (the exact check runs
	// when the test is over).
	var after usage
	if !testenv.Within(10*time.Second, func() bool {
		after = measure(t)
		return after.fds <= base.fds+6 && after.goroutines <= base.goroutines+10
	}) {
		t.Fatalf("after releasing %d connections: %d file descriptors and %d goroutines, before them %d and %d", n, after.fds, after.goroutines, base.fds, base.goroutines)
	}
	stop()

	t.Logf("%d connections opened (each echoing 8 bytes) in %dms; released in %s", n, openMS, releaseTook.Round(time.Millisecond))
	t.Logf("proxy while holding them: +%d fds, +%d goroutines (%.2f per connection), RSS +%.1f MiB (%.1f KiB per connection), Go heap+stacks +%.1f MiB (%.1f KiB per connection)",
		held.fds-base.fds, held.goroutines-base.goroutines, float64(held.goroutines-base.goroutines)/n,
		mib(held.rss-base.rss), float64(held.rss-base.rss)/1024/n, mib(held.heap-base.heap), float64(held.heap-base.heap)/1024/n)
	t.Logf("helper process (clients and upstream): %s fds with all open", f[3])
}

// udpSocketInfo reads the kernel's view of the stream's listening UDP
// socket on 127.0.0.1:port, through a duplicate of its descriptor.
type udpSocketInfo struct{ fd int }

func openUDPSocketInfo(t *testing.T, port int) *udpSocketInfo {
	t.Helper()
	b, err := os.ReadFile("/proc/self/net/udp")
	if err != nil {
		t.Skip("no /proc/self/net/udp:", err)
	}
	local, inode := fmt.Sprintf("0100007F:%04X", port), ""
	for _, line := range strings.Split(string(b), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 9 && f[1] == local {
			inode = f[9]
		}
	}
	for fd, target := range fdTable(t) {
		if inode == "" || target != "socket:["+inode+"]" {
			continue
		}
		n, _ := strconv.Atoi(fd)
		dup, err := unix.FcntlInt(uintptr(n), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		s := &udpSocketInfo{fd: dup}
		t.Cleanup(s.close)
		return s
	}
	t.Fatalf("no UDP socket of this process on 127.0.0.1:%d", port)
	return nil
}

// close closes the duplicate; the socket goes once Caddy closed it too.
func (s *udpSocketInfo) close() {
	if s.fd >= 0 {
		unix.Close(s.fd)
		s.fd = -1
	}
}

// queue returns the bytes waiting in the socket's receive queue and the
// datagrams the kernel dropped because it was full (SO_MEMINFO).
func (s *udpSocketInfo) queue() (queued, drops uint32) {
	var mi [9]uint32 // SK_MEMINFO_RMEM_ALLOC (0) … SK_MEMINFO_DROPS (8)
	size := uint32(unsafe.Sizeof(mi))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), unix.SOL_SOCKET, unix.SO_MEMINFO,
		uintptr(unsafe.Pointer(&mi[0])), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		panic(fmt.Sprintf("SO_MEMINFO: %v", errno))
	}
	return mi[0], mi[8]
}

// A UDP flood from 100,000 source addresses (50 loopback addresses × 2,000
// ports, one datagram each, sent as fast as the relay takes them) against
// a stream whose NAT is capped at 2,000 entries: the entries never pass
// the cap, every datagram is accounted for, memory stays bounded, the
// clients that were there first keep working, and removing the stream
// frees every entry. (The idle timeout is longer than the flood, so that
// the cap holds throughout; eviction is TestUDPEchoStatsAndIdleLog's.)
func TestFloodUDPSpoofedSources(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const (
		capEntries = 2000
		probes     = 5
		srcIPs     = 50
		srcPorts   = 2000
		sources    = srcIPs * srcPorts
		firstPort  = 40000 // on 127.20.0.x, which nothing else uses
		senders    = 4
		// The senders wait while this much is queued at the stream's
		// socket (of its 4 MiB), so the flood runs at the relay's pace
		// instead of overflowing the queue, which would drop the first
		// clients' datagrams too.
		maxQueued = 64 << 10
		// Bounds on what the proxy may take for the flood, over what it
		// took before: Go heap and stacks with the NAT table full (after
		// a collection), and the process's resident set at its peak
		// (which the race detector's shadow memory inflates).
		liveBound = 50 << 20
		rssBound  = 400 << 20
		idle      = 60 * time.Second
	)
	var upstreamGot atomic.Int64
	up := newUDPUpstream(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		if bytes.HasPrefix(p, []byte("probe")) {
			_, _ = pc.WriteToUDPAddrPort(p, from)
			return
		}
		upstreamGot.Add(1)
	})
	tcpUp := newUpstream(t, echo)
	port, other := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(
		udpHost(1, port, up.Port, map[string]any{"max_connections": capEntries, "idle_timeout_seconds": int(idle / time.Second)}),
		host(2, other, tcpUp.Port, nil)))
	stopTCP := keepEchoing(t, other)

	// The clients that are there before the flood.
	probeConns := make([]*net.UDPConn, probes)
	for i := range probeConns {
		probeConns[i] = udpDial(t, "127.0.0.1", "127.0.0.1", port)
		if got := udpRoundTrip(t, probeConns[i], fmt.Sprint("probe ", i), 2*time.Second); got != fmt.Sprint("probe ", i) {
			t.Fatalf("client %d before the flood: got %q", i, got)
		}
	}
	inst.waitStats(1, fmt.Sprintf("%d entries", probes), func(s spec.Status) bool { return s.ActiveConnections == probes })
	base := measure(t)
	sock := openUDPSocketInfo(t, port)
	_, dropsBefore := sock.queue()

	done := make(chan struct{})
	var bg sync.WaitGroup
	// Watch the entry count and the resident set during the flood.
	var maxActive atomic.Int64
	var maxRSS uint64
	bg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
			a := inst.stats()[1].ActiveConnections
			for old := maxActive.Load(); a > old && !maxActive.CompareAndSwap(old, a); old = maxActive.Load() {
			}
			if i%10 == 0 {
				maxRSS = max(maxRSS, rss(t))
			}
		}
	})
	// The first clients keep talking through the flood: a round every
	// 50ms, resent twice after 500ms without an answer.
	probeErrs := make(chan error, probes)
	var probeRounds, probeResent atomic.Int64
	for i, c := range probeConns {
		bg.Go(func() {
			buf := make([]byte, 64)
			for r := 0; ; r++ {
				select {
				case <-done:
					return
				case <-time.After(50 * time.Millisecond):
				}
				msg := fmt.Sprintf("probe %d round %d", i, r)
				ok := false
				for try := 0; try < 3 && !ok; try++ {
					if try > 0 {
						probeResent.Add(1)
					}
					if _, err := c.Write([]byte(msg)); err != nil {
						probeErrs <- err
						return
					}
					_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
					for !ok {
						n, err := c.Read(buf)
						if err != nil {
							break
						}
						ok = string(buf[:n]) == msg // or a late answer to an earlier try
					}
				}
				if !ok {
					probeErrs <- fmt.Errorf("client %d, round %d: no answer in 3 tries during the flood", i, r)
					return
				}
				probeRounds.Add(1)
			}
		})
	}

	// The flood: a socket per source, bound, one datagram, closed.
	var sent, skipped, failed, waits atomic.Int64
	var next atomic.Int64
	var flood sync.WaitGroup
	start := time.Now()
	for range senders {
		flood.Go(func() {
			payload := []byte("flood")
			to := &syscall.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}
			for k := int(next.Add(1) - 1); k < sources; k = int(next.Add(1) - 1) {
				if k%16 == 0 {
					for q, _ := sock.queue(); q > maxQueued; q, _ = sock.queue() {
						waits.Add(1)
						time.Sleep(time.Millisecond)
					}
				}
				from := &syscall.SockaddrInet4{Port: firstPort + k/srcIPs, Addr: [4]byte{127, 20, 0, byte(1 + k%srcIPs)}}
				fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
				if err != nil {
					failed.Add(1)
					continue
				}
				switch err := syscall.Bind(fd, from); {
				case errors.Is(err, syscall.EADDRINUSE):
					skipped.Add(1)
				case err != nil:
					failed.Add(1)
				case syscall.Sendto(fd, payload, 0, to) != nil:
					failed.Add(1)
				default:
					sent.Add(1)
				}
				syscall.Close(fd)
			}
		})
	}
	flood.Wait()
	floodTook := time.Since(start)
	// Let the relay read what is queued, then stop watching.
	testenv.Within(5*time.Second, func() bool { q, _ := sock.queue(); return q == 0 })
	close(done)
	bg.Wait()
	close(probeErrs)
	for err := range probeErrs {
		t.Error(err)
	}
	st := inst.stats()[1]
	_, drops := sock.queue()
	sock.close()
	kernelDrops := drops - dropsBefore
	full := measure(t) // the NAT table is full

	if failed.Load() > 0 || sent.Load() < sources*99/100 {
		t.Fatalf("flood: %d of %d sources sent, %d skipped (address in use), %d failed", sent.Load(), sources, skipped.Load(), failed.Load())
	}
	// Entries opened by flood sources, and datagrams refused at the cap.
	opened := int64(st.TotalConnections) - probes
	blocked := int64(st.BlockedConnections)
	if maxActive.Load() != capEntries {
		t.Errorf("NAT entries during the flood: at most %d seen, want the cap %d reached and never passed", maxActive.Load(), capEntries)
	}
	// Each source sent one datagram: it opened an entry, was refused at
	// the cap, or was dropped by the kernel (a full queue) or the relay.
	if opened+blocked > sent.Load() || opened+blocked+int64(kernelDrops)+int64(st.DatagramsDropped) < sent.Load() || blocked < sent.Load()/2 {
		t.Errorf("%d datagrams from new sources: %d opened an entry, %d refused at the cap, %d dropped by the kernel, %d by the relay: they do not add up",
			sent.Load(), opened, blocked, kernelDrops, st.DatagramsDropped)
	}
	if grew := int64(full.heap) - int64(base.heap); grew > liveBound {
		t.Errorf("Go heap and stacks in use grew by %.1f MiB with the NAT table full, want less than %d MiB", float64(grew)/(1<<20), liveBound>>20)
	}
	if grew := int64(maxRSS) - int64(base.rss); grew > rssBound {
		t.Errorf("resident set grew by %.1f MiB during the flood, want less than %d MiB", float64(grew)/(1<<20), rssBound>>20)
	}
	if probeRounds.Load() < probes {
		t.Errorf("the first clients completed %d rounds during the flood", probeRounds.Load())
	}

	// The first clients still get answers.
	for i, c := range probeConns {
		msg := fmt.Sprint("probe ", i, " after")
		got := ""
		for try := 0; try < 3 && got != msg; try++ {
			got = udpRoundTrip(t, c, msg, time.Second)
		}
		if got != msg {
			t.Fatalf("client %d after the flood: got %q", i, got)
		}
	}
	// Removing the stream closes every entry, each logged; refused
	// sources were logged at most once a minute per address.
	live := inst.stats()[1].ActiveConnections
	if err := inst.load(hosts(host(2, other, tcpUp.Port, nil))); err != nil {
		t.Fatal(err)
	}
	var blockedLines, removed int
	testenv.Within(10*time.Second, func() bool {
		blockedLines, removed = 0, 0
		for _, e := range inst.connLogs() {
			switch {
			case e.StreamID != 1:
			case e.Action == "blocked" && e.DisconnectReason == "max_connections":
				blockedLines++
			case e.Action == "allowed" && e.DisconnectReason == "stream_removed":
				removed++
			}
		}
		return int64(removed) >= live
	})
	if int64(removed) != live {
		t.Errorf("%d entries open when the stream was removed, %d logged stream_removed", live, removed)
	}
	if blockedLines == 0 || blockedLines > srcIPs {
		t.Errorf("%d blocked lines in the connection log for %d refused datagrams from %d addresses, want 1 to %d", blockedLines, blocked, srcIPs, srcIPs)
	}
	var after usage
	if !testenv.Within(10*time.Second, func() bool { after = measure(t); return after.fds <= base.fds-probes }) {
		t.Errorf("%d file descriptors after the stream's removal, %d before the flood (with %d entries)", after.fds, base.fds, probes)
	}
	stopTCP()

	t.Logf("flood: %d sources sent in %s (%.0f/s, %d pauses for the relay), %d skipped; %d opened an entry (%d reached the upstream), %d refused at the cap, %d dropped by the kernel, %d by the relay",
		sent.Load(), floodTook.Round(time.Millisecond), float64(sent.Load())/floodTook.Seconds(), waits.Load(), skipped.Load(),
		opened, upstreamGot.Load(), blocked, kernelDrops, st.DatagramsDropped)
	t.Logf("entries: at most %d (cap %d), %d closed by the removal; Go heap+stacks %.1f MiB before, %.1f MiB with the table full; RSS %.1f MiB before, at most %.1f MiB; %d blocked log lines; first clients: %d rounds, %d resends",
		maxActive.Load(), capEntries, removed, mib(base.heap), mib(full.heap), mib(base.rss), mib(maxRSS), blockedLines, probeRounds.Load(), probeResent.Load())
}

// clientHello returns the first flight of a TLS client for name.
func clientHello(t *testing.T, name string) []byte {
	t.Helper()
	a, b := net.Pipe()
	var wg sync.WaitGroup
	wg.Go(func() {
		_ = tls.Client(a, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
	})
	buf := make([]byte, 16<<10)
	n, err := b.Read(buf)
	a.Close()
	b.Close()
	wg.Wait()
	if err != nil || n < 100 {
		t.Fatalf("capturing a ClientHello: %d bytes, %v", n, err)
	}
	return buf[:n]
}

// Slow TLS clients (silent, half a ClientHello, a ClientHello a byte at a
// time) are closed at the handshake timeout (10s, the default, which a
// stream cannot change); a normal client handshakes during the attack;
// with max_handshakes (1024) in progress the next connection is closed at
// once.
func TestFloodSlowTLSHandshakes(t *testing.T) {
	checkNoLeaksOrFDs(t)
	const (
		timeout = l4aegistls.DefaultHandshakeTimeout
		maxHS   = l4aegistls.DefaultMaxHandshakes
		partial = 90 // half a ClientHello
		trickle = 10 // a byte every 500ms
		silent1 = 100
	)
	up := newUpstream(t, echo)
	port, other := freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, other, up.Port, nil)))
	stopOther := keepEchoing(t, other)
	ca := newTestCA(t)
	chain, key := ca.leaf(t, "flood.test", 77)
	ctx := context.Background()
	cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "flood", Certificate: chain, PrivateKey: key})
	if err != nil {
		t.Fatal(err)
	}
	s := apiStream(2, port, up.Port)
	s.SSLEnabled, s.SSLCertID = true, cert.ID
	if _, err := streams.CreateHost(ctx, s); err != nil {
		t.Fatal(err)
	}
	hs := func() l4aegistls.HandshakeStats {
		st, ok := l4aegistls.Stats(2)
		if !ok {
			t.Fatal("no handshake stats for stream 2")
		}
		return st
	}
	waitInProgress := func(n int64) {
		t.Helper()
		testenv.Eventually(t, fmt.Sprintf("%d handshakes in progress", n), func() bool { return hs().InProgress == n })
	}
	hello := clientHello(t, "flood.test")

	// Each slow client notes how long after its connect the proxy closed
	// it.
	type slow struct {
		kind        string
		closedAfter time.Duration
		err         error
	}
	var (
		mu    sync.Mutex
		slows []*slow
		wg    sync.WaitGroup
	)
	stopTrickle := make(chan struct{})
	// The slow clients come from 16 sources, so that none passes its
	// share of the handshakes (max_handshakes_per_ip, 128 by default).
	var opened int
	open := func(kind string) {
		t.Helper()
		start := time.Now() // the proxy's handshake timer starts later
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 3, byte(1+opened%16))}}
		opened++
		c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		sl := &slow{kind: kind}
		mu.Lock()
		slows = append(slows, sl)
		mu.Unlock()
		switch kind {
		case "partial":
			if _, err := c.Write(hello[:len(hello)/2]); err != nil {
				t.Fatal(err)
			}
		case "trickle":
			wg.Go(func() {
				for i := 0; i < len(hello); i++ {
					select {
					case <-stopTrickle:
						return
					case <-time.After(500 * time.Millisecond):
					}
					if _, err := c.Write(hello[i : i+1]); err != nil {
						return
					}
				}
			})
		}
		wg.Go(func() {
			defer c.Close()
			_ = c.SetReadDeadline(start.Add(timeout + 5*time.Second))
			n, err := c.Read(make([]byte, 1024))
			sl.closedAfter = time.Since(start)
			if n > 0 || err == nil || isTimeout(err) {
				sl.err = fmt.Errorf("read %d bytes, %v", n, err)
			}
		})
	}
	var stopOnce sync.Once
	stopSlow := func() {
		stopOnce.Do(func() { close(stopTrickle) })
		wg.Wait()
	}
	t.Cleanup(stopSlow)

	attack := time.Now()
	for range silent1 {
		open("silent")
	}
	for range partial {
		open("partial")
	}
	for range trickle {
		open("trickle")
	}
	waitInProgress(silent1 + partial + trickle)

	// A normal client during the attack.
	hsStart := time.Now()
	c, serial := tlsDial(t, ca, port, "flood.test")
	hsTook := time.Since(hsStart)
	if got := roundTrip(t, c, "through the attack"); serial != 77 || got != "through the attack" {
		t.Fatalf("a normal TLS client during the attack: serial %d, echo %q", serial, got)
	}
	c.Close()

	// Up to max_handshakes in progress; the next one is closed at once.
	for range maxHS - (silent1 + partial + trickle) {
		open("silent")
	}
	waitInProgress(maxHS)
	over := time.Now()
	d := net.Dialer{Timeout: 5 * time.Second}
	if oc, err := tls.DialWithDialer(&d, "tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{RootCAs: ca.pool, ServerName: "flood.test"}); err == nil {
		oc.Close()
		t.Fatalf("a handshake succeeded with max_handshakes %d in progress", maxHS)
	}
	refusedIn := time.Since(over)
	if refusedIn > 2*time.Second || hs().Rejected != 1 {
		t.Fatalf("over max_handshakes: refused after %s, stats %+v; want at once, 1 rejected", refusedIn, hs())
	}
	if time.Since(attack) > timeout-time.Second {
		t.Fatalf("setting up the attack took %s: too close to the handshake timeout %s for the checks above to mean anything", time.Since(attack), timeout)
	}

	// Every slow client is closed at the handshake timeout.
	testenv.Within(timeout+8*time.Second, func() bool { return hs().InProgress == 0 })
	stopSlow()
	var earliest, latest time.Duration = time.Hour, 0
	for _, sl := range slows {
		if sl.err != nil {
			t.Fatalf("a %s client: %v", sl.kind, sl.err)
		}
		earliest, latest = min(earliest, sl.closedAfter), max(latest, sl.closedAfter)
	}
	if earliest < timeout-20*time.Millisecond || latest > timeout+4*time.Second {
		t.Fatalf("slow clients closed between %s and %s after connecting, want at the %s handshake timeout", earliest, latest, timeout)
	}
	st := hs()
	if st.InProgress != 0 || st.Failed != maxHS || st.Rejected != 1 || st.Succeeded != 1 {
		t.Fatalf("handshake stats after the attack: %+v, want %d failed, 1 rejected, 1 succeeded", st, maxHS)
	}
	inst.waitStats(2, "no active connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	entries := inst.waitLogs(2, maxHS+2, 10*time.Second)
	if r := reasons(entries); r["tls_handshake_failed"] != maxHS+1 || r["client_close"] != 1 {
		t.Fatalf("connection log of the TLS stream: reasons %v, want %d tls_handshake_failed and 1 client_close", r, maxHS+1)
	}
	// And after it, handshakes work again.
	c2, _ := tlsDial(t, ca, port, "flood.test")
	if got := roundTrip(t, c2, "after"); got != "after" {
		t.Fatalf("after the attack: %q", got)
	}
	c2.Close()
	stopOther()
	t.Logf("normal handshake during the attack took %s; over max_handshakes refused in %s; %d slow clients closed %s to %s after connecting",
		hsTook.Round(time.Millisecond), refusedIn.Round(time.Millisecond), len(slows), earliest.Round(time.Millisecond), latest.Round(time.Millisecond))
}
