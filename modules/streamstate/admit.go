package streamstate

// Admit counts one more open connection (or UDP NAT entry) in Active,
// unless max (> 0) are open already, and reports whether it did; max <= 0
// means no limit. Unlike adding one and taking it back when over, it never
// puts Active above max, even for an instant: the stats never show the cap
// passed, and a connection is never refused for a slot that a refused one
// held for that instant. A refusal writes nothing shared.
func (s *Stream) Admit(max int) bool {
	if max <= 0 {
		s.Active.Add(1)
		return true
	}
	for {
		n := s.Active.Load()
		if n >= int64(max) {
			return false
		}
		if s.Active.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Leave gives back a slot that Admit counted. The last one to leave while
// the stream shuts down wakes Destruct, which waits for it.
func (s *Stream) Leave() {
	if s.Active.Add(-1) == 0 && s.draining.Load() {
		select {
		case s.idle <- struct{}{}:
		default:
		}
	}
}
