package l4aegisproxy

import (
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/deadlineheap"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// The parker holds the connections whose relays parked them (relay.park):
// their sockets sit in an epoll set of its own, and one goroutine waits
// (for the set, in Go's netpoller) until one is readable (bytes, the
// peer's end, an error),
// which resumes its relay on a new goroutine, or until a parked
// connection's idle timeout, which ends it. A parked connection holds no
// goroutine, no buffer, no pipe and no relay: a parkedConn, its session
// and its two sockets.
//
// One parker serves the process: parking and resuming happen at most
// once per parkDelay per connection, far too rarely for one lock and one
// epoll set to be a bottleneck, and the relays it resumes run on any P.
// It starts with the first park and stops (closing its epoll set) once
// nothing was parked for parkerLinger, so that a process with no quiet
// connection holds none of it.

// parkerLinger is how long the parker stays up with nothing parked.
const parkerLinger = time.Second

// parkEvents are what wakes the parker for a parked socket: readable,
// including the peer's end, and (always reported) errors and hang-ups.
// One-shot: the parker takes the relay out at the first.
const parkEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

var (
	// parkMu guards thePark and all of its state, and the parker's fields
	// of every parkedConn.
	parkMu  sync.Mutex
	thePark *parker
)

type parker struct {
	epfd    int
	ep      *os.File // epfd, for Go's netpoller
	rc      syscall.RawConn
	events  []unix.EpollEvent
	n       int // events collected
	waitFn  func(uintptr) bool
	slots   []*parkedConn // parked connections by slot; nil: free
	free    []int32
	gen     int32
	count   int
	emptyAt int64                          // when count became 0 (unix nanoseconds)
	timers  deadlineheap.Heap[*parkedConn] // parked connections with an idle timeout, soonest first
	sleep   int64                          // the deadline the loop waits for (0: none)
}

// parkedConn is a parked connection: what its relay needs when it
// resumes, while the relay itself is back in its pool. One per connection,
// made at its first park and kept across its parks. It is the session's
// Waker.
type parkedConn struct {
	ss         *streamstate.Session
	client, up net.Conn
	half       bool
	idle       time.Duration
	last       int64  // unix nanoseconds of the last byte either way
	done       uint32 // the directions that ended (half-close)

	// The parker's, under parkMu.
	slot int32 // in parker.slots; -1: not parked
	gen  int32 // of this park, in each socket's epoll data
	heap int   // in parker.timers; -1: none
	wake int64 // idle deadline (unix nanoseconds)
	fds  [2]int32
}

// park hands the relay's sockets to the parker once both directions have
// stopped at a step boundary: from then on the parker owns the connection,
// and the caller puts the relay back in its pool. It reports false,
// parking nothing, when the session was closed meanwhile or there is no
// parker (no epoll here).
func (r *relay) park() bool {
	// The sources of the directions that go on (with half-close, one may
	// have ended). The sockets stay open while parked: only Session.Close
	// closes them, through Wake, which waits for parkMu.
	fds := [2]int32{-1, -1}
	for dir := range 2 {
		if r.done.Load()&(1<<dir) == 0 {
			if fds[dir] = r.dirs[dir].srcFD(); fds[dir] < 0 {
				return false
			}
		}
	}
	pc := r.pc
	if pc == nil {
		pc = &parkedConn{ss: r.ss, client: r.client, up: r.up, half: r.half, idle: r.idle,
			slot: -1, heap: -1, fds: [2]int32{-1, -1}}
	}
	pc.last = max(r.last[dirUp].Load(), r.last[dirDown].Load())
	pc.done = r.done.Load() & 3
	parkMu.Lock()
	defer parkMu.Unlock()
	first := r.pc == nil
	if first {
		// Before the check: Close stores closed and then calls the Waker,
		// whose Wake takes parkMu (and does nothing while pc is not
		// parked). So either this sees it closed, or Wake comes after and
		// takes the connection out again; never a Close that finds no
		// Waker and closes the sockets as they are parked.
		r.ss.SetWaker(pc)
	}
	if r.ss.Closed() {
		return false
	}
	p := thePark
	if p == nil {
		var err error
		if p, err = startParker(); err != nil {
			return false
		}
	}
	if n := len(p.free); n > 0 {
		pc.slot = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		pc.slot = int32(len(p.slots))
		p.slots = append(p.slots, nil)
	}
	p.slots[pc.slot] = pc
	p.count++
	p.gen++
	pc.gen = p.gen
	for dir, fd := range fds {
		if fd < 0 {
			continue
		}
		ev := unix.EpollEvent{Events: parkEvents, Fd: pc.slot, Pad: pc.gen}
		if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); err != nil {
			p.unparkLocked(pc)
			return false
		}
		pc.fds[dir] = fd
	}
	if pc.idle > 0 {
		// The idle timeout runs on while parked: no byte moves, so it
		// falls when it would have without the park.
		pc.wake = pc.last + int64(pc.idle)
		p.timers.Push(pc)
		if p.sleep == 0 || pc.wake < p.sleep {
			p.wakeAt(pc.wake)
		}
	}
	parked(r.ss)
	if first { // the handlers return without ending it
		r.pc = pc
		r.ss.Detach()
	}
	return true
}

// parked is called under parkMu once a connection's sockets are in the
// parker: a test's hook.
var parked = func(*streamstate.Session) {}

// resume relays the connection again on a relay from the pool, on the
// parker's new goroutine, until it parks again or ends.
func (pc *parkedConn) resume() {
	r := getRelay(pc.ss, pc.client, pc.up)
	r.half, r.idle, r.count, r.raw, r.canPark, r.pc = pc.half, pc.idle, true, true, true, pc
	r.last[dirUp].Store(pc.last)
	r.last[dirDown].Store(pc.last)
	r.done.Store(pc.done)
	r.relayDetached()
}

// finish ends a parked connection: what relay.finish does.
func (pc *parkedConn) finish() {
	pc.up.Close()
	pc.ss.Finish()
}

// Wake ends the parked connection at once (Session.Close): no goroutine
// reads its sockets, and closing a socket in an epoll set wakes nothing.
// A connection not parked now is left alone: its relay's goroutines see
// the sockets closed.
func (pc *parkedConn) Wake(*streamstate.Session) {
	parkMu.Lock()
	if pc.slot < 0 {
		parkMu.Unlock()
		return
	}
	thePark.unparkLocked(pc)
	parkMu.Unlock()
	pc.finish()
}

// startParker makes the parker's epoll set and starts its goroutine.
// Under parkMu. The set is non-blocking and waited for in Go's own
// netpoller (it is readable when one of its sockets is), so the parker's
// wait holds no thread and, with GOMAXPROCS=1, never the only P.
func startParker() (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ep := os.NewFile(uintptr(epfd), "parker")
	rc, err := ep.SyscallConn()
	if err != nil {
		ep.Close()
		return nil, err
	}
	p := &parker{epfd: epfd, ep: ep, rc: rc, events: make([]unix.EpollEvent, 128), emptyAt: time.Now().UnixNano()}
	p.waitFn = p.collect
	thePark = p
	go p.loop()
	return p, nil
}

// collect takes the events ready now, without waiting; false: none, wait
// for the set to become readable.
func (p *parker) collect(fd uintptr) bool {
	n, err := unix.EpollWait(int(fd), p.events, 0)
	if err == unix.EINTR || err == nil && n == 0 {
		return false
	}
	p.n = max(n, 0)
	return true
}

// wakeAt makes the loop's wait end at t (unix nanoseconds; 0: no
// deadline). Under parkMu, as the loop sets it, so that no change is lost.
func (p *parker) wakeAt(t int64) {
	p.sleep = t
	if t == 0 {
		_ = p.ep.SetReadDeadline(time.Time{})
		return
	}
	_ = p.ep.SetReadDeadline(time.Unix(0, t))
}

// unparkLocked takes pc out of the parker. Under parkMu.
func (p *parker) unparkLocked(pc *parkedConn) {
	for i, fd := range pc.fds {
		if fd >= 0 {
			_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
			pc.fds[i] = -1
		}
	}
	p.timers.Remove(pc)
	p.slots[pc.slot] = nil
	p.free = append(p.free, pc.slot)
	pc.slot = -1
	if p.count--; p.count == 0 {
		// The loop may wait without a deadline: it must see the parker
		// empty, to stop after parkerLinger.
		p.emptyAt = time.Now().UnixNano()
		p.wakeAt(p.emptyAt + int64(parkerLinger))
	}
}

// loop waits for parked sockets and idle deadlines until nothing was
// parked for parkerLinger.
func (p *parker) loop() {
	var resume, expired []*parkedConn
	for {
		parkMu.Lock()
		now := time.Now().UnixNano()
		var until int64 // 0: no deadline
		if len(p.timers) > 0 {
			until = p.timers[0].wake
		}
		if p.count == 0 {
			until = p.emptyAt + int64(parkerLinger)
			if until <= now {
				thePark = nil
				p.ep.Close()
				parkMu.Unlock()
				return
			}
		}
		p.wakeAt(until)
		p.n = 0
		parkMu.Unlock()

		// Returns with events, or at the deadline (os.ErrDeadlineExceeded).
		_ = p.rc.Read(p.waitFn)
		parkMu.Lock()
		for _, ev := range p.events[:p.n] {
			if int(ev.Fd) >= len(p.slots) || ev.Fd < 0 {
				continue
			}
			// An event of a socket taken out since is for nobody, or for a
			// connection parked in its slot since, with another gen.
			if pc := p.slots[ev.Fd]; pc != nil && pc.gen == ev.Pad {
				p.unparkLocked(pc)
				resume = append(resume, pc)
			}
		}
		p.n = 0
		now = time.Now().UnixNano()
		for len(p.timers) > 0 && p.timers[0].wake <= now {
			pc := p.timers[0]
			p.unparkLocked(pc)
			expired = append(expired, pc)
		}
		parkMu.Unlock()
		for _, pc := range resume {
			go pc.resume()
		}
		for _, pc := range expired {
			pc.ss.SetReason(streamstate.ReasonIdleTimeout)
			pc.finish()
		}
		clear(resume)
		clear(expired)
		resume, expired = resume[:0], expired[:0]
	}
}

func (pc *parkedConn) Deadline() int64 { return pc.wake }
func (pc *parkedConn) HeapIndex() *int { return &pc.heap }
