//go:build unix && !linux

package udpnat

import (
	"net/netip"

	"golang.org/x/sys/unix"
)

// rawAddr is unused on this platform.
type rawAddr struct{}

func makeRawAddr(netip.AddrPort, bool) rawAddr { return rawAddr{} }

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
			if e.answered(1) {
				bufPool.Put(bp)
				return true // run ends the entry: not here, in the socket's own callback
			}
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

// sendUpstream sends p on the entry's upstream socket without waiting: a
// full socket buffer drops the datagram. Only the socket's reader calls it.
func (s *socket) sendUpstream(e *entry, p []byte, size int) error {
	if s.writeFn == nil {
		s.writeFn = s.write
	}
	s.out = p
	if err := e.rc.Write(s.writeFn); err != nil {
		return err
	}
	if s.werr == nil {
		e.ss.AddDatagramSent(size)
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
