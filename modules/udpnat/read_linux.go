package udpnat

import (
	"net/netip"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// readBatch is how many datagrams one recvmmsg call may return.
const readBatch = 16

// batch is a socket reader's recvmmsg state, made once per socket: under
// load one system call brings in many datagrams. They are relayed in the
// read callback, so that the reader waits without an empty read between
// two batches (recv). Its buffers take memory only where the kernel has
// written datagrams.
type batch struct {
	hdrs    [readBatch]unix.Mmsghdr
	iovs    [readBatch]unix.Iovec
	names   [readBatch]unix.RawSockaddrInet6 // room for IPv4 too
	oobs    [readBatch][oobSize]byte
	bufs    [readBatch][]byte
	oob     bool
	s       *socket
	err     error
	backoff time.Duration // after a failed read
	fn      func(uintptr) bool
}

func newBatch(s *socket, oob bool) *batch {
	b := &batch{s: s, oob: oob}
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

// recv is the raw read callback: it relays batches of datagrams read with
// recvmmsg without waiting, and returns false (wait until readable) when
// nothing is left, or true with b.err when the read failed. A batch that
// came back short means that the socket was empty then: what came since
// makes Go's poller report it (edge-triggered, on every datagram, and not
// reset while Read waits between two calls), so the read that would come
// back empty is not made.
func (b *batch) recv(fd uintptr) bool {
	for {
		// A raw system call: the socket never blocks (MSG_DONTWAIT), and
		// Go's scheduler need not know.
		n, _, errno := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), readBatch, unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			b.backoff = 0
			b.relay(int(n))
			if n < readBatch {
				b.s.r.spare.refill()
				logpace.Served()
				return false
			}
		case unix.EINTR:
		case unix.EAGAIN:
			b.s.r.spare.refill()
			logpace.Served()
			return false
		default:
			b.err = errno
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
	b := newBatch(s, s.wildcard)
	for {
		b.err = nil
		err := s.rc.Read(b.fn)
		if err == nil {
			err = b.err
		}
		if readError(err, &b.backoff) {
			return
		}
	}
}

// relay hands the n datagrams of the batch to the relay.
func (b *batch) relay(n int) {
	s := b.s
	for i := range n {
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
	b.reset(n)
}
