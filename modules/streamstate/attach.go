package streamstate

import (
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// Attached state: runtime state of a stream that a transport keeps for it,
// such as the UDP relay (NAT table) of each of its listen addresses. It
// lives in the stream's state, shared and counted like the state itself,
// so that a reload or an edit that keeps the address keeps it too, and
// readers find everything about a stream in one place.
type attachments struct {
	mu sync.Mutex
	m  map[string]*attached
}

type attached struct {
	v    caddy.Destructor
	refs int
}

// Attach returns the value that the stream keeps under key, making it
// with mk on first use. Pair every Attach with one Detach of the same key.
func (s *State) Attach(key string, mk func() caddy.Destructor) caddy.Destructor {
	s.attached.mu.Lock()
	defer s.attached.mu.Unlock()
	if a := s.attached.m[key]; a != nil {
		a.refs++
		return a.v
	}
	if s.attached.m == nil {
		s.attached.m = map[string]*attached{}
	}
	a := &attached{v: mk(), refs: 1}
	s.attached.m[key] = a
	return a.v
}

// Detach drops one reference to the value under key; the last one
// destructs it (outside the stream's lock: a relay waits for its
// goroutines).
func (s *State) Detach(key string) {
	s.attached.mu.Lock()
	a := s.attached.m[key]
	if a == nil {
		s.attached.mu.Unlock()
		return
	}
	a.refs--
	if a.refs > 0 {
		s.attached.mu.Unlock()
		return
	}
	delete(s.attached.m, key)
	s.attached.mu.Unlock()
	_ = a.v.Destruct()
}

// eachAttached calls f with every value the stream keeps.
func (s *State) eachAttached(f func(caddy.Destructor)) {
	s.attached.mu.Lock()
	defer s.attached.mu.Unlock()
	for _, a := range s.attached.m {
		f(a.v)
	}
}

// UDPEntries is the number of UDP NAT entries open now over the stream's
// listen addresses.
func (s *State) UDPEntries() int {
	n := 0
	s.eachAttached(func(v caddy.Destructor) {
		if t, ok := v.(interface{ Entries() int }); ok {
			n += t.Entries()
		}
	})
	return n
}

// destructAttached destructs what its users failed to Detach, when the
// stream's state goes.
func (s *State) destructAttached() {
	s.attached.mu.Lock()
	m := s.attached.m
	s.attached.m = nil
	s.attached.mu.Unlock()
	for _, a := range m {
		_ = a.v.Destruct()
	}
}
