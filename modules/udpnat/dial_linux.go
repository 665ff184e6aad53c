package udpnat

import (
	"net/netip"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dial opens a new entry's upstream socket, connected to target,
// with two system calls: socket and connect. net.DialUDP adds
// SO_BROADCAST, getsockname, getpeername and the registration with Go's
// poller, which cost a DNS-shaped flow (one entry per query) a fifth of
// its relay time and give the entry nothing: the relay's own poller
// watches the descriptor (poller.add).
func (e *entry) dial(target netip.AddrPort) error {
	e.fd, e.heap = -1, -1
	// Raw system calls: neither blocks (a UDP connect only sets the
	// peer), and Go's scheduler need not know.
	var sa unix.RawSockaddrInet6 // or a RawSockaddrInet4 in its first bytes
	family, size := unix.AF_INET6, uintptr(unix.SizeofSockaddrInet6)
	if a := target.Addr(); a.Is4() {
		family, size = unix.AF_INET, unix.SizeofSockaddrInet4
		v4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&sa))
		v4.Family, v4.Addr = unix.AF_INET, a.As4()
	} else {
		sa.Family, sa.Addr = unix.AF_INET6, a.As16()
	}
	port := (*[2]byte)(unsafe.Pointer(&sa.Port)) // same offset in both
	port[0], port[1] = byte(target.Port()>>8), byte(target.Port())
	fd, errno := e.r.spare.take(family)
	if errno != 0 {
		return os.NewSyscallError("socket", errno)
	}
	for {
		_, _, errno = unix.RawSyscall(unix.SYS_CONNECT, fd, uintptr(unsafe.Pointer(&sa)), size)
		if errno != unix.EINTR {
			break
		}
	}
	if errno != 0 {
		unix.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
		return os.NewSyscallError("connect", errno)
	}
	e.fd = int(fd)
	return nil
}

// spareSockets holds, for each family a relay's upstreams have, one
// unconnected upstream socket made ahead of need: a new entry takes it
// (take) instead of making one on the query's way, and the socket's
// reader makes the next one once its batch is relayed (refill), while the
// query is with the upstream. The sockets are made as many times as
// without it, one flow ahead.
type spareSockets struct {
	fd   [2]atomic.Int64 // by family (IPv4, IPv6): the spare socket, plus 1; 0: none
	used [2]atomic.Bool  // a socket of the family was taken: refill makes one
}

// spareFamilies are the families of spareSockets' slots.
var spareFamilies = [2]int{unix.AF_INET, unix.AF_INET6}

func spareSlot(family int) int {
	if family == unix.AF_INET6 {
		return 1
	}
	return 0
}

// take returns the spare socket of family, or a new one.
func (s *spareSockets) take(family int) (uintptr, unix.Errno) {
	i := spareSlot(family)
	s.used[i].Store(true)
	if fd := s.fd[i].Swap(0); fd != 0 {
		return uintptr(fd - 1), 0
	}
	return newSocket(family)
}

// refill makes a spare socket for each family taken since the last
// refill that has none. A failure (no descriptor left) leaves none: the
// next entry tries again.
func (s *spareSockets) refill() {
	for i, family := range spareFamilies {
		if !s.used[i].Load() || s.fd[i].Load() != 0 {
			continue
		}
		s.used[i].Store(false)
		fd, errno := newSocket(family)
		if errno != 0 {
			continue
		}
		if !s.fd[i].CompareAndSwap(0, int64(fd)+1) {
			unix.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
		}
	}
}

// close closes the spare sockets, once the relay's readers are gone.
func (s *spareSockets) close() {
	for i := range s.fd {
		if fd := s.fd[i].Swap(0); fd != 0 {
			unix.RawSyscall(unix.SYS_CLOSE, uintptr(fd-1), 0, 0)
		}
	}
}

// newSocket makes a non-blocking UDP socket of family.
func newSocket(family int) (uintptr, unix.Errno) {
	// A raw system call: it does not block, and Go's scheduler need not
	// know.
	fd, _, errno := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	return fd, errno
}
