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

// burst is the burst of replies the poller is sending.
type burst struct {
	rb      *replies
	n, sent int
}

// replies is the state of one burst of replies: read from an entry's
// upstream socket with one recvmmsg, sent to the client with one sendmmsg.
// It is pooled, so a poller holds one only while it handles a wake-up.
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

// deliverBurst sends the n replies in rb to the client at once; those over
// the download budget, or that meet a full socket buffer, are dropped.
func (p *poller) deliverBurst(e *entry, n int) {
	rb := p.rb
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
	p.burst = burst{rb: rb, n: m}
	_ = s.rc.Write(p.sendFn)
	for i := range p.burst.sent {
		e.ss.AddDatagramReceived(int(rb.outIov[i].Len))
	}
	if lost := m - p.burst.sent; lost > 0 {
		e.r.state.DropDatagrams(streamstate.DropBufferFull, uint64(lost))
	}
	p.burst = burst{}
}

// send is the raw write callback: sendmmsg until the burst is out or the
// socket cannot take more now. It never waits.
func (p *poller) send(fd uintptr) bool {
	b := &p.burst
	for b.sent < b.n {
		rest := b.rb.out[b.sent:b.n]
		n, _, errno := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)), unix.MSG_DONTWAIT, 0, 0)
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
