package l4aegisproxy

import (
	"container/heap"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// The parker holds the connections whose relays parked them (relay.park):
// their sockets sit in an epoll set of its own, and one goroutine waits
// in epoll_wait until one is readable (bytes, the peer's end, an error),
// which resumes its relay on a new goroutine, or until a parked
// connection's idle timeout, which ends it. A parked connection holds no
// goroutine, no buffer and no pipe: its relay, its session and its two
// sockets.
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

// kickSlot is the epoll data of the parker's eventfd.
const kickSlot = -1

var (
	// parkMu guards thePark and all of its state, and the parkState of
	// every relay.
	parkMu  sync.Mutex
	thePark *parker
)

type parker struct {
	epfd, evfd int
	slots      []*relay // parked relays by slot; nil: free
	free       []int32
	gen        int32
	count      int
	emptyAt    int64     // when count became 0 (unix nanoseconds)
	timers     timerHeap // parked relays with an idle timeout, soonest first
	sleep      int64     // the deadline epoll_wait waits for (0: none)
}

// parkState is a relay's place in the parker, under parkMu.
type parkState struct {
	slot int32 // in parker.slots; -1: not parked
	gen  int32 // of this park, in each socket's epoll data
	heap int   // in parker.timers; -1: none
	wake int64 // idle deadline (unix nanoseconds)
	fds  [2]int32
	ss   *streamstate.Session
}

func (ps *parkState) init() {
	ps.slot, ps.heap, ps.fds = -1, -1, [2]int32{-1, -1}
}

// park hands the relay's sockets to the parker once both directions have
// stopped at a step boundary: from then on the parker owns the relay. It
// reports false, parking nothing, when the session was closed meanwhile or
// there is no parker (no epoll here).
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
	parkMu.Lock()
	defer parkMu.Unlock()
	// Close stores closed before it calls Wake, which takes parkMu: either
	// this sees it, or Wake comes after and takes the relay out again.
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
	ps := &r.parked
	if n := len(p.free); n > 0 {
		ps.slot = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		ps.slot = int32(len(p.slots))
		p.slots = append(p.slots, nil)
	}
	p.gen++
	ps.gen = p.gen
	for dir, fd := range fds {
		if fd < 0 {
			continue
		}
		ev := unix.EpollEvent{Events: parkEvents, Fd: ps.slot, Pad: ps.gen}
		if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev); err != nil {
			p.slots[ps.slot] = r // for unparkLocked
			p.count++
			p.unparkLocked(r)
			return false
		}
		ps.fds[dir] = fd
	}
	p.slots[ps.slot] = r
	p.count++
	ps.ss = r.ss
	if r.idle > 0 {
		// The idle timeout runs on while parked: no byte moves, so it
		// falls when it would have without the park.
		ps.wake = max(r.last[dirUp].Load(), r.last[dirDown].Load()) + int64(r.idle)
		heap.Push(&p.timers, r)
		if p.sleep == 0 || ps.wake < p.sleep {
			p.kick()
		}
	}
	return true
}

// Wake ends the parked connection of ss at once (Session.Close): no
// goroutine reads its sockets, and closing a socket in an epoll set wakes
// nothing. A relay not parked, or parked for another session since, is
// left alone: its goroutines see the sockets closed.
func (r *relay) Wake(ss *streamstate.Session) {
	parkMu.Lock()
	if r.parked.slot < 0 || r.parked.ss != ss {
		parkMu.Unlock()
		return
	}
	thePark.unparkLocked(r)
	parkMu.Unlock()
	r.finish()
}

// startParker makes the parker's epoll set and eventfd and starts its
// goroutine. Under parkMu.
func startParker() (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	evfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: kickSlot}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, evfd, &ev); err != nil {
		unix.Close(evfd)
		unix.Close(epfd)
		return nil, err
	}
	p := &parker{epfd: epfd, evfd: evfd, emptyAt: time.Now().UnixNano()}
	thePark = p
	go p.loop()
	return p, nil
}

// kick wakes epoll_wait: a new idle deadline comes before the one it
// waits for.
func (p *parker) kick() {
	one := [8]byte{1}
	_, _ = unix.Write(p.evfd, one[:])
}

// unparkLocked takes r out of the parker. Under parkMu.
func (p *parker) unparkLocked(r *relay) {
	ps := &r.parked
	for i, fd := range ps.fds {
		if fd >= 0 {
			_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
			ps.fds[i] = -1
		}
	}
	if ps.heap >= 0 {
		heap.Remove(&p.timers, ps.heap)
	}
	p.slots[ps.slot] = nil
	p.free = append(p.free, ps.slot)
	ps.slot, ps.ss = -1, nil
	if p.count--; p.count == 0 {
		// The loop may wait without a timeout: it must see the parker
		// empty, to stop after parkerLinger.
		p.emptyAt = time.Now().UnixNano()
		p.kick()
	}
}

// loop waits for parked sockets and idle deadlines until nothing was
// parked for parkerLinger.
func (p *parker) loop() {
	events := make([]unix.EpollEvent, 128)
	var resume, expired []*relay
	for {
		parkMu.Lock()
		now := time.Now().UnixNano()
		timeout := -1 // milliseconds, rounded up: never wake before a deadline
		p.sleep = 0
		if len(p.timers) > 0 {
			p.sleep = p.timers[0].parked.wake
			timeout = int(max(0, (p.sleep-now+int64(time.Millisecond)-1)/int64(time.Millisecond)))
		}
		if p.count == 0 {
			left := p.emptyAt + int64(parkerLinger) - now
			if left <= 0 {
				thePark = nil
				unix.Close(p.evfd)
				unix.Close(p.epfd)
				parkMu.Unlock()
				return
			}
			timeout = int((left + int64(time.Millisecond) - 1) / int64(time.Millisecond))
		}
		parkMu.Unlock()

		n, err := unix.EpollWait(p.epfd, events, timeout)
		if err != nil && err != unix.EINTR {
			n = 0 // cannot happen with a valid set; the timers still run
			time.Sleep(time.Millisecond)
		}
		parkMu.Lock()
		for _, ev := range events[:max(n, 0)] {
			if ev.Fd == kickSlot {
				var b [8]byte
				_, _ = unix.Read(p.evfd, b[:])
				continue
			}
			if int(ev.Fd) >= len(p.slots) {
				continue
			}
			// An event of a socket taken out since is for nobody, or for a
			// relay parked in its slot since, with another gen.
			if r := p.slots[ev.Fd]; r != nil && r.parked.gen == ev.Pad {
				p.unparkLocked(r)
				resume = append(resume, r)
			}
		}
		now = time.Now().UnixNano()
		for len(p.timers) > 0 && p.timers[0].parked.wake <= now {
			r := p.timers[0]
			p.unparkLocked(r)
			expired = append(expired, r)
		}
		parkMu.Unlock()
		for _, r := range resume {
			go r.resume()
		}
		for _, r := range expired {
			r.ss.SetReason(streamstate.ReasonIdleTimeout)
			r.finish()
		}
		clear(resume)
		clear(expired)
		resume, expired = resume[:0], expired[:0]
	}
}

// timerHeap orders parked relays by idle deadline (container/heap).
type timerHeap []*relay

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].parked.wake < h[j].parked.wake }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].parked.heap, h[j].parked.heap = i, j
}
func (h *timerHeap) Push(x any) {
	r := x.(*relay)
	r.parked.heap = len(*h)
	*h = append(*h, r)
}
func (h *timerHeap) Pop() any {
	old := *h
	r := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	r.parked.heap = -1
	return r
}
