//go:build !unix

package udpnat

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
)

// replyAddr is where an entry's replies go.
type replyAddr struct{ addr netip.AddrPort }

func makeReplyAddr(_ *socket, src, _ netip.AddrPort) replyAddr { return replyAddr{src} }

func (s *socket) sendUpstream(e *entry, p []byte, size int) error {
	_, err := e.conn.Write(p)
	if err == nil {
		e.ss.AddDatagramSent(size)
	}
	return err
}

func (e *entry) readReplies() {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	for {
		n, err := e.conn.Read(*bp)
		if err != nil {
			e.rerr = err
			return
		}
		e.deliver((*bp)[:n])
	}
}

func (e *entry) sendReply(s *socket, p []byte) error {
	_, err := s.pc.WriteToUDPAddrPort(p, e.to.addr)
	return err
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

func isClosed(err error) bool { return errors.Is(err, net.ErrClosed) }

// The raw-socket callbacks are not used on this platform.
func (s *socket) write(uintptr) bool { return true }
func (e *entry) read(uintptr) bool   { return true }
func (e *entry) send(uintptr) bool   { return true }
