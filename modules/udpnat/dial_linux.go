package udpnat

import (
	"net/netip"
	"os"
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
	fd, _, errno := unix.RawSyscall(unix.SYS_SOCKET, uintptr(family), unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
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
