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
	return ra
}

// sendUpstream sends p on the entry's upstream socket without waiting: a
// full socket buffer drops the datagram. Only the socket's reader calls it.
func (s *socket) sendUpstream(e *entry, p []byte) error {
	s.out = p
	if err := e.rc.Write(s.writeFn); err != nil {
		return err
	}
	return s.werr
}

func (s *socket) write(fd uintptr) bool {
	for {
		_, err := unix.Write(int(fd), s.out)
		if err == unix.EINTR {
			continue
		}
		s.werr = err
		return true
	}
}

// readReplies delivers the upstream's datagrams until the entry's socket is
// closed or fails. The goroutine waits in the poller without a buffer; one
// is taken from a pool only while datagrams are there to read.
func (e *entry) readReplies() {
	_ = e.rc.Read(e.readFn)
}

func (e *entry) read(fd uintptr) bool {
	bp := bufPool.Get().(*[]byte)
	for {
		n, err := unix.Read(int(fd), *bp)
		switch err {
		case nil:
			e.deliver((*bp)[:n])
		case unix.EINTR:
		case unix.EAGAIN:
			bufPool.Put(bp)
			return false // wait until readable
		default:
			e.rerr = err
			bufPool.Put(bp)
			return true
		}
	}
}

// sendReply sends p to the client from socket s without waiting.
func (e *entry) sendReply(s *socket, p []byte) error {
	e.out = p
	if err := s.rc.Write(e.sendFn); err != nil {
		return err
	}
	return e.serr
}

func (e *entry) send(fd uintptr) bool {
	for {
		var err error
		if len(e.to.oob) > 0 {
			_, err = unix.SendmsgN(int(fd), e.out, e.to.oob, e.to.sa, unix.MSG_DONTWAIT)
		} else {
			err = unix.Sendto(int(fd), e.out, unix.MSG_DONTWAIT, e.to.sa)
		}
		if err == unix.EINTR {
			continue
		}
		e.serr = err
		return true
	}
}

// isRefused reports an error that means the upstream is not there (an ICMP
// port or host unreachable came back).
func isRefused(err error) bool {
	return errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EHOSTUNREACH) || errors.Is(err, unix.ENETUNREACH)
}

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
