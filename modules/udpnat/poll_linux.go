package udpnat

import (
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// pollBatch is how many ready upstream sockets one epoll_wait returns.
const pollBatch = 64

// upSock is an entry's upstream socket on Linux: a raw non-blocking
// descriptor connected to the upstream, which the relay's poller watches.
// It is not registered with Go's poller, and no goroutine waits on it: a
// new entry costs no goroutine, an idle one holds none.
type upSock struct {
	fdMu sync.Mutex // held to use fd outside the poller, and to close it
	fd   int        // -1 once closed
	slot int32      // the entry's place in its poller's table
	gen  uint32     // tells the entry from the slot's earlier holders
}

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
type poller struct {
	ep   *os.File // the epoll instance
	epfd int
	rc   syscall.RawConn
	done chan struct{}

	mu    sync.Mutex
	slots []*entry // the registered entries; nil: a free slot
	free  []int32
	gen   uint32

	// The poller goroutine's own.
	events [pollBatch]unix.EpollEvent
	rb     *replies // while handling a wake-up
	more   bool     // a socket or the instance may have more than was read
	burst  burst
	waitFn func(uintptr) bool
	sendFn func(uintptr) bool
}

// add registers e's socket.
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
	e.slot, e.gen = slot, p.gen
	p.slots[slot] = e
	p.mu.Unlock()
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: slot, Pad: int32(e.gen)}
	if _, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(p.epfd), unix.EPOLL_CTL_ADD, uintptr(e.fd), uintptr(unsafe.Pointer(&ev)), 0, 0); errno != 0 {
		p.release(slot)
		return os.NewSyscallError("epoll_ctl", errno)
	}
	return nil
}

// release frees an entry's slot.
func (p *poller) release(slot int32) {
	p.mu.Lock()
	p.slots[slot] = nil
	p.free = append(p.free, slot)
	p.mu.Unlock()
}

// finish unregisters and finishes e.
func (p *poller) finish(e *entry, reason streamstate.Reason) {
	p.release(e.slot)
	e.finish(reason)
}

// close stops the poller once every entry has finished.
func (p *poller) close() {
	logpace.Unwatch(p.epfd)
	p.ep.Close()
	<-p.done
}

// run handles wake-ups until the poller is closed.
func (p *poller) run() {
	defer close(p.done)
	_ = p.rc.Read(p.waitFn)
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
