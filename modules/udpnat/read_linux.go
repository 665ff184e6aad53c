package udpnat

import (
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// readBatch is how many datagrams one recvmmsg call may return.
const readBatch = 16

// batch is a socket reader's recvmmsg state, made once per socket: under
// load one system call brings in many datagrams. Its buffers take memory
// only where the kernel has written datagrams.
type batch struct {
	hdrs  [readBatch]unix.Mmsghdr
	iovs  [readBatch]unix.Iovec
	names [readBatch]unix.RawSockaddrInet6 // room for IPv4 too
	oobs  [readBatch][oobSize]byte
	bufs  [readBatch][]byte
	oob   bool
	n     int
	err   error
	fn    func(uintptr) bool
}

func newBatch(oob bool) *batch {
	b := &batch{oob: oob}
	for i := range b.hdrs {
		b.bufs[i] = make([]byte, headroom+maxDatagram)
		b.iovs[i].Base = &b.bufs[i][headroom]
		b.iovs[i].SetLen(maxDatagram)
		h := &b.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		if oob {
			h.Control = &b.oobs[i][0]
		}
	}
	b.reset(readBatch)
	b.fn = b.recv
	return b
}

// reset restores the lengths that the kernel overwrote in the first n
// headers.
func (b *batch) reset(n int) {
	for i := range n {
		h := &b.hdrs[i].Hdr
		h.Namelen = unix.SizeofSockaddrInet6
		h.Flags = 0
		if b.oob {
			h.SetControllen(oobSize)
		}
	}
}

// recv is the raw read callback: one recvmmsg without waiting. It returns
// false (wait until readable) when nothing is there.
func (b *batch) recv(fd uintptr) bool {
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), readBatch, unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			b.n, b.err = int(n), nil
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			b.n, b.err = 0, errno
			return true
		}
	}
}

// addrPort is the address in a received sockaddr.
func addrPort(rsa *unix.RawSockaddrInet6) (netip.AddrPort, bool) {
	p := (*[2]byte)(unsafe.Pointer(&rsa.Port))
	port := uint16(p[0])<<8 | uint16(p[1])
	switch rsa.Family {
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(rsa.Addr), port), true
	case unix.AF_INET:
		v4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(rsa))
		return netip.AddrPortFrom(netip.AddrFrom4(v4.Addr), port), true
	}
	return netip.AddrPort{}, false
}

// readLoop reads datagrams in batches until the socket is closed.
func (s *socket) readLoop() {
	b := newBatch(s.wildcard)
	var backoff time.Duration
	for {
		err := s.rc.Read(b.fn)
		if err == nil {
			err = b.err
		}
		if err != nil {
			if readError(err, &backoff) {
				return
			}
			continue
		}
		backoff = 0
		for i := range b.n {
			h := &b.hdrs[i]
			src, ok := addrPort(&b.names[i])
			if !ok || h.Hdr.Flags&unix.MSG_TRUNC != 0 {
				s.r.state.DropDatagrams(streamstate.DropTruncated, 1)
				continue
			}
			var oob []byte
			if b.oob {
				oob = b.oobs[i][:h.Hdr.Controllen]
			}
			s.r.datagram(s, b.bufs[i], int(h.Len), src, oob)
		}
		b.reset(b.n)
	}
}
