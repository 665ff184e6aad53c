//go:build unix

package streamstate

import (
	"io"
	"net"
	"syscall"
)

func init() { readProxyHeader = peekProxyHeader }

// peekProxyHeader peeks at the bytes c has received (MSG_PEEK) until they
// show whether c starts with a PROXY header and, if so, the whole of it;
// then it reads exactly the header, so the bytes after it stay in the
// socket for the relay. It waits for more bytes only when they have not
// decided yet, until c's read deadline. n is the header's length, or how
// many bytes were seen.
func peekProxyHeader(c net.Conn, buf []byte) (n int, st headerState, err error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, headerInvalid, errProxyUnsupported
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, headerInvalid, err
	}
	seen, hlen := -1, 0
	st = headerMore
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		m, _, e := syscall.Recvfrom(int(fd), buf, syscall.MSG_PEEK)
		switch {
		case e == syscall.EAGAIN || e == syscall.EINTR:
			return false
		case e != nil:
			rerr = e
			return true
		case m == 0:
			rerr = io.EOF
			return true
		case m == seen:
			return false // nothing new: wait for more
		}
		seen = m
		hlen, st = headerLen(buf[:m])
		return st != headerMore
	})
	if err == nil {
		err = rerr
	}
	n = max(seen, 0)
	if st != headerComplete {
		return n, st, err
	}
	if err != nil {
		return n, headerInvalid, err
	}
	// The header is in the socket already: this read returns at once.
	if _, err := io.ReadFull(c, buf[:hlen]); err != nil {
		return n, headerInvalid, err
	}
	return hlen, headerComplete, nil
}
