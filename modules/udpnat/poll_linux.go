package udpnat

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/deadlineheap"
	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// pollBatch is how many ready upstream sockets one epoll_wait returns.
const pollBatch = 64

// expireBatch is the most entries the poller ends for their idle timeout
// in one go; more that are due (a backlog after a stall) wait
// expirePause, so that the listener's reader gets a turn between two
// batches.
const (
	expireBatch = 64
	expirePause = 50 * time.Microsecond
)

// upSock is an entry's upstream socket on Linux: a raw non-blocking
// descriptor connected to the upstream, which the relay's poller watches.
// It is not registered with Go's poller, and no goroutine waits on it: a
// new entry costs no goroutine, an idle one holds none.
type upSock struct {
	fdMu sync.Mutex // held to use fd outside the poller, and to close it
	fd   int        // -1 once closed
	slot int32      // the entry's place in its poller's table
	gen  uint32     // tells the entry from the slot's earlier holders

	// Under the poller's mu: the entry's place in the poller's expiry
	// heap (-1: not in it), and when the poller looks at it next: its idle
	// deadline (last datagram + idle timeout) as of the last look.
	heap  int
	check int64
}

// Deadline and HeapIndex order the entries in the poller's expiry heap.
func (e *entry) Deadline() int64 { return e.check }
func (e *entry) HeapIndex() *int { return &e.heap }

// closeSock closes the entry's socket: the poller's (finish), or that of
// an entry never registered.
func (e *entry) closeSock() {
	e.fdMu.Lock()
	if e.fd >= 0 {
		unix.RawSyscall(unix.SYS_CLOSE, uintptr(e.fd), 0, 0)
		e.fd = -1
	}
	e.fdMu.Unlock()
}

// wake makes the poller finish an ended entry: a socket shut down is
// readable (and hung up) until it is closed.
func (e *entry) wake() {
	e.fdMu.Lock()
	if e.fd >= 0 {
		_ = unix.Shutdown(e.fd, unix.SHUT_RDWR)
	}
	e.fdMu.Unlock()
}

// start hands a new entry, stored in the NAT table, to the relay's poller.
// On an error the caller finishes the entry.
func (r *Relay) start(e *entry) error {
	p := r.poll.Load()
	if p == nil {
		var err error
		if p, err = r.newPoller(); err != nil {
			return err
		}
	}
	return p.add(e)
}

// newPoller makes the relay's poller, once.
func (r *Relay) newPoller() (*poller, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.poll.Load(); p != nil {
		return p, nil
	}
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("fcntl", err)
	}
	// Non-blocking, the epoll instance is itself waited for in Go's
	// poller: the poller goroutine parks there as a socket reader does,
	// and holds no thread while nothing happens.
	f := os.NewFile(uintptr(fd), "udp upstream poller")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	logpace.Watch(fd) // see AddSocket; close unwatches it
	p := &poller{ep: f, epfd: fd, rc: rc, done: make(chan struct{})}
	p.waitFn = p.wait
	p.sendFn = p.send
	r.poll.Store(p)
	go p.run()
	return p, nil
}

// poller reads the replies of every entry of a relay: one goroutine waits
// on an epoll instance of its own, in which each entry's upstream socket
// is registered (level-triggered, for input) from its start until it is
// closed. A ready socket is read once per wake-up, with one recvmmsg: what
// is left is reported again, so no read comes back empty.
//
// It also ends the entries whose idle timeout passed: they are in a heap
// by deadline, and the instance's read deadline is the soonest one, so
// the goroutine wakes for it as it does for a reply. An entry is looked at
// once per idle timeout at most, not on each datagram: one that moved
// datagrams since goes back in with its new deadline.
type poller struct {
	ep   *os.File // the epoll instance
	epfd int
	rc   syscall.RawConn
	done chan struct{}

	mu     sync.Mutex
	slots  []*entry // the registered entries; nil: a free slot
	free   []int32
	gen    uint32
	expiry deadlineheap.Heap[*entry] // the registered entries, by idle deadline
	sleep  int64                     // the read deadline set (unix ns); 0: none, -1: spent

	// The poller goroutine's own.
	events [pollBatch]unix.EpollEvent
	rb     *replies // while handling a wake-up
	more   bool     // a socket or the instance may have more than was read
	burst  burst
	waitFn func(uintptr) bool
	sendFn func(uintptr) bool
	ended  []*entry // the entries one expire ends
}

// add registers e's socket. The entry goes in the expiry heap only once
// its socket is in the epoll instance: until then the poller cannot end
// it for its idle timeout, so an expiry never closes a socket that
// epoll_ctl is adding (whose number another socket may have taken by
// then), nor ends an entry whose registration then fails and is ended
// by its caller.
func (p *poller) add(e *entry) error {
	p.mu.Lock()
	var slot int32
	if n := len(p.free); n > 0 {
		slot = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		slot = int32(len(p.slots))
		p.slots = append(p.slots, nil)
	}
	p.gen++
	e.slot, e.gen, e.heap = slot, p.gen, -1
	p.slots[slot] = e
	// Read before the poller can see the entry: an answer already waiting
	// makes it ready as soon as it is registered, and the poller may have
	// finished it (closed the socket) before epoll_ctl returns.
	fd := e.fd
	p.mu.Unlock()
	registering(e)
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: slot, Pad: int32(e.gen)}
	if _, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(p.epfd), unix.EPOLL_CTL_ADD, uintptr(fd), uintptr(unsafe.Pointer(&ev)), 0, 0); errno != 0 {
		p.release(e)
		return os.NewSyscallError("epoll_ctl", errno)
	}
	p.mu.Lock()
	if p.slots[slot] == e { // not finished meanwhile by its last answer
		e.check = e.last.Load() + int64(e.cfg.idle)
		p.expiry.Push(e)
		if p.sleep <= 0 || e.check < p.sleep {
			deadlineheap.SetWake(p.ep, &p.sleep, e.check)
		}
	}
	p.mu.Unlock()
	return nil
}

// registering is called between an entry's slot and its epoll_ctl: a
// test's hook.
var registering = func(*entry) {}

// release frees an entry's slot and takes it out of the expiry heap.
func (p *poller) release(e *entry) {
	p.mu.Lock()
	p.slots[e.slot] = nil
	p.free = append(p.free, e.slot)
	p.expiry.Remove(e)
	p.mu.Unlock()
}

// finish unregisters and finishes e.
func (p *poller) finish(e *entry, reason streamstate.Reason) {
	p.release(e)
	e.finish(reason)
}

// expire ends the entries whose idle timeout has passed (expireBatch at
// most), and sets the read deadline for the next one: the poller
// goroutine's, when the last deadline has passed.
func (p *poller) expire() {
	now := time.Now().UnixNano()
	p.mu.Lock()
	p.sleep = -1 // passed: the deadline must be set again
	for len(p.expiry) > 0 && len(p.ended) < expireBatch {
		e := p.expiry.Top()
		if e.check > now {
			break
		}
		if d := e.last.Load() + int64(e.cfg.idle); d > now {
			e.check = d // a datagram moved since: look again then
			p.expiry.Fix(0)
			continue
		}
		p.expiry.Remove(e)
		p.ended = append(p.ended, e)
	}
	var next int64
	if len(p.ended) == expireBatch {
		next = now + int64(expirePause)
	} else if len(p.expiry) > 0 {
		next = p.expiry.Top().check
	}
	deadlineheap.SetWake(p.ep, &p.sleep, next)
	p.mu.Unlock()
	for i, e := range p.ended {
		// One that ended meanwhile (end) has its socket shut down: the
		// poller finishes it when it reports that.
		if e.kill(streamstate.ReasonIdleTimeout) {
			p.finish(e, streamstate.ReasonIdleTimeout)
		}
		p.ended[i] = nil
	}
	p.ended = p.ended[:0]
}

// close stops the poller once every entry has finished.
func (p *poller) close() {
	logpace.Unwatch(p.epfd)
	p.ep.Close()
	<-p.done
}

// startSweep does nothing: the poller ends idle entries (expire).
func (r *Relay) startSweep() {}

// run handles wake-ups and idle deadlines until the poller is closed.
func (p *poller) run() {
	defer close(p.done)
	for {
		if err := p.rc.Read(p.waitFn); !errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		p.expire()
	}
}

// wait is the epoll instance's raw read callback: it handles ready
// sockets, then asks Go's poller to wait (false). Every datagram that
// comes to a registered socket wakes the instance's waiters, Go's poller
// among them, so once a call returned fewer than pollBatch sockets, each
// read whole, nothing is left that would not wake the poller again: the
// call that would come back empty is not made.
func (p *poller) wait(fd uintptr) bool {
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, fd, uintptr(unsafe.Pointer(&p.events[0])), pollBatch, 0, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 || n == 0 {
			logpace.Served()
			return false
		}
		rb := repliesPool.Get().(*replies)
		p.rb, p.more = rb, n == pollBatch
		for i := range int(n) {
			ev := &p.events[i]
			p.mu.Lock()
			e := p.slots[ev.Fd]
			p.mu.Unlock()
			if e != nil && e.gen == uint32(ev.Pad) {
				p.ready(e)
			}
		}
		p.rb = nil
		repliesPool.Put(rb)
		if !p.more {
			logpace.Served()
			return false
		}
	}
}

// ready reads one burst of replies from e's socket and sends them to the
// client; it finishes e when it has ended, got its answers, or failed.
func (p *poller) ready(e *entry) {
	if e.dead.Load() {
		p.finish(e, streamstate.ReasonUpstreamError) // the reason recorded wins
		return
	}
	// An empty critical section: a send under way ends first, so its
	// datagram is counted before its answer is.
	e.fdMu.Lock()
	e.fdMu.Unlock()
	rb := p.rb
	n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, uintptr(e.fd), uintptr(unsafe.Pointer(&rb.in[0])), readBatch, unix.MSG_DONTWAIT, 0, 0)
	switch errno {
	case 0:
		if n == readBatch {
			p.more = true
		}
		p.deliverBurst(e, int(n))
		if e.answered(int(n)) {
			p.finish(e, streamstate.ReasonResponsesDone) // every expected reply came
		}
	case unix.EAGAIN, unix.EINTR:
		// Nothing after all; what comes is reported again.
	default:
		// The socket's pending error, an ICMP unreachable most often.
		if isRefused(errno) {
			e.refused(errno)
		}
		p.finish(e, streamstate.ReasonUpstreamError)
	}
}

// sendUpstream sends p, a datagram of size bytes from the client, on the
// entry's upstream socket without waiting, and counts it: a full socket
// buffer drops it, as does an entry that ended. It is counted before the
// lock is let go, so before the poller can see its answer (ready) or end
// the session (finish).
func (s *socket) sendUpstream(e *entry, p []byte, size int) error {
	e.fdMu.Lock()
	err := net.ErrClosed
	if e.fd >= 0 {
		for {
			_, _, errno := unix.RawSyscall(unix.SYS_WRITE, uintptr(e.fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
			if errno != unix.EINTR {
				err = errnoErr(errno)
				break
			}
		}
		if err == nil {
			e.ss.AddDatagramSent(size)
		}
	}
	e.fdMu.Unlock()
	return err
}

// errnoErr is errno as an error: nil for 0.
func errnoErr(errno unix.Errno) error {
	if errno == 0 {
		return nil
	}
	return errno
}
