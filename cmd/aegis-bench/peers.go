package main

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
)

// upstream is one in-process upstream server on 127.0.0.1. It keeps every
// accepted connection so that closeConns can end them between tests.
type upstream struct {
	ln     net.Listener
	handle func(net.Conn)
	read   atomic.Int64 // bytes read from clients, used by the sink
	// accepted counts the connections accepted, so that a test can see
	// how a proxy shared them out between upstreams.
	accepted atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// upstreams are the servers every proxy relays to: three TCP ones and the
// UDP echo.
type upstreams struct {
	sink, source, echo *upstream
	udp                *udpEcho
}

func startUpstreams() (*upstreams, error) {
	u := &upstreams{}
	var err error
	if u.sink, err = listenUpstream(nil); err != nil {
		return nil, err
	}
	u.sink.handle = u.sink.serveSink
	if u.source, err = listenUpstream(serveSource); err != nil {
		u.sink.close()
		return nil, err
	}
	if u.echo, err = listenUpstream(serveEcho); err != nil {
		u.sink.close()
		u.source.close()
		return nil, err
	}
	if u.udp, err = startUDPEcho(); err != nil {
		u.sink.close()
		u.source.close()
		u.echo.close()
		return nil, err
	}
	for _, s := range u.all() {
		s.serve()
	}
	return u, nil
}

// all is the TCP upstreams.
func (u *upstreams) all() []*upstream { return []*upstream{u.sink, u.source, u.echo} }

// closeConns ends every open upstream connection, keeping the listeners.
func (u *upstreams) closeConns() {
	for _, s := range u.all() {
		s.closeConns()
	}
}

func (u *upstreams) close() {
	for _, s := range u.all() {
		s.close()
	}
	u.udp.close()
}

func listenUpstream(handle func(net.Conn)) (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return &upstream{ln: ln, handle: handle, conns: map[net.Conn]struct{}{}}, nil
}

func (s *upstream) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

// serve starts accepting connections; close stops it.
func (s *upstream) serve() {
	s.wg.Add(1)
	go s.accept()
}

func (s *upstream) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. too many open files: the test will see the failure
		}
		s.accepted.Add(1)
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(c)
			c.Close()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

func (s *upstream) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.Close()
	}
}

func (s *upstream) close() {
	s.ln.Close()
	s.closeConns()
	s.wg.Wait()
}

// serveSink reads and discards, counting bytes.
func (s *upstream) serveSink(c net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		s.read.Add(int64(n))
		if err != nil {
			return
		}
	}
}

// serveSource writes until the peer goes away.
func serveSource(c net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// serveEcho writes back whatever it reads.
func serveEcho(c net.Conn) {
	buf := make([]byte, 16<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
