// Package loopback runs TCP and UDP servers on loopback addresses for tests.
// A server and every connection it accepted are closed when the test ends,
// and the test fails if their handlers do not return soon after.
package loopback

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// Server is a running test server.
type Server struct {
	// Addr is the listen address, host:port.
	Addr string
	// Port is the listen port.
	Port int

	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
	once  sync.Once
}

// Serve listens on addr (e.g. "127.0.0.1:0" or "[::1]:0") and runs serve for
// each accepted connection in a goroutine of its own; the connection is
// closed when serve returns.
func Serve(t testing.TB, addr string, serve func(net.Conn)) *Server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Addr: ln.Addr().String(), Port: ln.Addr().(*net.TCPAddr).Port, ln: ln}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		if !s.Close(10 * time.Second) {
			t.Errorf("test server %s: handlers still running 10s after close", s.Addr)
		}
	})
	return s
}

// Close stops the server, closes its connections and waits up to within for
// their handlers to return, reporting whether they did. Later calls only
// wait.
func (s *Server) Close(within time.Duration) bool {
	s.once.Do(func() {
		s.ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(within):
		return false
	}
}

// UDPServer is a running UDP test server.
type UDPServer struct {
	// Addr is the listen address, host:port.
	Addr string
	// Port is the listen port.
	Port int

	pc   *net.UDPConn
	done chan struct{}
	once sync.Once
}

// ServeUDP listens on addr (e.g. "127.0.0.1:0" or "[::1]:0") and runs handle
// for each datagram, one at a time, in a goroutine of the server's; handle
// may answer through pc. p is only valid until handle returns.
func ServeUDP(t testing.TB, addr string, handle func(pc *net.UDPConn, p []byte, from netip.AddrPort)) *UDPServer {
	t.Helper()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		t.Fatal(err)
	}
	s := &UDPServer{Addr: pc.LocalAddr().String(), Port: pc.LocalAddr().(*net.UDPAddr).Port, pc: pc, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			handle(pc, buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		if !s.Close(10 * time.Second) {
			t.Errorf("test server %s/udp: handler still running 10s after close", s.Addr)
		}
	})
	return s
}

// Close stops the server and waits up to within for its handler to return,
// reporting whether it did. Later calls only wait.
func (s *UDPServer) Close(within time.Duration) bool {
	s.once.Do(func() { s.pc.Close() })
	select {
	case <-s.done:
		return true
	case <-time.After(within):
		return false
	}
}
