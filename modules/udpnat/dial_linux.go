package udpnat

import (
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// dialUpstream opens a new entry's upstream socket, connected to target,
// with three system calls and a poller registration: socket, connect and
// the fcntl of os.NewFile. net.DialUDP adds SO_BROADCAST, getsockname and
// getpeername, which cost a DNS-shaped flow (one entry per query) a fifth
// of its relay time and give the entry nothing.
func dialUpstream(target netip.AddrPort) (upConn, error) {
	family := unix.AF_INET6
	var sa unix.Sockaddr
	if a := target.Addr(); a.Is4() {
		family = unix.AF_INET
		sa = &unix.SockaddrInet4{Port: int(target.Port()), Addr: a.As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(target.Port()), Addr: a.As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	for {
		err = unix.Connect(fd, sa)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	// A non-blocking descriptor: os.NewFile registers it with the poller,
	// so the entry's reads wait there as a net.UDPConn's do.
	return os.NewFile(uintptr(fd), "udp upstream"), nil
}
