package main

import (
	"errors"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The UDP side of the bench moves datagrams in batches, one recvmmsg(2) or
// sendmmsg(2) per batch, so that the generator and the echo, which share
// CPU 0, spend little per datagram and the proxy on CPU 1 is the limit.
// The sockets stay in Go's poller: a batch call that would block returns
// EAGAIN and RawConn waits for the socket to be ready.

// mmsghdr is the kernel's struct mmsghdr: one message of a batch and,
// after the call, its length in bytes.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// batch is a fixed set of datagram buffers for one batch call.
type batch struct {
	hs    []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet4 // nil for connected sockets
	buf   []byte
	size  int // bytes per buffer
}

// newBatch makes n buffers of size bytes. With named, each message carries
// an IPv4 address: where a received datagram came from and where a sent
// one goes.
func newBatch(n, size int, named bool) *batch {
	b := &batch{hs: make([]mmsghdr, n), iovs: make([]unix.Iovec, n), buf: make([]byte, n*size), size: size}
	if named {
		b.names = make([]unix.RawSockaddrInet4, n)
	}
	for i := range b.hs {
		b.iovs[i].Base = &b.buf[i*size]
		b.iovs[i].SetLen(size)
		b.hs[i].hdr.Iov = &b.iovs[i]
		b.hs[i].hdr.SetIovlen(1)
		if named {
			b.hs[i].hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
			b.hs[i].hdr.Namelen = unix.SizeofSockaddrInet4
		}
	}
	return b
}

// msg is buffer i, whole.
func (b *batch) msg(i int) []byte { return b.buf[i*b.size : (i+1)*b.size] }

// received is the datagram that the last recv put in buffer i.
func (b *batch) received(i int) []byte { return b.msg(i)[:min(int(b.hs[i].len), b.size)] }

// setLen sets how many bytes of buffer i the next send takes.
func (b *batch) setLen(i, n int) { b.iovs[i].SetLen(n) }

// recv reads up to n datagrams (n <= the batch size) into the buffers,
// waiting until at least one is there. It returns how many it read.
func (b *batch) recv(rc syscall.RawConn, n int) (int, error) {
	for i := range n {
		b.iovs[i].SetLen(b.size)
		if b.names != nil {
			b.hs[i].hdr.Namelen = unix.SizeofSockaddrInet4
		}
	}
	var got int
	var errno syscall.Errno
	err := rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hs[0])), uintptr(n), unix.MSG_DONTWAIT, 0, 0)
			switch e {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait until readable
			}
			got, errno = int(r), e
			return true
		}
	})
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, errno
	}
	return got, nil
}

// send writes buffers from up to, but not including, to, waiting while the
// socket's send buffer is full. It returns how many it sent: fewer than
// asked only with an error, which is about buffer from+sent.
func (b *batch) send(rc syscall.RawConn, from, to int) (int, error) {
	sent := 0
	for from+sent < to {
		var r int
		var errno syscall.Errno
		err := rc.Write(func(fd uintptr) bool {
			for {
				k, _, e := unix.RawSyscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.hs[from+sent])), uintptr(to-from-sent), unix.MSG_DONTWAIT, 0, 0)
				switch e {
				case unix.EINTR:
					continue
				case unix.EAGAIN:
					return false // wait until writable
				}
				r, errno = int(k), e
				return true
			}
		})
		if err != nil {
			return sent, err
		}
		if errno != 0 {
			return sent, errno
		}
		sent += r
	}
	return sent, nil
}

// rawConn is the RawConn of a UDP socket.
func rawConn(c *net.UDPConn) syscall.RawConn {
	rc, err := c.SyscallConn()
	if err != nil {
		panic(err) // only for a nil or closed conn, which callers never pass
	}
	return rc
}

// udpEchoBatch is how many datagrams the echo moves per call.
const udpEchoBatch = 64

// udpEcho is the in-process UDP upstream: it sends every datagram back to
// where it came from, in batches.
type udpEcho struct {
	conn *net.UDPConn
	done chan struct{}
}

func startUDPEcho() (*udpEcho, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	// Room for every datagram in flight, so that loss is never the echo's.
	c.SetReadBuffer(4 << 20)
	c.SetWriteBuffer(4 << 20)
	e := &udpEcho{conn: c, done: make(chan struct{})}
	go e.serve()
	return e, nil
}

func (e *udpEcho) port() int { return e.conn.LocalAddr().(*net.UDPAddr).Port }

func (e *udpEcho) serve() {
	defer close(e.done)
	rc := rawConn(e.conn)
	b := newBatch(udpEchoBatch, 2048, true)
	for {
		n, err := b.recv(rc, udpEchoBatch)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue // e.g. a pending ICMP error: nothing to answer
		}
		for i := range n {
			b.setLen(i, len(b.received(i)))
		}
		for from := 0; from < n; {
			k, err := b.send(rc, from, n)
			from += k
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err != nil {
				from++ // that datagram cannot go back: drop it
			}
		}
	}
}

func (e *udpEcho) close() {
	e.conn.Close()
	<-e.done
}
