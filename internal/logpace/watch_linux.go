package logpace

import (
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watched is the epoll set of the relays' descriptors, made at the first
// Watch. It is never waited on, only asked (Waiting); a descriptor leaves
// it when its file is closed.
var watched struct {
	once  sync.Once
	fdAdd atomic.Int32 // the set's descriptor + 1; 0: not made
	err   error
}

// Watch adds fd, a relay's listening socket or epoll set, to the set that
// pacers ask (level-triggered, for input). A descriptor already there is
// left as it is.
func Watch(fd int) error {
	watched.once.Do(func() {
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			watched.err = os.NewSyscallError("epoll_create1", err)
			return
		}
		watched.fdAdd.Store(int32(ep) + 1)
	})
	ep := int(watched.fdAdd.Load()) - 1
	if ep < 0 {
		return watched.err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev); err != nil && err != unix.EEXIST {
		return os.NewSyscallError("epoll_ctl", err)
	}
	return nil
}

// Waiting reports whether a watched descriptor is ready, without waiting
// (a raw system call: Go's scheduler need not know, and its monitor
// thread is not woken).
func Waiting() Relays {
	ep := watched.fdAdd.Load() - 1
	if ep < 0 {
		return Unwatched
	}
	var ev [1]unix.EpollEvent
	n, _, e := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(ep), uintptr(unsafe.Pointer(&ev[0])), 1, 0, 0, 0)
	switch {
	case e != 0:
		return Unwatched
	case n > 0:
		return Ready
	}
	return Idle
}
