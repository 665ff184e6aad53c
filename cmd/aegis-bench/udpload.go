package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// udpSize is the size of every datagram of the UDP tests.
	udpSize = 64
	// udpLossTimeout is how long the generator waits for an echo before it
	// counts the datagram as lost for its window and sends a new one in its
	// place, so that losses do not shrink the window.
	udpLossTimeout = 200 * time.Millisecond
	// udpScanEvery is how often the generator looks for such datagrams.
	udpScanEvery = 50 * time.Millisecond
	// udpDrain is how long the generator keeps reading after the counted
	// part, sending nothing more, so that late echoes are not counted lost.
	udpDrain = 300 * time.Millisecond
	// udpLossTarget is the loss, in percent, the proxies must stay under.
	udpLossTarget = 0.1
)

// The phases of a UDP load run. Each datagram is tagged with the phase it
// was sent in, and each echo counts for its tag.
const (
	phaseWarm = iota
	phaseCount
	phaseDrain
	numPhases
)

// udpStats is what a UDP load run counted.
type udpStats struct {
	sent   [numPhases]int64 // datagrams sent, by phase
	echoed [numPhases]int64 // echoes received, by the phase their datagram was sent in
	rcvd   [numPhases]int64 // echoes received, by the phase they arrived in
	resent int64            // datagrams sent in place of one thought lost
}

func (s *udpStats) add(o udpStats) {
	for i := range numPhases {
		s.sent[i] += o.sent[i]
		s.echoed[i] += o.echoed[i]
		s.rcvd[i] += o.rcvd[i]
	}
	s.resent += o.resent
}

// lossPercent is the share, in percent, of the datagrams sent in the counted
// phase whose echo never came, not even during the drain.
func (s udpStats) lossPercent() float64 {
	sent := s.sent[phaseCount]
	if sent == 0 {
		return 0
	}
	lost := max(sent-s.echoed[phaseCount], 0)
	return 100 * float64(lost) / float64(sent)
}

// rate is echoes received per second during the counted phase.
func (s udpStats) rate(w window) float64 {
	return float64(s.rcvd[phaseCount]) / w.dur.Seconds()
}

// udpLoad runs a closed-loop UDP load against addr: sockets connected UDP
// sockets, each keeping win 64-byte datagrams in flight and sending a new
// one for each echo, in batches. mark, if not nil, is called when the
// counted part starts and when it ends.
func udpLoad(addr string, sockets, win int, w window, mark func()) (udpStats, error) {
	raddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return udpStats{}, err
	}
	gens := make([]*udpGen, 0, sockets)
	defer func() {
		for _, g := range gens {
			g.conn.Close()
		}
	}()
	for range sockets {
		c, err := net.DialUDP("udp4", nil, raddr)
		if err != nil {
			return udpStats{}, err
		}
		// Room for the whole window: loss must not be the generator's.
		c.SetReadBuffer(4 << 20)
		c.SetWriteBuffer(4 << 20)
		gens = append(gens, newUDPGen(c, win))
	}

	t0 := time.Now()
	stats := make([]udpStats, len(gens))
	errs := make([]error, len(gens))
	var wg sync.WaitGroup
	for i, g := range gens {
		wg.Go(func() { stats[i], errs[i] = g.run(t0, w) })
	}
	if mark != nil {
		time.Sleep(time.Until(t0.Add(w.warmup)))
		mark()
		time.Sleep(time.Until(t0.Add(w.warmup + w.dur)))
		mark()
	}
	wg.Wait()
	var total udpStats
	for _, s := range stats {
		total.add(s)
	}
	if err := errors.Join(errs...); err != nil {
		return total, err
	}
	if total.rcvd[phaseCount] == 0 {
		return total, errors.New("no echo came back in the counted part")
	}
	return total, nil
}

// udpSlot is one place of a generator's window.
type udpSlot struct {
	gen uint32 // the datagram in flight is the slot's gen-th
	at  int64  // when it was sent, in ns since t0; 0: nothing in flight
}

// udpGen is one generator socket.
type udpGen struct {
	conn  *net.UDPConn
	slots []udpSlot
	in    *batch
	out   *batch
}

func newUDPGen(c *net.UDPConn, win int) *udpGen {
	return &udpGen{conn: c, slots: make([]udpSlot, win), in: newBatch(win, udpSize, false), out: newBatch(win, udpSize, false)}
}

// The datagram: slot (4 bytes), gen (4 bytes), phase (1 byte), zeros.
func putDatagram(b []byte, slot int, gen uint32, phase int) {
	binary.LittleEndian.PutUint32(b[0:], uint32(slot))
	binary.LittleEndian.PutUint32(b[4:], gen)
	b[8] = byte(phase)
}

func parseDatagram(b []byte) (slot int, gen uint32, phase int, ok bool) {
	if len(b) != udpSize || b[8] >= numPhases {
		return 0, 0, 0, false
	}
	return int(binary.LittleEndian.Uint32(b[0:])), binary.LittleEndian.Uint32(b[4:]), int(b[8]), true
}

// run drives the socket from t0 until the drain ends or nothing is left in
// flight after the counted part.
func (g *udpGen) run(t0 time.Time, w window) (st udpStats, err error) {
	countFrom, end := w.warmup, w.warmup+w.dur
	stop := end + udpDrain
	phaseAt := func(t time.Duration) int {
		switch {
		case t < countFrom:
			return phaseWarm
		case t < end:
			return phaseCount
		}
		return phaseDrain
	}
	rc := rawConn(g.conn)
	queued := 0
	queue := func(slot int, now time.Duration) {
		s := &g.slots[slot]
		s.gen++
		s.at = max(int64(now), 1)
		putDatagram(g.out.msg(queued), slot, s.gen, phaseAt(now))
		queued++
	}
	flush := func(now time.Duration) error {
		n, err := g.out.send(rc, 0, queued)
		if err != nil && !errors.Is(err, net.ErrClosed) {
			// Most likely a pending ICMP error on the socket; once more.
			var k int
			k, err = g.out.send(rc, n, queued)
			n += k
		}
		// Unsent datagrams count as nothing: their slots time out and
		// are filled again.
		st.sent[phaseAt(now)] += int64(n)
		queued = 0
		return err
	}

	live := len(g.slots) // slots with a datagram in flight
	now := time.Since(t0)
	for i := range g.slots {
		queue(i, now)
	}
	if err := flush(now); err != nil {
		return st, err
	}
	nextScan := now + udpScanEvery
	g.conn.SetReadDeadline(t0.Add(nextScan))
	for {
		n, err := g.in.recv(rc, len(g.slots))
		now = time.Since(t0)
		phase := phaseAt(now)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			n = 0
		case errors.Is(err, net.ErrClosed):
			return st, err
		case err != nil:
			// ECONNREFUSED: nothing listened for a moment. The slots
			// time out and are filled again.
			n = 0
		}
		st.rcvd[phase] += int64(n)
		for i := range n {
			slot, gen, tag, ok := parseDatagram(g.in.received(i))
			if !ok {
				continue
			}
			st.echoed[tag]++
			if slot >= len(g.slots) || g.slots[slot].gen != gen || g.slots[slot].at == 0 {
				continue // a late echo of a datagram already replaced
			}
			if phase == phaseDrain {
				g.slots[slot].at = 0
				live--
			} else {
				queue(slot, now)
			}
		}
		if now >= nextScan {
			// Slots whose datagram is late: fill them again, or during the
			// drain, give up on them.
			cut := int64(now - udpLossTimeout)
			for i := range g.slots {
				if s := &g.slots[i]; s.at != 0 && s.at < cut {
					if phase == phaseDrain {
						s.at = 0
						live--
					} else {
						queue(i, now)
						st.resent++
					}
				}
			}
			nextScan = now + udpScanEvery
			g.conn.SetReadDeadline(t0.Add(nextScan))
		}
		if queued > 0 {
			if err := flush(now); err != nil {
				return st, err
			}
		}
		if now >= stop || (phase == phaseDrain && live == 0) {
			return st, nil
		}
	}
}

// --- NAT entries ---

// The NAT test waits natQuiet before it reads the RSS with no entry, and
// natSettle after the last entry, before it reads it again. It stops
// making entries after natBudget. A socket whose echo has not come after
// natRetry sends again, up to natTries times in all.
var (
	natQuiet, natSettle, natBudget = 300 * time.Millisecond, time.Second, 30 * time.Second
	natRetry, natTries             = 200 * time.Millisecond, 5
)

// natResult is what the NAT entry test found.
type natResult struct {
	entries  int     // client sockets that got their echo and then held
	kb       float64 // RSS growth per entry, KB
	fdsAdded int     // sockets the proxy opened meanwhile (-1: not known)
}

// natEntries opens n client sockets, each bound to its own port on
// 127.0.0.1 from ports, and has each send one datagram to addr and get its
// echo, so that the proxy holds one NAT entry per socket. With every entry
// held and no more traffic, it reads the proxy's RSS and open fds. If it
// cannot make all n entries, it measures the ones it has and says why.
func natEntries(addr string, n int, clientPorts []int, rss func() (int64, error), fds func() (int, error)) (natResult, error) {
	res := natResult{fdsAdded: -1}
	dst, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return res, err
	}
	var sa unix.SockaddrInet4
	copy(sa.Addr[:], dst.IP.To4())
	sa.Port = dst.Port

	time.Sleep(natQuiet)
	before, err := rss()
	if err != nil {
		return res, err
	}
	fdsBefore := -1
	if fds != nil {
		if fdsBefore, err = fds(); err != nil {
			fdsBefore = -1
		}
	}

	var socks []int
	defer func() {
		for _, s := range socks {
			unix.Close(s)
		}
	}()
	var short error // why fewer than n
	next := 0       // next port of clientPorts to try
	held := 0       // sockets that got their echo
	const chunk = 256
	start := time.Now()
	for len(socks) < n && short == nil {
		if time.Since(start) > natBudget {
			short = fmt.Errorf("stopped after %v", natBudget)
			break
		}
		var batch []int
		for len(batch) < chunk && len(socks)+len(batch) < n {
			s, err := natSocket(clientPorts, &next, &sa)
			if err != nil {
				short = err
				break
			}
			batch = append(batch, s)
		}
		socks = append(socks, batch...)
		missing, err := echoEach(batch)
		if err != nil {
			return res, fmt.Errorf("after %d entries: %v", held, err)
		}
		held += len(batch) - missing
		if missing > 0 {
			short = fmt.Errorf("%d sockets got no echo", missing)
		}
	}
	if held == 0 {
		if short == nil {
			short = errors.New("no entry")
		}
		return res, short
	}

	time.Sleep(natSettle)
	after, err := rss()
	if err != nil {
		return res, err
	}
	res.entries = held
	res.kb = float64(after-before) / float64(held)
	if fdsBefore >= 0 {
		if a, err := fds(); err == nil {
			res.fdsAdded = a - fdsBefore
		}
	}
	if short != nil {
		return res, fmt.Errorf("held %d of %d entries: %v", held, n, short)
	}
	return res, nil
}

// natSocket opens a UDP socket bound to the next free port of ports on
// 127.0.0.1 and connected to sa.
func natSocket(ports []int, next *int, sa *unix.SockaddrInet4) (int, error) {
	for *next < len(ports) {
		s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("socket: %v", err)
		}
		port := ports[*next]
		*next++
		err = unix.Bind(s, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}})
		if err == nil {
			err = unix.Connect(s, sa)
			if err == nil {
				return s, nil
			}
		}
		unix.Close(s)
		if !errors.Is(err, unix.EADDRINUSE) && !errors.Is(err, unix.EACCES) {
			return -1, fmt.Errorf("port %d: %v", port, err)
		}
	}
	return -1, fmt.Errorf("ran out of client ports (%d tried)", len(ports))
}

// echoEach sends one datagram on each socket and waits for every echo,
// sending again to sockets that have none after a while. It returns how
// many never got one.
func echoEach(socks []int) (int, error) {
	msg, buf := make([]byte, udpSize), make([]byte, udpSize)
	waiting := map[int]bool{}
	send := func(s int) error {
		if _, err := unix.Write(s, msg); err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.ECONNREFUSED) {
			return err
		}
		return nil
	}
	for _, s := range socks {
		if err := send(s); err != nil {
			return 0, err
		}
		waiting[s] = true
	}
	for try := 0; len(waiting) > 0; try++ {
		if try == natTries {
			return len(waiting), nil
		}
		deadline := time.Now().Add(natRetry)
		for len(waiting) > 0 && time.Now().Before(deadline) {
			pfds := make([]unix.PollFd, 0, len(waiting))
			for s := range waiting {
				pfds = append(pfds, unix.PollFd{Fd: int32(s), Events: unix.POLLIN})
			}
			k, err := unix.Poll(pfds, int(time.Until(deadline).Milliseconds())+1)
			if err != nil && !errors.Is(err, unix.EINTR) {
				return 0, err
			}
			if k <= 0 {
				continue
			}
			for _, p := range pfds {
				if p.Revents == 0 {
					continue
				}
				s := int(p.Fd)
				if m, err := unix.Read(s, buf); err == nil && m == udpSize {
					delete(waiting, s)
				}
			}
		}
		for s := range waiting {
			if err := send(s); err != nil {
				return 0, err
			}
		}
	}
	return 0, nil
}

// natClientPorts are the ports the NAT test's client sockets may bind on
// 127.0.0.1: outside the kernel's ephemeral range, which the proxy needs
// for its upstream sockets (one per entry), and outside 20000-32767, where
// this repository's tests pick their ports.
func natClientPorts() []int {
	lo, hi := ephemeralRange()
	var out []int
	for p := hi + 1; p <= 65535; p++ {
		out = append(out, p)
	}
	for p := min(19999, lo-1); p >= 1024; p-- {
		if p < lo || p > hi {
			out = append(out, p)
		}
	}
	return out
}

// ephemeralRange is net.ipv4.ip_local_port_range, or Linux's default.
func ephemeralRange() (lo, hi int) {
	lo, hi = 32768, 60999
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return lo, hi
	}
	l, err1 := strconv.Atoi(f[0])
	h, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || l > h {
		return lo, hi
	}
	return l, h
}

// natTarget is the number of NAT entries the issue asks for.
const natTarget = 50000

// natDefault is how many NAT entries the machine allows, up to natTarget,
// and if fewer, why. Each entry costs the proxy one socket (an fd and an
// ephemeral port) and the bench one client socket (an fd and a port
// outside the ephemeral range); 1000 fds are left for everything else.
func natDefault(fdHard uint64, ports int, lo, hi int) (int, string) {
	n, why := natTarget, ""
	cut := func(m int, reason string) {
		if m < n {
			n, why = m, reason
		}
	}
	if fdHard < natTarget+1000 {
		cut(int(fdHard)-1000, fmt.Sprintf("the open-file hard limit is %d and each entry costs the proxy one upstream socket (and the bench one client socket); 1000 fds are left for the rest", fdHard))
	}
	cut(hi-lo+1-1000, fmt.Sprintf("each entry's upstream socket takes one of the %d ports of the ephemeral range %d-%d; 1000 are left for the rest", hi-lo+1, lo, hi))
	cut(ports, fmt.Sprintf("only %d client ports lie outside the ephemeral range and the tests' ports", ports))
	return max(n, 1), why
}

// fileLimit is the hard RLIMIT_NOFILE.
func fileLimit() uint64 {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	return lim.Max
}

// openFDs counts a process's open file descriptors.
func openFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// --- CPU ---

// cpuTicks is the user and system CPU time a process has used, in clock
// ticks (USER_HZ, 100 a second on Linux), from /proc/<pid>/stat.
func cpuTicks(pid string) (int64, error) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	return parseCPUTicks(string(b))
}

func parseCPUTicks(stat string) (int64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("no ')' in stat")
	}
	// After comm: state ppid pgrp session tty tpgid flags minflt cminflt
	// majflt cmajflt utime stime.
	f := strings.Fields(stat[i+1:])
	if len(f) < 13 {
		return 0, errors.New("short stat")
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return u + s, nil
}

// cpuBusy is how many ticks each CPU has spent on anything but idle and
// iowait, and of those on softirqs, from /proc/stat, by CPU number.
func cpuBusy() (busy, soft map[int]int64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil, nil, err
	}
	if busy, err = parseCPUBusy(string(b)); err != nil {
		return nil, nil, err
	}
	soft, err = parseCPUSoftirq(string(b))
	return busy, soft, err
}

func parseCPUBusy(stat string) (map[int]int64, error) {
	return parseCPUColumns(stat, func(i int) bool { return i != 3 && i != 4 })
}

// parseCPUSoftirq is the softirq ticks of each CPU: on loopback, mostly
// the packets of the test itself, which no process is charged for.
func parseCPUSoftirq(stat string) (map[int]int64, error) {
	return parseCPUColumns(stat, func(i int) bool { return i == 6 })
}

// parseCPUColumns sums, for each cpuN line, the columns i (0: user) for
// which sum is true.
func parseCPUColumns(stat string, sum func(i int) bool) (map[int]int64, error) {
	out := map[int]int64{}
	for line := range strings.SplitSeq(stat, "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		cpu, err := strconv.Atoi(f[0][3:])
		if err != nil {
			return nil, fmt.Errorf("odd line %q", line)
		}
		var busy int64
		// user nice system idle iowait irq softirq steal
		for i, s := range f[1:9] {
			v, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("odd line %q", line)
			}
			if sum(i) {
				busy += v
			}
		}
		out[cpu] = busy
	}
	if len(out) == 0 {
		return nil, errors.New("no cpuN line")
	}
	return out, nil
}

// cpuMeter measures how busy processes and CPUs are during one or more
// windows, each opened and closed by a call to mark, in percent of one CPU.
type cpuMeter struct {
	pids []string
	open bool

	// at the last mark
	t     time.Time
	ticks []int64
	busy  map[int]int64
	soft  map[int]int64

	// summed over the closed windows; a process or CPU that could not be
	// read in some window is left out
	secs     float64
	sumTicks []int64
	sumBusy  map[int]int64
	sumSoft  map[int]int64
	bad      map[int]bool // by pid index
	badCPU   map[int]bool
}

func newCPUMeter(pids ...string) *cpuMeter {
	return &cpuMeter{pids: pids, sumTicks: make([]int64, len(pids)), sumBusy: map[int]int64{}, sumSoft: map[int]int64{}, bad: map[int]bool{}, badCPU: map[int]bool{}}
}

// mark opens a window, or closes the open one.
func (m *cpuMeter) mark() {
	now := time.Now()
	ticks := make([]int64, len(m.pids))
	for i, p := range m.pids {
		v, err := cpuTicks(p)
		if err != nil {
			v = -1
		}
		ticks[i] = v
	}
	busy, soft, _ := cpuBusy()
	if m.open {
		m.secs += now.Sub(m.t).Seconds()
		for i := range m.pids {
			if ticks[i] < 0 || m.ticks[i] < 0 {
				m.bad[i] = true
			}
			m.sumTicks[i] += ticks[i] - m.ticks[i]
		}
		for cpu, b := range busy {
			if a, ok := m.busy[cpu]; ok {
				m.sumBusy[cpu] += b - a
			} else {
				m.badCPU[cpu] = true
			}
		}
		for cpu, b := range soft {
			if a, ok := m.soft[cpu]; ok {
				m.sumSoft[cpu] += b - a
			}
		}
	}
	m.t, m.ticks, m.busy, m.soft = now, ticks, busy, soft
	m.open = !m.open
}

// cpuPercent is how busy CPU cpu was in the windows, or false.
func (m *cpuMeter) cpuPercent(cpu int) (float64, bool) {
	b, ok := m.sumBusy[cpu]
	if !ok || m.badCPU[cpu] || m.secs <= 0 {
		return 0, false
	}
	return float64(b) / m.secs, true // ticks are 1/100 s
}

// softPercent is how much of CPU cpu softirqs took in the windows, or
// false.
func (m *cpuMeter) softPercent(cpu int) (float64, bool) {
	s, ok := m.sumSoft[cpu]
	if !ok || m.badCPU[cpu] || m.secs <= 0 {
		return 0, false
	}
	return float64(s) / m.secs, true
}

// percent is process i's CPU use in the windows, or false.
func (m *cpuMeter) percent(i int) (float64, bool) {
	if m.bad[i] || m.secs <= 0 {
		return 0, false
	}
	return float64(m.sumTicks[i]) / m.secs, true
}
