package logpace

import (
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watched holds the relays' descriptors that pacers ask about. They are
// asked with one ppoll that does not wait, not kept in an epoll set: a
// set would be woken with every datagram that comes to a socket in it,
// in the sender's softirq, which on loopback is the client's CPU.
var watched struct {
	mu    sync.Mutex
	count map[int32]int                 // Watch calls less Unwatch calls, by descriptor
	fds   atomic.Pointer[[]unix.PollFd] // what Waiting asks: count's keys
}

// Watch adds fd, a relay's listening socket or epoll set, to what pacers
// ask. Its owner calls Unwatch before it closes fd; a descriptor that
// two relays watch (a listening socket a reload hands on) stays watched
// until both have called Unwatch.
func Watch(fd int) {
	watched.mu.Lock()
	defer watched.mu.Unlock()
	if watched.count == nil {
		watched.count = make(map[int32]int)
	}
	watched.count[int32(fd)]++
	storeWatched()
}

// Unwatch undoes one Watch of fd.
func Unwatch(fd int) {
	watched.mu.Lock()
	defer watched.mu.Unlock()
	if watched.count[int32(fd)]--; watched.count[int32(fd)] <= 0 {
		delete(watched.count, int32(fd))
	}
	storeWatched()
}

// storeWatched publishes count's descriptors for Waiting. Under mu.
func storeWatched() {
	fds := make([]unix.PollFd, 0, len(watched.count))
	for fd := range watched.count {
		fds = append(fds, unix.PollFd{Fd: fd, Events: unix.POLLIN})
	}
	watched.fds.Store(&fds)
}

// pollCopies are the copies of the published array that Waiting polls,
// since ppoll writes its answers into the array: kept for the next call,
// so that a call allocates nothing however many descriptors are watched
// (each UDP stream has two, and there is a TCP loop per P).
var pollCopies = sync.Pool{New: func() any { return new([]unix.PollFd) }}

// Waiting reports whether a watched descriptor is ready, without waiting
// (a raw system call: Go's scheduler need not know, and its monitor
// thread is not woken).
func Waiting() Relays {
	p := watched.fds.Load()
	if p == nil || len(*p) == 0 {
		return Unwatched
	}
	cp := pollCopies.Get().(*[]unix.PollFd)
	defer pollCopies.Put(cp)
	fds := append((*cp)[:0], *p...)
	*cp = fds
	var ts unix.Timespec
	n, _, e := unix.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&fds[0])), uintptr(len(fds)), uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
	if e != 0 || n == 0 {
		return Idle
	}
	for _, f := range fds {
		if f.Revents&unix.POLLIN != 0 {
			return Ready
		}
	}
	return Idle
}
