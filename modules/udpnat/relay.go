// Package udpnat is the UDP side of a stream: a stateful NAT relay.
//
// A Relay serves the UDP sockets of one stream address. It reads every
// datagram on the socket's own goroutine and looks its source up in a NAT
// table; the first datagram of a new client, once the stream's admission
// policy (streamstate.Policy: access lists, per-source limits,
// max_connections, the NAT cap) lets
// it in, creates an entry with its own connected upstream socket. One
// goroutine per relay, the poller, waits on an epoll instance of its own
// for the replies on every entry's socket and sends them back to each
// client from the stream's address (elsewhere than on Linux, a goroutine
// per entry does). Nothing on the path blocks: a datagram that cannot
// be sent at once (rate budget spent, socket buffer full) is dropped and
// counted, as UDP does, so one slow client never stalls the port.
//
// A relay is kept by its stream's shared state (streamstate.State.Attach),
// one per listen address, with the stream's other runtime state: a reload
// binds a second socket to the same relay (SO_REUSEPORT) and the NAT
// table, with every client's upstream socket, carries over.
package udpnat

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

const (
	// DefaultIdleTimeout evicts a NAT entry after no datagram moved either
	// way for this long, when the stream sets no idle timeout.
	DefaultIdleTimeout = streamstate.DefaultUDPIdleTimeout

	// HardCap bounds the NAT entries of one stream address whatever
	// max_connections says. With max_connections 0 the bound is lower:
	// the share of the open-file limit one stream may take
	// (streamstate.Budget().NATCap), as each entry holds one upstream
	// socket; one source may hold an eighth of it
	// (streamstate.SourceShare), or max_connections_per_ip.
	HardCap = streamstate.MaxNATCap

	// headroom is the room left in front of a datagram read from a client,
	// so a PROXY v2 header can be put there without copying the payload.
	// The longest header without TLVs (IPv6) is 52 bytes.
	headroom = 64

	// maxDatagram is the largest UDP payload.
	maxDatagram = 65535

	// resolveEvery is how often an upstream host name is looked up again.
	resolveEvery = 30 * time.Second
)

// Config is what a UDP stream's settings say about its NAT entries. A new
// entry takes the config in force when it is created and keeps it.
type Config struct {
	// Upstream is host:port.
	Upstream string
	// Picker, when set, picks each new entry's upstream among several
	// (a streamstate.Picker over host:port addresses), and Upstream is
	// not used. A refused upstream (ICMP unreachable) is marked failed
	// there, so the client's next datagram goes to another one.
	Picker *streamstate.Picker
	// PortOffset is added to each upstream's port: the relay serves port
	// listen_port + PortOffset of a stream's port range.
	PortOffset int
	// Policy admits new clients (access lists, max_connections, shared
	// with the stream's TCP connections, and HardCap) and gives each
	// entry its rate limits, idle timeout and connection logging, as it
	// does for TCP in aegis_guard. Nil: a policy without limits.
	Policy *streamstate.Policy
	// ProxyV2 puts a PROXY v2 header in front of every datagram sent
	// upstream.
	ProxyV2 bool
	// Responses is how many datagrams the upstream sends back for each
	// datagram from the client; once they have all come, the entry closes
	// (streamstate.ReasonResponsesDone). 0: entries end on the idle
	// timeout.
	Responses int
	// Logger writes the relay's lines; it names the stream (its name and
	// ID fields), so they add no such field. Connection-log lines go to the
	// stream state's connection logger when one is set.
	Logger *zap.Logger
}

// config is a Config in force, with the upstream's resolved address.
type config struct {
	Config
	idle    time.Duration
	picker  *streamstate.Picker
	targets []atomic.Pointer[netip.AddrPort] // by peer: its resolved address
	cancel  context.CancelFunc               // stops the name resolution loops
}

// has reports whether the config sends to upstream addr.
func (p *config) has(addr string) bool {
	for i := range p.picker.Len() {
		if p.picker.Peer(i).Addr == addr {
			return true
		}
	}
	return false
}

// Relay is the NAT relay of one stream address.
type Relay struct {
	key   string
	state *streamstate.State

	cfg     atomic.Pointer[config]
	entries sync.Map        // netip.AddrPort → *entry
	table   streamstate.Cap // the entries, at most HardCap (by default NATCap)

	mu    sync.Mutex
	socks []*socket
	reply atomic.Pointer[socket] // the socket replies leave from

	poll  atomic.Pointer[poller] // reads the entries' replies (Linux), made with the first entry
	spare spareSockets           // new entries' sockets, made ahead (Linux)

	lastDialLog atomic.Int64
	lastLoopLog atomic.Int64 // when an upstream loop was last logged

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // entries, sweeper (not on Linux), resolvers
}

// Acquire returns the relay of stream state's address listen (host:port),
// which the stream's state keeps (streamstate.State.Attach), creating it
// on first use. Pair every Acquire with one Release.
func Acquire(state *streamstate.State, listen string) *Relay {
	key := "udp/" + listen
	return state.Attach(key, func() caddy.Destructor { return newRelay(key, state) }).(*Relay)
}

// Release drops one reference to r. The last one closes every entry.
func Release(r *Relay) { r.state.Detach(r.key) }

func newRelay(key string, state *streamstate.State) *Relay {
	ctx, cancel := context.WithCancel(context.Background())
	r := &Relay{key: key, state: state, ctx: ctx, cancel: cancel}
	r.table.Max = HardCap
	r.table.Default = int64(streamstate.Budget().NATCap)
	r.startSweep()
	return r
}

// Destruct closes every entry (reason stream_removed, or shutdown when
// Caddy exits) and waits for the relay's goroutines. Sockets must have been
// removed before.
func (r *Relay) Destruct() error {
	reason := streamstate.ReasonStreamRemoved
	if caddy.Exiting() {
		reason = streamstate.ReasonShutdown
	}
	r.cancel()
	if p := r.cfg.Load(); p != nil {
		p.cancel()
	}
	r.entries.Range(func(_, v any) bool {
		v.(*entry).end(reason)
		return true
	})
	r.wg.Wait()
	if p := r.poll.Load(); p != nil {
		p.close()
	}
	r.spare.close()
	return nil
}

// Entries is the number of live NAT entries.
func (r *Relay) Entries() int { return int(r.table.Len()) }

// SetConfig puts c in force for new entries. Entries whose upstream address
// changes are closed (reason config_changed), so that the next datagram of
// their client goes to the new upstream; the others keep running with the
// config they started with.
func (r *Relay) SetConfig(c Config) {
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Policy == nil {
		c.Policy, _ = streamstate.NewPolicy(streamstate.Limits{}, c.Logger)
	}
	p := &config{Config: c, idle: c.Policy.Idle(true), picker: c.Picker}
	if p.picker == nil {
		p.picker, _ = streamstate.NewPicker("", []streamstate.Peer{{Addr: c.Upstream, State: r.state.Upstream(c.Upstream)}}, streamstate.DefaultFailTimeout)
	}
	ctx, cancel := context.WithCancel(r.ctx)
	p.cancel = cancel
	p.targets = make([]atomic.Pointer[netip.AddrPort], p.picker.Len())
	for i := range p.targets {
		if ap, err := netip.ParseAddrPort(p.picker.Peer(i).Addr); err == nil {
			ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()+uint16(c.PortOffset))
			p.targets[i].Store(&ap)
		} else {
			r.wg.Add(1)
			go r.resolve(ctx, p, i)
		}
	}
	old := r.cfg.Swap(p)
	if old == nil {
		return
	}
	old.cancel()
	r.entries.Range(func(_, v any) bool {
		if e := v.(*entry); !p.keeps(e) {
			e.end(streamstate.ReasonConfigChanged)
		}
		return true
	})
}

// keeps reports whether e, made with this config or an earlier one, may
// go on under it: its upstream and port offset are still this config's.
func (p *config) keeps(e *entry) bool {
	return p.has(e.upstream()) && e.cfg.PortOffset == p.PortOffset
}

// resolve looks the upstream's host name up until ctx ends: at once, then
// every resolveEvery (every second while it fails).
func (r *Relay) resolve(ctx context.Context, p *config, i int) {
	defer r.wg.Done()
	upstream := p.picker.Peer(i).Addr
	host, port, _ := net.SplitHostPort(upstream)
	pn, _ := strconv.ParseUint(port, 10, 16)
	failed := false
	for {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ips, err := net.DefaultResolver.LookupNetIP(lctx, "ip", host)
		cancel()
		if ctx.Err() != nil {
			return
		}
		wait := resolveEvery
		if err != nil || len(ips) == 0 {
			if !failed {
				p.Logger.Warn("resolving UDP upstream; new clients are dropped until it resolves",
					zap.String("upstream", upstream), zap.Error(err))
			}
			failed, wait = true, time.Second
		} else {
			ap := netip.AddrPortFrom(ips[0].Unmap(), uint16(int(pn)+p.PortOffset))
			p.targets[i].Store(&ap)
			failed = false
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// socket is one listening UDP socket of the relay.
type socket struct {
	r        *Relay
	pc       *net.UDPConn
	rc       syscall.RawConn
	local    netip.AddrPort
	v6       bool // an AF_INET6 socket: clients are IPv6 or IPv4-mapped
	wildcard bool // bound to every address: the destination comes from IP_PKTINFO
	done     chan struct{}

	// The reader goroutine's scratch for writing upstream, where entries
	// have Go's poller (not on Linux).
	out     []byte
	werr    error
	writeFn func(uintptr) bool
}

// AddSocket starts serving pc, a UDP socket bound to the relay's address.
// New replies leave from the newest socket.
func (r *Relay) AddSocket(pc *net.UDPConn) error {
	rc, err := pc.SyscallConn()
	if err != nil {
		return err
	}
	// The log's pacers ask whether the socket has datagrams waiting (see
	// logpace), until RemoveSocket.
	_ = rc.Control(func(fd uintptr) { logpace.Watch(int(fd)) })
	local := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	s := &socket{r: r, pc: pc, rc: rc, local: local, v6: local.Addr().Is6() && !local.Addr().Is4In6(), wildcard: local.Addr().IsUnspecified(), done: make(chan struct{})}
	r.mu.Lock()
	r.socks = append(r.socks, s)
	r.reply.Store(s)
	r.mu.Unlock()
	r.state.ListenerUp(streamstate.UDP)
	go s.serve()
	return nil
}

// RemoveSocket stops serving pc: replies move to another socket of the
// relay, closeFn closes pc, and RemoveSocket returns when its reader has.
func (r *Relay) RemoveSocket(pc *net.UDPConn, closeFn func() error) {
	r.mu.Lock()
	var s *socket
	for i, x := range r.socks {
		if x.pc == pc {
			s = x
			r.socks = append(r.socks[:i], r.socks[i+1:]...)
			break
		}
	}
	var next *socket
	if n := len(r.socks); n > 0 {
		next = r.socks[n-1]
	}
	r.reply.Store(next)
	r.mu.Unlock()
	if s != nil {
		_ = s.rc.Control(func(fd uintptr) { logpace.Unwatch(int(fd)) }) // AddSocket's Watch
	}
	_ = closeFn()
	if s != nil {
		<-s.done
		r.state.ListenerDown(streamstate.UDP)
	}
}

// serve reads datagrams until the socket is closed.
func (s *socket) serve() {
	defer close(s.done)
	s.readLoop()
}

// readError handles a failed read: it reports whether the socket is closed,
// and otherwise (ICMP errors and the like) waits a little longer each time
// the error repeats.
func readError(err error, backoff *time.Duration) (closed bool) {
	if isClosed(err) {
		return true
	}
	*backoff = min(max(2**backoff, time.Millisecond), 100*time.Millisecond)
	time.Sleep(*backoff)
	return false
}

// datagram relays one client datagram, which sits at buf[headroom:][:n].
// With accept_proxy_protocol, a front proxy's PROXY header at its start
// names the client and is taken off.
func (r *Relay) datagram(s *socket, buf []byte, n int, src netip.AddrPort, oob []byte) {
	var e *entry
	if v, ok := r.entries.Load(src); ok {
		e = v.(*entry)
	}
	off := 0
	var pa streamstate.ProxyAddrs
	if p := r.cfg.Load(); p != nil && p.Policy.AcceptsProxy() {
		// The header's addresses matter only to a new entry.
		var ok bool
		if off, pa, ok = p.Policy.ProxyDatagram(r.state, buf[headroom:headroom+n], src, e == nil || e.gone()); !ok {
			return
		}
	}
	if e != nil && e.expect() {
		r.forward(s, e, buf, n, off)
		return
	}
	// A new client, or its entry has ended (or got all its answers and is
	// closing): a new entry. Its socket is registered with the poller
	// after its first datagram went upstream, so that the epoll_ctl is not
	// on the query's way (a flow of DNS is one query); an answer that came
	// meanwhile waits in the socket, and the poller (level-triggered) is
	// told of it as soon as the socket is in.
	e, opened := r.open(s, src, oob, pa)
	if e == nil {
		return
	}
	e.expect()
	r.forward(s, e, buf, n, off)
	if !opened {
		return // another socket's, which starts it
	}
	if err := startEntry(r, e); err != nil {
		// The datagram went upstream (it is counted sent, not dropped),
		// but no answer can be read: the entry ends.
		r.logDialError(e.upstream(), err)
		e.finish(streamstate.ReasonUpstreamError)
	}
}

// startEntry is Relay.start, but in tests.
var startEntry = (*Relay).start

// storing is called as a new entry is about to be stored: a test's hook.
var storing = func(*entry) {}

// forward sends the client datagram at buf[headroom+off:headroom+n] (off:
// the PROXY header taken off) upstream on e, which expects it.
func (r *Relay) forward(s *socket, e *entry, buf []byte, n, off int) {
	now := time.Now()
	e.last.Store(now.UnixNano())
	size := n - off
	if e.up != nil && !e.up.Allow(now, size) {
		r.state.DropDatagrams(streamstate.DropRateLimit, 1)
		if e.unexpect() {
			e.end(streamstate.ReasonResponsesDone) // every answer expected came meanwhile
		}
		return
	}
	start := headroom + off
	if len(e.hdr) > 0 {
		// The header goes in the room before the payload (where a
		// stripped header was, or the headroom).
		start -= len(e.hdr)
		copy(buf[start:headroom+off], e.hdr)
	}
	p := buf[start : headroom+n]
	switch err := s.sendUpstream(e, p, size); {
	case err == nil:
	case isRefused(err):
		r.state.DropDatagrams(streamstate.DropUpstreamRefused, 1)
		e.refused(err)
		e.end(streamstate.ReasonUpstreamError)
	default:
		// A full buffer, or the entry closed meanwhile: UDP drops.
		r.state.DropDatagrams(streamstate.DropBufferFull, 1)
		if e.unexpect() {
			e.end(streamstate.ReasonResponsesDone) // every answer expected came meanwhile
		}
	}
}

// open creates the NAT entry of a new client (opened), for the caller to
// start, or returns the one another of the relay's sockets just stored for
// it, or nil when the datagram is to be dropped. pa are the client's
// addresses from a front proxy's PROXY header (invalid: src is the
// client).
func (r *Relay) open(s *socket, src netip.AddrPort, oob []byte, pa streamstate.ProxyAddrs) (e *entry, opened bool) {
	p := r.cfg.Load()
	if p == nil {
		return nil, false
	}
	ip := src.Addr().Unmap()
	client := netip.AddrPortFrom(ip, src.Port())
	if pa.Source.IsValid() {
		client = pa.Source
	}
	pol := p.Policy
	adm, ok := pol.Admit(r.state, client, true, &r.table)
	if !ok {
		return nil, false
	}
	dst := s.local
	if s.wildcard {
		if a, ok := parseDst(oob); ok {
			dst = netip.AddrPortFrom(a, s.local.Port())
		}
	}
	hsrc, hdst := src, dst // for the PROXY header sent upstream
	if pa.Source.IsValid() {
		hsrc = pa.Source
		if pa.Dest.IsValid() {
			hdst = pa.Dest
		}
	}
	// The picked upstream, or the next one not tried while one cannot be
	// used (its name does not resolve, it is one of this process's
	// stream listeners, no socket opens).
	var tried streamstate.Tried
	drop := streamstate.DropUpstreamUnresolved
	looped := false
	for e == nil {
		i := p.picker.Pick(client.Addr(), tried)
		if i < 0 {
			pol.Unadmit(r.state, adm)
			if !looped {
				r.state.DropDatagrams(drop, 1)
			}
			return nil, false
		}
		tried.Add(i)
		target := p.targets[i].Load()
		if target == nil {
			continue
		}
		if streamstate.IsOwnListener(true, *target) {
			// A datagram sent there would come back as a new client, and
			// so on until the process has no socket left.
			looped = true
			r.state.UpstreamLoops.Add(1)
			r.state.DialFailures.Add(1)
			if pol.LogConnections {
				r.state.LogBlocked(p.Logger, pol.Name, client, streamstate.ReasonUpstreamLoop, true)
			}
			r.logLoop(p, *target)
			continue
		}
		var err error
		if e, err = r.newEntry(s, p, *target, src, dst, hsrc, hdst); err != nil {
			drop = streamstate.DropUpstreamSocket
			r.logDialError(p.picker.Peer(i).Addr, err)
			continue
		}
		e.peer = i
	}
	e.ss = pol.Open(r.state, e, client, true, adm)
	e.ss.SetListenPort(int(s.local.Port()))
	storing(e)
	// Two sockets of the relay (during a reload) may open the same client
	// at once; the first one stored wins.
	for {
		v, loaded := r.entries.LoadOrStore(src, e)
		if !loaded {
			break
		}
		if old := v.(*entry); !old.gone() {
			e.discard()
			return old, false
		}
		r.entries.CompareAndDelete(src, v)
	}
	// SetConfig swaps the config and then ends the entries the new one
	// does not keep: one stored after that sweep is held to its test
	// here, and made again under the new config.
	if np := r.cfg.Load(); np != p && !np.keeps(e) {
		r.entries.CompareAndDelete(src, e)
		e.discard()
		return r.open(s, src, oob, pa)
	}
	// Counted once it is stored: a twin discarded above never went.
	e.ss.SetPeer(p.picker.Peer(e.peer).State, p.Picker != nil)
	r.state.Total.Add(1)
	r.wg.Add(1)
	r.state.ConnStarted()
	return e, true
}

// logLoop logs an upstream loop at most once a second.
func (r *Relay) logLoop(p *config, target netip.AddrPort) {
	now := time.Now().UnixNano()
	last := r.lastLoopLog.Load()
	if now-last < int64(time.Second) || !r.lastLoopLog.CompareAndSwap(last, now) {
		return
	}
	p.Logger.Error("UDP upstream is one of this process's own stream listeners; datagram dropped",
		zap.String("upstream", p.Upstream), zap.Stringer("address", target),
		zap.String("disconnect_reason", streamstate.ReasonUpstreamLoop.String()),
		zap.Uint64("upstream_loops", r.state.UpstreamLoops.Load()))
}

// logDialError logs a failed upstream socket at most once a second: EMFILE
// under a flood of new clients would otherwise flood the log.
func (r *Relay) logDialError(upstream string, err error) {
	now := time.Now().UnixNano()
	last := r.lastDialLog.Load()
	if now-last < int64(time.Second) || !r.lastDialLog.CompareAndSwap(last, now) {
		return
	}
	r.cfg.Load().Logger.Warn("opening UDP upstream socket; datagram dropped",
		zap.String("upstream", upstream), zap.Error(err))
}
