//go:build unix

package udpnat

import (
	"errors"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// replyAddr is where an entry's replies go: the client's socket address
// and, on a wildcard socket, the control message that sets their source.
type replyAddr struct {
	sa  unix.Sockaddr
	oob []byte
	raw rawAddr // the same address in the kernel's form, for sendmmsg
}

func makeReplyAddr(s *socket, src, dst netip.AddrPort) replyAddr {
	var ra replyAddr
	if s.v6 {
		ra.sa = &unix.SockaddrInet6{Port: int(src.Port()), Addr: src.Addr().As16()}
	} else {
		ra.sa = &unix.SockaddrInet4{Port: int(src.Port()), Addr: src.Addr().Unmap().As4()}
	}
	if s.wildcard {
		ra.oob = pktinfo(dst.Addr(), s.v6)
	}
	ra.raw = makeRawAddr(src, s.v6)
	return ra
}

// isRefused reports an error that means the upstream is not there (an ICMP
// port or host unreachable came back).
func isRefused(err error) bool {
	return errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH)
}

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
