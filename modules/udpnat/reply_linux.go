package udpnat

import (
	"net/netip"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// rawAddr is a client's address as sendmmsg takes it.
type rawAddr struct {
	sa  unix.RawSockaddrInet6 // or a RawSockaddrInet4 in its first bytes
	len uint32
}

func makeRawAddr(src netip.AddrPort, v6 bool) rawAddr {
	var ra rawAddr
	port := src.Port()
	if v6 {
		ra.sa.Family = unix.AF_INET6
		ra.sa.Addr = src.Addr().As16()
		ra.len = unix.SizeofSockaddrInet6
	} else {
		v4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&ra.sa))
		v4.Family = unix.AF_INET
		v4.Addr = src.Addr().Unmap().As4()
		ra.len = unix.SizeofSockaddrInet4
	}
	p := (*[2]byte)(unsafe.Pointer(&ra.sa.Port)) // same offset in both
	p[0], p[1] = byte(port>>8), byte(port)
	return ra
}

// burst is the burst of replies an entry is sending.
type burst struct {
	rb      *replies
	n, sent int
}

// replies is the state of one burst of replies: read from an entry's
// upstream socket with one recvmmsg, sent to the client with one sendmmsg.
// It is pooled, so it is held only while datagrams are in flight.
type replies struct {
	in     [readBatch]unix.Mmsghdr
	inIov  [readBatch]unix.Iovec
	out    [readBatch]unix.Mmsghdr
	outIov [readBatch]unix.Iovec
	bufs   [readBatch][]byte
}

var repliesPool = sync.Pool{New: func() any {
	r := new(replies)
	for i := range r.in {
		r.bufs[i] = make([]byte, maxDatagram)
		r.inIov[i].Base = &r.bufs[i][0]
		r.inIov[i].SetLen(maxDatagram)
		r.in[i].Hdr.Iov = &r.inIov[i]
		r.in[i].Hdr.SetIovlen(1)
		r.out[i].Hdr.Iov = &r.outIov[i]
		r.out[i].Hdr.SetIovlen(1)
	}
	return r
}}

// readReplies delivers the upstream's datagrams until the entry's socket is
// closed or fails. The goroutine waits in the poller holding no buffer.
func (e *entry) readReplies() {
	_ = e.rc.Read(e.readFn)
}

// read is the raw read callback: it moves bursts of replies until none is
// left, then asks to wait (false), or reports a failed socket (true).
func (e *entry) read(fd uintptr) bool {
	if !e.waited {
		// The first call comes before any wait and usually finds nothing:
		// look before taking a buffer set, so that a flood of new clients
		// does not make the pool hold one per entry.
		e.waited = true
		switch errno := peek(fd); errno {
		case 0: // a datagram: read it below
		case unix.EAGAIN:
			return false
		default:
			// The peek took the socket's pending error (an ICMP
			// unreachable), as every receive does: it ends the entry.
			e.rerr = errno
			return true
		}
	}
	rb := repliesPool.Get().(*replies)
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&rb.in[0])), readBatch, unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			e.deliverBurst(rb, int(n))
			if e.answered(int(n)) {
				repliesPool.Put(rb)
				return true // run ends the entry: not here, in the socket's own callback
			}
		case unix.EINTR:
		case unix.EAGAIN:
			repliesPool.Put(rb)
			return false
		default:
			e.rerr = errno
			repliesPool.Put(rb)
			return true
		}
	}
}

// peek looks for a datagram without taking it, with a zero-length
// MSG_PEEK receive: 0 when one waits, EAGAIN when none does, or the
// socket's pending error, which the peek clears as any receive would.
func peek(fd uintptr) unix.Errno {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, 0, 0, unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		if errno != unix.EINTR {
			return errno
		}
	}
}

// deliverBurst sends the n replies in rb to the client at once; those over
// the download budget, or that meet a full socket buffer, are dropped.
func (e *entry) deliverBurst(rb *replies, n int) {
	now := time.Now()
	e.last.Store(now.UnixNano())
	m := 0
	for i := range n {
		size := int(rb.in[i].Len)
		if e.down != nil && !e.down.Allow(now, size) {
			e.r.state.DropDatagrams(streamstate.DropRateLimit, 1)
			continue
		}
		rb.outIov[m].Base = &rb.bufs[i][0]
		rb.outIov[m].SetLen(size)
		h := &rb.out[m].Hdr
		h.Name = (*byte)(unsafe.Pointer(&e.to.raw.sa))
		h.Namelen = e.to.raw.len
		if len(e.to.oob) > 0 {
			h.Control = &e.to.oob[0]
			h.SetControllen(len(e.to.oob))
		} else {
			h.Control = nil
			h.SetControllen(0)
		}
		m++
	}
	if m == 0 {
		return
	}
	s := e.r.reply.Load()
	if s == nil {
		e.r.state.DropDatagrams(streamstate.DropListenerClosed, uint64(m))
		return
	}
	e.burst = burst{rb: rb, n: m}
	_ = s.rc.Write(e.sendFn)
	for i := range e.burst.sent {
		e.ss.AddDatagramReceived(int(rb.outIov[i].Len))
	}
	if lost := m - e.burst.sent; lost > 0 {
		e.r.state.DropDatagrams(streamstate.DropBufferFull, uint64(lost))
	}
	e.burst = burst{}
}

// send is the raw write callback: sendmmsg until the burst is out or the
// socket cannot take more now. It never waits.
func (e *entry) send(fd uintptr) bool {
	b := &e.burst
	for b.sent < b.n {
		rest := b.rb.out[b.sent:b.n]
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)), unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			b.sent += int(n)
		case unix.EINTR:
		default:
			return true // EAGAIN and the rest: drop what is left
		}
	}
	return true
}
