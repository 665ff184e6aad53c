// Package loopback runs TCP servers on loopback addresses for tests. A server
// and every connection it accepted are closed when the test ends, and the
// test fails if their handlers do not return soon after.
package loopback

import (
	"net"
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
