package l4aegisproxy

import (
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	proxyproto "github.com/pires/go-proxyproto"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/deadlineheap"
	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// The event loop serves a plain TCP stream's connections from accept to
// close without a goroutine, a net.Conn or a buffer of their own: a loop
// watches the listener's socket beside its connections, takes each new
// connection with accept4 (Accepter), admits it by the guard's policy and
// starts a non-blocking connect to the upstream the handler's picker
// chose (Direct.Serve); from then on one of the loops (one per
// GOMAXPROCS) owns both sockets. Each loop is one goroutine that waits
// for its epoll set in Go's netpoller, as the parker does, so one wake
// accepts and relays; it moves the bytes of its ready
// connections through its one buffer (read/write), or through a pipe
// (splice) once a direction reads bulkStep at once. A connection keeps
// only the bytes it could not write yet (loopDir.pending).
//
// A connection ends once, in the loop (or in Wake, under the loop's lock):
// its sockets are closed and its session finished (Session.Finish: the
// policy's End with the connection log, and the caller's ConnDone), the
// end path that a parked connection takes too.

// loopLinger is how long a loop stays up with no connection.
const loopLinger = time.Second

// loopEvents are registered once per socket, edge-triggered: a socket
// reports each time it becomes readable or writable, and the loop keeps
// what it was told (loopConn.ready) until a call says EAGAIN.
const loopEvents = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET

// acceptBatch is the most connections one wake of an accept loop takes.
const acceptBatch = 16

// stepBudget is the most bytes one direction moves in one step: a bulk
// transfer whose ends keep up would otherwise hold the loop (and its
// lock: new connections, closes) for as long as it runs. A direction
// that used it up is stepped again at the loop's next turn, which then
// does not wait (loop.again).
const stepBudget = 4 << 20

const (
	sideClient   = 0
	sideUpstream = 1

	canRead  = 1
	canWrite = 2
	// peerEnded: the side reported its end (or an error) already, which
	// brings no further event: read on to the end, short reads or not.
	peerEnded = 4
)

// Direct is the event loop's way to serve a stream's connections: the
// guard's policy and the proxy handler of the stream's chain (its picker,
// its upstreams' state, its settings), with each upstream's address
// resolved once. Connections served by it keep it to their end; a new
// config makes a new one for new connections.
type Direct struct {
	policy *streamstate.Policy
	state  *streamstate.State // the guard's
	h      *Handler
	addrs  []rawSockaddr // by picker index
	many   bool
}

// rawSockaddr is an upstream's address as connect(2) takes it.
type rawSockaddr struct {
	ap     netip.AddrPort
	family int
	len    uint32
	raw    [unsafe.Sizeof(unix.RawSockaddrInet6{})]byte
}

// NewDirect returns the loop's way to serve the connections of a chain of
// the guard's policy p and state st and the proxy handler h (provisioned;
// in the streams app both handlers share the stream's state), or nil when
// they need the chain: a rate limit, a front proxy's PROXY header, TLS to
// the upstream, a port range (its Accepters would hold a second
// descriptor for each of its ports), or an upstream named by a host name. The
// caller checks what is outside both (no TLS termination).
func NewDirect(p *streamstate.Policy, st *streamstate.State, h *Handler) *Direct {
	if p == nil || h == nil || h.picker == nil || h.TLS != nil || h.ListenPort > 0 ||
		p.AcceptsProxy() || p.UploadRate > 0 || p.DownloadRate > 0 {
		return nil
	}
	d := &Direct{policy: p, state: st, h: h, addrs: make([]rawSockaddr, h.picker.Len()), many: len(h.Upstreams) > 0}
	for i := range d.addrs {
		ap, err := netip.ParseAddrPort(h.picker.Peer(i).Addr)
		if err != nil || ap.Addr().Zone() != "" {
			return nil
		}
		d.addrs[i] = toRawSockaddr(ap)
	}
	return d
}

func toRawSockaddr(ap netip.AddrPort) rawSockaddr {
	r := rawSockaddr{ap: ap}
	a := ap.Addr().Unmap()
	port := ap.Port()
	if a.Is4() {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.raw))
		sa.Family = unix.AF_INET
		sa.Addr = a.As4()
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		r.family, r.len = unix.AF_INET, uint32(unsafe.Sizeof(unix.RawSockaddrInet4{}))
		r.ap = netip.AddrPortFrom(a, port)
		return r
	}
	sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(&r.raw))
	sa.Family = unix.AF_INET6
	sa.Addr = a.As16()
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(port>>8), byte(port)
	r.family, r.len = unix.AF_INET6, uint32(unsafe.Sizeof(unix.RawSockaddrInet6{}))
	return r
}

// Accepted is a connection taken from a listener by an Accepter: its
// socket (non-blocking) and its client's address.
type Accepted struct {
	fd   int
	peer netip.AddrPort
}

// Close closes the accepted socket.
func (acc Accepted) Close() { rawClose(acc.fd) }

// Conn hands the accepted socket to Go's net package, for a connection
// that the handler chain serves after all (the stream's settings changed
// while its listener was on the loop's path). The accepted socket is
// closed when it returns, whether it worked (the net.Conn has a duplicate)
// or not: the caller must not Close it.
func (acc Accepted) Conn() (net.Conn, error) {
	f := os.NewFile(uintptr(acc.fd), "")
	c, err := net.FileConn(f)
	f.Close()
	return c, err
}

// Accepter takes connections from a TCP listener's socket with accept4,
// in an event loop: while Run runs, the listener is in the loop's epoll
// set beside the loop's connections, so one wake of the loop both
// accepts and relays. No net.Conn, and neither getsockname nor
// getpeername (accept4 gives the client's address, the listener its
// own). Accepted sockets inherit TCP_NODELAY and SO_KEEPALIVE from the
// listener, which NewAccepter sets. It uses a duplicate of the
// listener's descriptor, so the socket stays open until Close too.
type Accepter struct {
	fd    int
	local netip.AddrPort // the listener's; its address is unspecified for a wildcard listen

	// mu is held by the loop while it accepts and serves a batch, and by
	// Run and Close: Close never closes fd under an accept4.
	mu     sync.Mutex
	closed bool
	l      *loop // the loop watching fd while Run runs
	slot   int   // fd's index in l.listeners
	serve  func([]Accepted) bool
	ended  chan error // Run's result
	got    []Accepted
	rsa    unix.RawSockaddrAny
	rlen   uint32
}

// NewAccepter readies ln's socket for Run.
func NewAccepter(ln *net.TCPListener) (*Accepter, error) {
	lrc, err := ln.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd, serr := -1, error(nil)
	if err := lrc.Control(func(lfd uintptr) {
		if serr = unix.SetsockoptInt(int(lfd), unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); serr == nil {
			fd, serr = unix.FcntlInt(lfd, unix.F_DUPFD_CLOEXEC, 0)
		}
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	a := &Accepter{fd: fd, got: make([]Accepted, 0, acceptBatch)}
	if ta, ok := ln.Addr().(*net.TCPAddr); ok {
		a.local = ta.AddrPort()
	}
	return a, nil
}

// Run hands the listener to an event loop, which accepts connections as
// they come and gives each batch (at most acceptBatch; the slice is
// reused) to serve. It returns nil once serve returns false, the error of
// accept4 (out of descriptors: the caller waits and runs again), or
// os.ErrClosed after Close. One goroutine runs it at a time.
func (a *Accepter) Run(serve func(got []Accepted) bool) error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return os.ErrClosed
	}
	ended := make(chan error, 1)
	a.serve, a.ended = serve, ended
	if err := pickLoop().listen(a); err != nil {
		a.mu.Unlock()
		return err
	}
	a.mu.Unlock()
	return <-ended
}

// Close ends Run (os.ErrClosed) and closes the Accepter's descriptor of
// the socket. Call it after closing the listener.
func (a *Accepter) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	a.stopLocked(os.ErrClosed)
	rawClose(a.fd)
	return nil
}

// take accepts what is pending and serves it; the loop l calls it, with
// no lock held, when the listener is readable.
func (a *Accepter) take(l *loop) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.l != l {
		return // closed or moved since the event
	}
	a.got = a.got[:0]
	err := a.accept()
	keep := true
	if len(a.got) > 0 {
		keep = a.serve(a.got)
		clear(a.got)
	}
	switch {
	case err != nil:
		a.stopLocked(err)
	case !keep:
		a.stopLocked(nil)
	}
}

// accept takes at most acceptBatch connections into a.got; the listener
// is level-triggered, so what it leaves comes back at the loop's next
// turn.
func (a *Accepter) accept() error {
	for len(a.got) < cap(a.got) {
		a.rlen = uint32(unsafe.Sizeof(a.rsa))
		nfd, _, e := unix.RawSyscall6(unix.SYS_ACCEPT4, uintptr(a.fd), uintptr(unsafe.Pointer(&a.rsa)), uintptr(unsafe.Pointer(&a.rlen)),
			unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0, 0)
		switch e {
		case 0:
			a.got = append(a.got, Accepted{fd: int(nfd), peer: rawAddrPort(&a.rsa)})
			continue
		case unix.EINTR, unix.ECONNABORTED:
			continue
		case unix.EAGAIN:
			return nil
		}
		return os.NewSyscallError("accept4", e)
	}
	return nil
}

// stopLocked takes the listener out of its loop, if it is in one, and
// ends Run with err. Under a.mu.
func (a *Accepter) stopLocked(err error) {
	if a.l == nil {
		return
	}
	a.l.unlisten(a)
	a.l = nil
	a.ended <- err
}

// rawAddrPort is the address of a raw IPv4 or IPv6 socket address.
func rawAddrPort(rsa *unix.RawSockaddrAny) netip.AddrPort {
	switch rsa.Addr.Family {
	case unix.AF_INET:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	case unix.AF_INET6:
		sa := (*unix.RawSockaddrInet6)(unsafe.Pointer(rsa))
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(p[0])<<8|uint16(p[1]))
	}
	return netip.AddrPort{}
}

// localAddr is the address the client connected to: the listener's, or
// for a wildcard listen the socket's own (one getsockname).
func (a *Accepter) localAddr(fd int) netip.AddrPort {
	if !a.local.Addr().IsUnspecified() {
		return a.local
	}
	var rsa unix.RawSockaddrAny
	l := uint32(unsafe.Sizeof(rsa))
	if _, _, e := unix.RawSyscall(unix.SYS_GETSOCKNAME, uintptr(fd), uintptr(unsafe.Pointer(&rsa)), uintptr(unsafe.Pointer(&l))); e != 0 {
		return a.local
	}
	return rawAddrPort(&rsa)
}

// noClose is a loop connection's client as its session sees it: the loop
// closes the sockets itself (Session.Close reaches it as the Waker).
type noClose struct{}

func (noClose) Close() error { return nil }

// Serve admits an accepted connection by the stream's policy and hands it
// to a loop, which connects to the upstream and relays; done is the
// caller's end of the connection (ConnDone), called once when it ends
// (refused included). It does not block.
func (d *Direct) Serve(a *Accepter, acc Accepted, done func()) {
	st, p := d.state, d.policy
	st.Total.Add(1)
	adm, ok := p.Admit(st, acc.peer, false, nil)
	if !ok {
		rawClose(acc.fd)
		done()
		return
	}
	ss := p.Open(st, noClose{}, acc.peer, false, adm)
	ss.AllowDetach(p, done)
	ss.Detach()
	start := time.Now().UnixNano()
	var hdr []byte
	if d.h.ProxyProtocol > 0 {
		local := a.localAddr(acc.fd)
		h := proxyproto.HeaderProxyFromAddrs(byte(d.h.ProxyProtocol), net.TCPAddrFromAddrPort(acc.peer), net.TCPAddrFromAddrPort(local))
		var err error
		if hdr, err = h.Format(); err != nil {
			ss.SetReason(streamstate.ReasonProxyHeaderFailed)
			rawClose(acc.fd)
			ss.Finish()
			return
		}
	}
	var tried streamstate.Tried
	up, i, err := d.dial(ss.Source.Addr(), &tried, start)
	if err != nil {
		d.h.dialFailed(ss, err)
		rawClose(acc.fd)
		ss.Finish()
		return
	}
	l := pickLoop()
	l.mu.Lock()
	if !l.running {
		if err := l.start(); err != nil {
			l.mu.Unlock()
			rawClose(up)
			rawClose(acc.fd)
			ss.SetReason(streamstate.ReasonUpstreamError)
			ss.Finish()
			return
		}
	}
	c := l.newConn()
	c.d, c.ss, c.start, c.tried, c.peer = d, ss, start, tried, i
	c.idle = int64(ss.IdleTimeout)
	c.half = d.h.HalfClose
	c.dirs[dirUp].pending, c.header = hdr, uint16(len(hdr))
	c.fd = [2]int32{int32(acc.fd), int32(up)}
	c.connecting = true
	c.wake = start + int64(d.h.dialer.Timeout)
	l.timers.Push(c)
	werr := l.watchLocked(c, sideClient)
	if werr == nil {
		werr = l.watchLocked(c, sideUpstream)
	}
	ss.SetWaker(c)
	// Close stores closed before it asks the Waker: either it found c, or
	// this sees it closed.
	closed := ss.Closed() || werr != nil
	if werr != nil {
		ss.SetReason(streamstate.ReasonUpstreamError)
	}
	if closed {
		l.closeLocked(c)
	} else if l.sleep == 0 || c.wake < l.sleep {
		l.wakeAtLocked(c.wake)
	}
	l.mu.Unlock()
	if closed {
		ss.Finish()
	}
}

// dial starts a non-blocking connect to the upstream the picker chooses
// for client, trying the next one when the connect fails at once. It
// returns the socket and the upstream's index; or index -1 when it
// started none, with the last connect's error, or with nil when every
// upstream had been tried before the call.
func (d *Direct) dial(client netip.Addr, tried *streamstate.Tried, start int64) (int, int, error) {
	p := d.h.picker
	var err error
	for {
		i := 0
		if p.Len() > 1 {
			if i = p.Pick(client, *tried); i < 0 {
				return -1, -1, err
			}
		}
		tried.Add(i)
		var fd int
		if fd, err = d.connect(i); err == nil {
			return fd, i, nil
		}
		if !d.upstreamFailed(i, err) || p.Len() == 1 || time.Now().UnixNano() >= start+int64(d.h.dialer.Timeout) {
			return -1, -1, err
		}
	}
}

// connect makes upstream i's socket and starts connecting it.
func (d *Direct) connect(i int) (int, error) {
	sa := &d.addrs[i]
	if streamstate.IsOwnListener(false, sa.ap) {
		return -1, d.dialError(i, streamstate.ErrUpstreamLoop)
	}
	fd, err := rawSocket(sa.family)
	if err != nil {
		return -1, d.dialError(i, os.NewSyscallError("socket", err))
	}
	rawSetsockoptOn(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	rawSetsockoptOn(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	for {
		_, _, e := unix.RawSyscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa.raw)), uintptr(sa.len))
		switch e {
		case 0, unix.EINPROGRESS:
			return fd, nil
		case unix.EINTR:
			continue
		}
		rawClose(fd)
		return -1, d.dialError(i, os.NewSyscallError("connect", e))
	}
}

// dialError is err of a dial to upstream i as net.Dialer words it ("dial
// tcp 10.0.0.5:5432: connect: connection refused"), for the upstream's
// last error and the log.
func (d *Direct) dialError(i int, err error) error {
	return &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(d.addrs[i].ap), Err: err}
}

// upstreamFailed records that connecting to upstream i failed, as the
// dialer does, and reports whether another may be tried (not an upstream
// loop, not the stream stopping).
func (d *Direct) upstreamFailed(i int, err error) bool {
	if d.h.state.Context().Err() != nil {
		return false
	}
	d.h.picker.Failed(i, err)
	if d.many {
		d.h.logger.Debug("dialing upstream; trying the next", zap.String("upstream", d.h.picker.Peer(i).Addr), zap.Error(err))
	}
	return true
}

// loops are the event loops, one per GOMAXPROCS; each starts with its
// first connection and stops a loopLinger after its last.
var (
	loopsOnce sync.Once
	allLoops  []*loop
	nextLoop  atomic.Uint32
)

func theLoops() []*loop {
	loopsOnce.Do(func() {
		allLoops = make([]*loop, max(runtime.GOMAXPROCS(0), 1))
		for i := range allLoops {
			allLoops[i] = &loop{buf: make([]byte, copyBufSize)}
			allLoops[i].waitFn = allLoops[i].collect
		}
	})
	return allLoops
}

func pickLoop() *loop {
	allLoops := theLoops()
	if len(allLoops) == 1 {
		return allLoops[0]
	}
	return allLoops[nextLoop.Add(1)%uint32(len(allLoops))]
}

// loop is one event loop: its epoll set, its connections by slot, their
// deadlines and its buffer. mu guards all of it and every loopConn's
// fields; the loop holds it while it handles a wake, Serve while it adds
// a connection, Wake while it ends one.
type loop struct {
	mu      sync.Mutex
	running bool
	epfd    int
	ep      *os.File
	rc      syscall.RawConn
	events  [128]unix.EpollEvent
	n       int
	waitFn  func(uintptr) bool
	conns   []*loopConn // by slot, free ones included
	free    []int32
	count   int
	gen     uint32
	emptyAt int64
	timers  deadlineheap.Heap[*loopConn]
	sleep   int64
	round   uint32
	ready   []*loopConn            // with events this wake
	again   []*loopConn            // a direction used up its stepBudget: step again
	ended   []*streamstate.Session // ended on the loop's goroutine, to finish
	// listeners are the Accepters whose sockets are in the epoll set, by
	// slot (-1-slot in an event); listening counts them. readable are
	// those an event named this wake: the loop's goroutine takes them
	// after the connections' steps, outside mu.
	listeners []*Accepter
	listening int
	readable  []*Accepter
	buf       []byte // the loop's one buffer, used within one step
	now       int64
}

// loopConn is a connection owned by a loop: its session, its two
// sockets, what they last said, and per direction what it holds. It is
// its session's Waker. Kept by the loop for reuse once ended.
type loopConn struct {
	l          *loop
	slot       int32
	gen        uint32
	d          *Direct
	ss         *streamstate.Session
	fd         [2]int32 // by side; -1: closed
	ready      [2]uint8 // by side: canRead, canWrite until EAGAIN; peerEnded
	hup        bool     // the upstream socket reported an error or hang-up
	connecting bool
	half       bool
	ending     bool // one side ended without half-close: flush, then end
	peer       int
	tried      streamstate.Tried
	start      int64 // when the dial began (unix nanoseconds)
	idle       int64
	last       int64
	wake       int64 // the deadline in the heap
	heap       int
	round      uint32
	again      bool   // in loop.again
	header     uint16 // bytes of the PROXY header still at the head of dirs[dirUp]: not the client's
	dirs       [2]loopDir
}

// loopDir is one direction of a loop connection: bytes read and not yet
// written (a copy of the rest of a partial write, or a pipe's content
// with splice), and its end.
type loopDir struct {
	pending []byte
	pipe    *pipe
	inPipe  int
	bulk    bool // the last read moved bulkStep or more: splice the next
	eof     bool // the source sent its end (or the direction failed)
	shut    bool // the end was passed on (half-close)
}

func (c *loopConn) Deadline() int64 { return c.wake }
func (c *loopConn) HeapIndex() *int { return &c.heap }

// start makes the loop's epoll set and starts its goroutine. Under mu.
func (l *loop) start() error {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return err
	}
	ep := os.NewFile(uintptr(epfd), "loop")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return err
	}
	logpace.Watch(epfd) // the log's pacers ask it (see logpace), until run closes it
	l.epfd, l.ep, l.rc, l.running, l.sleep = epfd, ep, rc, true, 0
	l.emptyAt = time.Now().UnixNano()
	go l.run()
	return nil
}

func (l *loop) newConn() *loopConn {
	var c *loopConn
	if n := len(l.free); n > 0 {
		c = l.conns[l.free[n-1]]
		l.free = l.free[:n-1]
	} else {
		c = &loopConn{l: l, slot: int32(len(l.conns)), heap: -1}
		l.conns = append(l.conns, c)
	}
	l.gen++
	c.gen = l.gen & (1<<31 - 1)
	c.ready = [2]uint8{}
	c.hup, c.ending, c.round = false, false, l.round-1
	c.last = time.Now().UnixNano()
	l.count++
	return c
}

// watchLocked registers one of c's sockets in the epoll set, tagged with
// c's slot, generation and the side. It fails only short of memory.
func (l *loop) watchLocked(c *loopConn, side int) error {
	ev := unix.EpollEvent{Events: loopEvents, Fd: c.slot, Pad: int32(c.gen<<1 | uint32(side))}
	_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.epfd), unix.EPOLL_CTL_ADD, uintptr(c.fd[side]), uintptr(unsafe.Pointer(&ev)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// collect takes the events ready now, without waiting; false: none.
func (l *loop) collect(fd uintptr) bool {
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, fd, uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)), 0, 0, 0)
	if e != 0 || n == 0 {
		return false
	}
	l.n = int(n)
	return true
}

// run is the loop's goroutine, until nothing was open for loopLinger.
func (l *loop) run() {
	var fin []*streamstate.Session
	for {
		l.mu.Lock()
		l.now = time.Now().UnixNano()
		l.expireLocked()
		var until int64
		if len(l.timers) > 0 {
			until = l.timers.Top().wake
		}
		if l.count == 0 && l.listening == 0 {
			until = l.emptyAt + int64(loopLinger)
			if until <= l.now {
				l.running = false
				logpace.Unwatch(l.epfd)
				l.ep.Close()
				l.ep, l.rc = nil, nil
				// Every connection ended: what a burst left goes.
				l.conns, l.free, l.timers = nil, nil, nil
				fin = l.takeEndedLocked(fin)
				l.mu.Unlock()
				finish(fin)
				return
			}
		}
		l.wakeAtLocked(until)
		l.n = 0
		rc, again := l.rc, len(l.again) > 0
		fin = l.takeEndedLocked(fin)
		l.mu.Unlock()
		finish(fin)

		if again {
			// Steps to finish: take the events ready now, no wait.
			if !l.collect(uintptr(l.epfd)) {
				l.n = 0
			}
		} else {
			// Returns with events, or at the deadline.
			_ = rc.Read(l.waitFn)
		}
		l.mu.Lock()
		l.now = time.Now().UnixNano()
		l.dispatchLocked()
		fin = l.takeEndedLocked(fin)
		l.mu.Unlock()
		finish(fin)
		for i, a := range l.readable {
			a.take(l)
			l.readable[i] = nil
		}
		l.readable = l.readable[:0]
		logpace.Served()
	}
}

// listen puts a's socket in the loop's epoll set (level-triggered),
// starting the loop if it is not running. Under a.mu.
func (l *loop) listen(a *Accepter) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.running {
		if err := l.start(); err != nil {
			return err
		}
	}
	slot := slices.Index(l.listeners, nil)
	if slot < 0 {
		slot = len(l.listeners)
		l.listeners = append(l.listeners, nil)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(-1 - slot)}
	if _, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.epfd), unix.EPOLL_CTL_ADD, uintptr(a.fd), uintptr(unsafe.Pointer(&ev)), 0, 0); e != 0 {
		return os.NewSyscallError("epoll_ctl", e)
	}
	l.listeners[slot] = a
	l.listening++
	a.l, a.slot = l, slot
	return nil
}

// unlisten takes a's socket out of the epoll set. Under a.mu.
func (l *loop) unlisten(a *Accepter) {
	l.mu.Lock()
	defer l.mu.Unlock()
	unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(l.epfd), unix.EPOLL_CTL_DEL, uintptr(a.fd), 0, 0, 0)
	l.listeners[a.slot] = nil
	if l.listening--; l.listening == 0 && l.count == 0 {
		l.emptyAt = time.Now().UnixNano()
		l.wakeAtLocked(l.emptyAt + int64(loopLinger))
	}
}

// takeEndedLocked moves the sessions of the connections the loop ended
// under mu into fin, to be finished once mu is let go.
func (l *loop) takeEndedLocked(fin []*streamstate.Session) []*streamstate.Session {
	fin = append(fin[:0], l.ended...)
	clear(l.ended)
	l.ended = l.ended[:0]
	return fin
}

// finish finishes the sessions of ended connections (their sockets are
// closed): the policy's End with the connection log, and ConnDone.
func finish(fin []*streamstate.Session) {
	for i, ss := range fin {
		ss.Finish()
		fin[i] = nil
	}
}

// dispatchLocked records what each event says about its socket and
// steps each connection that had one.
func (l *loop) dispatchLocked() {
	l.round++
	for _, ev := range l.events[:l.n] {
		slot, side, gen := ev.Fd, int(ev.Pad&1), uint32(ev.Pad)>>1
		if slot < 0 {
			if i := int(-1 - slot); i < len(l.listeners) && l.listeners[i] != nil {
				l.readable = append(l.readable, l.listeners[i])
			}
			continue
		}
		if int(slot) >= len(l.conns) {
			continue
		}
		c := l.conns[slot]
		if c.ss == nil || c.gen != gen {
			continue // an event of a connection ended since
		}
		if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			c.ready[side] |= canRead
		}
		if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			c.ready[side] |= peerEnded
		}
		if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			c.ready[side] |= canWrite
		}
		if side == sideUpstream && ev.Events&(unix.EPOLLERR|unix.EPOLLHUP) != 0 {
			c.hup = true
		}
		if c.round != l.round {
			c.round = l.round
			l.ready = append(l.ready, c)
		}
	}
	l.n = 0
	for i, c := range l.again {
		c.again = false
		if c.round != l.round {
			c.round = l.round
			l.ready = append(l.ready, c)
		}
		l.again[i] = nil
	}
	l.again = l.again[:0]
	for i, c := range l.ready {
		if c.ss != nil {
			l.stepLocked(c)
		}
		l.ready[i] = nil
	}
	l.ready = l.ready[:0]
}

// expireLocked ends the connections whose idle deadline passed and fails
// the connects whose timeout did; a deadline that moved with the bytes is
// put back in its place.
func (l *loop) expireLocked() {
	for len(l.timers) > 0 && l.timers.Top().wake <= l.now {
		c := l.timers.Top()
		switch {
		case c.connecting:
			l.connectFailedLocked(c, c.d.dialError(c.peer, os.ErrDeadlineExceeded), true)
		case c.idle > 0 && c.last+c.idle > l.now:
			c.wake = c.last + c.idle
			l.timers.Fix(0)
		default:
			c.ss.SetReason(streamstate.ReasonIdleTimeout)
			l.endLocked(c)
		}
	}
}

// stepLocked moves what c's sockets allow, and ends c when it is over.
func (l *loop) stepLocked(c *loopConn) {
	if c.connecting {
		if c.ready[sideUpstream]&canWrite == 0 && !c.hup {
			return
		}
		// An error or hang-up: the connect failed, unless the socket says
		// otherwise (it connected, then its peer went away: the relay
		// sees that).
		if c.hup {
			v, gerr := unix.GetsockoptInt(int(c.fd[sideUpstream]), unix.SOL_SOCKET, unix.SO_ERROR)
			if gerr != nil || v != 0 {
				err := unix.ECONNREFUSED
				if v != 0 {
					err = syscall.Errno(v)
				}
				l.connectFailedLocked(c, c.d.dialError(c.peer, os.NewSyscallError("connect", err)), false)
				return
			}
		}
		l.connectedLocked(c)
	}
	if c.ending && c.dirs[dirUp].empty() && c.dirs[dirDown].empty() {
		l.endLocked(c)
		return
	}
	if !l.pumpLocked(c, dirUp) || !l.pumpLocked(c, dirDown) {
		return // ended
	}
	switch {
	case c.ending && c.dirs[dirUp].empty() && c.dirs[dirDown].empty():
		l.endLocked(c)
	case c.dirs[dirUp].shut && c.dirs[dirDown].shut:
		l.endLocked(c)
	}
}

func (d *loopDir) empty() bool { return len(d.pending) == 0 && d.inPipe == 0 }

// connectedLocked starts relaying c once its upstream answered.
func (l *loop) connectedLocked(c *loopConn) {
	c.connecting = false
	d := c.d
	peer := d.h.picker.Peer(c.peer)
	peer.State.Reached()
	d.h.state.ObserveDial(time.Duration(l.now - c.start))
	c.ss.SetPeer(peer.State, d.many)
	c.last = l.now
	l.timers.Remove(c)
	if c.idle > 0 {
		c.wake = c.last + c.idle
		l.timers.Push(c)
	}
}

// connectFailedLocked handles a connect that failed (or timed out): the
// next upstream, if one is left and there is time, or the end of c.
func (l *loop) connectFailedLocked(c *loopConn, err error, timedOut bool) {
	d := c.d
	rawClose(int(c.fd[sideUpstream]))
	c.fd[sideUpstream] = -1
	c.ready[sideUpstream], c.hup = 0, false
	if d.upstreamFailed(c.peer, err) && d.h.picker.Len() > 1 && !timedOut && l.now < c.start+int64(d.h.dialer.Timeout) {
		up, i, derr := d.dial(c.ss.Source.Addr(), &c.tried, c.start)
		if i >= 0 {
			c.fd[sideUpstream], c.peer = int32(up), i
			if derr = l.watchLocked(c, sideUpstream); derr == nil {
				return
			}
			derr = d.dialError(i, os.NewSyscallError("epoll_ctl", derr))
		}
		if derr != nil { // nil: every upstream was tried, and err is the last one's
			err = derr
		}
	}
	d.h.dialFailed(c.ss, err)
	l.endLocked(c)
}

// pumpLocked moves direction dir of c as far as its sockets allow. It
// reports false if c ended.
func (l *loop) pumpLocked(c *loopConn, dir int) bool {
	d := &c.dirs[dir]
	src, dst := sideClient, sideUpstream
	if dir == dirDown {
		src, dst = sideUpstream, sideClient
	}
	for budget := stepBudget; ; {
		if !d.empty() {
			if c.ready[dst]&canWrite == 0 {
				return true
			}
			if !l.flushLocked(c, dir, dst) {
				return false
			}
			if !d.empty() {
				return true
			}
			continue
		}
		if d.eof {
			return l.passEndLocked(c, dir, dst)
		}
		if c.ending || c.ready[src]&canRead == 0 {
			return true
		}
		if budget <= 0 {
			// Enough for this turn; the socket may hold more, and tells
			// nothing new about it.
			if !c.again {
				c.again = true
				l.again = append(l.again, c)
			}
			return true
		}
		if d.bulk {
			if d.pipe == nil {
				if d.pipe, _ = pipes.Get().(*pipe); d.pipe == nil {
					d.bulk = false
					continue
				}
			}
			n, err := rawSplice(int(c.fd[src]), d.pipe.w, pipeSize)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				c.ready[src] &^= canRead
				pipes.Put(d.pipe)
				d.pipe = nil
				return true
			case err != nil:
				return l.failLocked(c, dir, false)
			case n == 0:
				pipes.Put(d.pipe)
				d.pipe = nil
				d.eof = true
				continue
			}
			d.inPipe = n
			d.bulk = n >= bulkStep
			budget -= n
			continue
		}
		n, err := rawRead(int(c.fd[src]), l.buf)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			c.ready[src] &^= canRead
			return true
		case err != nil:
			return l.failLocked(c, dir, false)
		case n == 0:
			d.eof = true
			continue
		}
		// A short read emptied the socket: the next bytes bring an event,
		// unless the peer's end came already.
		if n < len(l.buf) && c.ready[src]&peerEnded == 0 {
			c.ready[src] &^= canRead
		}
		d.bulk = n >= bulkStep
		budget -= n
		b := l.buf[:n]
		if c.ready[dst]&canWrite != 0 {
			w, werr := rawWrite(int(c.fd[dst]), b)
			if w > 0 {
				b = b[w:]
				c.moved(dir, w, l.now)
			}
			switch {
			case werr == unix.EAGAIN || werr == nil && len(b) > 0:
				c.ready[dst] &^= canWrite
			case werr != nil && werr != unix.EINTR:
				return l.failLocked(c, dir, true)
			}
		}
		if len(b) > 0 {
			// The loop's buffer is for the next step: keep only the rest.
			d.pending = append([]byte(nil), b...)
		}
	}
}

// flushLocked writes what direction dir holds to side dst. It reports
// false if c ended.
func (l *loop) flushLocked(c *loopConn, dir, dst int) bool {
	d := &c.dirs[dir]
	for !d.empty() {
		var n int
		var err error
		if d.inPipe > 0 {
			n, err = rawSplice(d.pipe.r, int(c.fd[dst]), d.inPipe)
		} else {
			n, err = rawWrite(int(c.fd[dst]), d.pending)
		}
		if n > 0 {
			c.moved(dir, n, l.now)
			if d.inPipe > 0 {
				if d.inPipe -= n; d.inPipe == 0 {
					pipes.Put(d.pipe)
					d.pipe = nil
				}
			} else if d.pending = d.pending[n:]; len(d.pending) == 0 {
				d.pending = nil
			}
		}
		switch {
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			c.ready[dst] &^= canWrite
			return true
		case err != nil:
			return l.failLocked(c, dir, true)
		}
	}
	return true
}

// moved counts n bytes written in direction dir into the session, as they
// move, and records the activity for the idle timeout.
func (c *loopConn) moved(dir, n int, now int64) {
	c.last = now
	if dir == dirUp {
		if c.header > 0 { // the PROXY header, written first, is not counted
			h := min(n, int(c.header))
			c.header -= uint16(h)
			if n -= h; n == 0 {
				return
			}
		}
		c.ss.AddSent(int64(n))
	} else {
		c.ss.AddReceived(int64(n))
	}
}

// passEndLocked handles the end of direction dir's source once what it
// read is written: with half-close it is passed on (shutdown) and the
// other direction runs to its own end; otherwise both end, after the
// other direction wrote what it had read. It reports false if c ended.
func (l *loop) passEndLocked(c *loopConn, dir, dst int) bool {
	d := &c.dirs[dir]
	if d.shut {
		return true
	}
	d.shut = true
	reason := streamstate.ReasonClientClose
	if dir == dirDown {
		reason = streamstate.ReasonUpstreamClose
	}
	if c.half {
		// The connection goes on: the end is its reason only if nothing
		// cuts it later (Session.SetHalfClose).
		c.ss.SetHalfClose(reason)
		if c.dirs[1-dir].shut {
			return true // both ended: stepLocked ends c
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SHUTDOWN, uintptr(c.fd[dst]), unix.SHUT_WR, 0); e != 0 {
			l.endLocked(c)
			return false
		}
		return true
	}
	c.ss.SetReason(reason)
	// Free the slot first, as endBoth does, so that a client which
	// reconnects as soon as it sees the end finds it free.
	c.ss.ReleaseSlot()
	c.ending = true
	return true
}

// failLocked ends c after an error of one side: a read error is the
// source's, a write error the destination's. It reports false.
func (l *loop) failLocked(c *loopConn, dir int, writeErr bool) bool {
	srcIsClient := dir == dirUp
	if writeErr {
		srcIsClient = !srcIsClient
	}
	if srcIsClient {
		c.ss.SetFailure(streamstate.ReasonClientError, streamstate.ReasonClientClose)
	} else {
		c.ss.SetFailure(streamstate.ReasonUpstreamError, streamstate.ReasonUpstreamClose)
	}
	l.endLocked(c)
	return false
}

// endLocked ends c on the loop's goroutine: its session is finished once
// mu is let go (takeEndedLocked).
func (l *loop) endLocked(c *loopConn) {
	l.ended = append(l.ended, c.ss)
	l.closeLocked(c)
}

// closeLocked closes c's sockets (which takes them out of the epoll set)
// and gives back what it held; the caller finishes its session.
func (l *loop) closeLocked(c *loopConn) {
	l.timers.Remove(c)
	for side, fd := range c.fd {
		if fd >= 0 {
			rawClose(int(fd))
			c.fd[side] = -1
		}
	}
	for i := range c.dirs {
		d := &c.dirs[i]
		if d.pipe != nil {
			if d.inPipe > 0 {
				d.pipe.discard()
			} else {
				pipes.Put(d.pipe)
			}
		}
		*d = loopDir{}
	}
	c.ss, c.d, c.connecting = nil, nil, false
	l.free = append(l.free, c.slot)
	if l.count--; l.count == 0 {
		l.emptyAt = time.Now().UnixNano()
		// The loop may wait without a deadline: it must see itself
		// empty, to stop after loopLinger.
		l.wakeAtLocked(l.emptyAt + int64(loopLinger))
	}
}

// wakeAtLocked makes the loop's wait end at t (unix nanoseconds; 0: no
// deadline).
func (l *loop) wakeAtLocked(t int64) {
	if l.ep != nil {
		deadlineheap.SetWake(l.ep, &l.sleep, t)
	}
}

// Wake ends c's connection at once (Session.Close): the loop would not
// notice closed sockets, and must not use their numbers again.
func (c *loopConn) Wake(ss *streamstate.Session) {
	l := c.l
	l.mu.Lock()
	if c.ss != ss {
		l.mu.Unlock()
		return // ended already; c may serve another connection now
	}
	l.closeLocked(c)
	l.mu.Unlock()
	ss.Finish()
}

// LoopConns is the number of connections the event loops hold.
func LoopConns() int {
	n := 0
	for _, l := range theLoops() {
		l.mu.Lock()
		n += l.count
		l.mu.Unlock()
	}
	return n
}

// The loop's other calls on its sockets go to the kernel as rawRead does
// (raw_linux.go), without telling the scheduler: none of them blocks, and
// a loopback close or connect is long enough (10-30 µs) for the scheduler
// to hand the only P to another thread meanwhile, which measured about
// half a context switch more per short connection.

func rawClose(fd int) { unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd), 0, 0) }

// rawSocket makes a non-blocking TCP socket of the family.
func rawSocket(family int) (int, error) {
	fd, _, e := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// rawSetsockoptOn turns a boolean socket option on, best effort.
func rawSetsockoptOn(fd, level, opt int) {
	on := int32(1)
	unix.RawSyscall6(unix.SYS_SETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&on)), 4, 0)
}
