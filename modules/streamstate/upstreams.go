package streamstate

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Upstream is the runtime state of one of a stream's upstreams: its
// connections, bytes, health and whether its last dial failed. The
// stream's State keeps one per upstream address (host:port), so a reload
// or an edit that keeps an upstream keeps its counters.
type Upstream struct {
	// Addr is host:port.
	Addr string

	// Active is the number of connections (UDP NAT entries) it has now;
	// Total counts them since the stream's state was made.
	Active atomic.Int64
	Total  atomic.Uint64
	// DialFailures counts its failed dials (and ICMP refusals of UDP).
	DialFailures atomic.Uint64

	ended     [2]atomic.Uint64 // bytes of ended sessions, by direction
	seenMu    sync.Mutex       // readers only: guards seen
	seen      [2]uint64        // the most bytes a reader has seen: never less again
	failUntil atomic.Int64     // unix nanoseconds: skipped until then
	health    atomic.Pointer[Health]
	lastErr   atomic.Pointer[string]
}

// Upstream returns the state of the stream's upstream addr (host:port),
// creating it on first use. Called when a config is built, not per
// connection.
func (s *State) Upstream(addr string) *Upstream {
	s.upMu.Lock()
	defer s.upMu.Unlock()
	if u, ok := s.upstreams[addr]; ok {
		return u
	}
	if s.upstreams == nil {
		s.upstreams = map[string]*Upstream{}
	}
	u := &Upstream{Addr: addr}
	s.upstreams[addr] = u
	return u
}

// KeepUpstreams forgets the upstreams not in addrs that have no open
// connection: those a config no longer names. Called when a config of the
// stream starts serving.
func (s *State) KeepUpstreams(addrs []string) {
	s.upMu.Lock()
	defer s.upMu.Unlock()
	for addr, u := range s.upstreams {
		if !slices.Contains(addrs, addr) && u.Active.Load() == 0 {
			delete(s.upstreams, addr)
		}
	}
}

// FindUpstream returns the state of upstream addr, or nil if none was
// made; for readers.
func (s *State) FindUpstream(addr string) *Upstream {
	s.upMu.Lock()
	defer s.upMu.Unlock()
	return s.upstreams[addr]
}

// Fail records a failed dial (or an ICMP refusal): new connections skip
// the upstream for d.
func (u *Upstream) Fail(err error, d time.Duration) {
	u.DialFailures.Add(1)
	u.failUntil.Store(time.Now().Add(d).UnixNano())
	if err != nil {
		msg := err.Error()
		u.lastErr.Store(&msg)
	}
}

// Reached records a successful dial: an upstream skipped after a failure
// is up again. It writes nothing when it was not skipped.
func (u *Upstream) Reached() {
	if u.failUntil.Load() != 0 {
		u.failUntil.Store(0)
	}
}

// Up reports whether new connections may go to the upstream at now (unix
// nanoseconds): its last dial did not fail within the fail timeout, and
// its last health check, if any, passed.
func (u *Upstream) Up(now int64) bool {
	if u.failUntil.Load() > now {
		return false
	}
	h := u.health.Load()
	return h == nil || h.Healthy
}

// SetHealth records a health check of the upstream. A passed check ends a
// skip after a failed dial.
func (u *Upstream) SetHealth(h Health) {
	u.health.Store(&h)
	if h.Healthy {
		u.Reached()
	} else if h.LastError != "" {
		msg := h.LastError
		u.lastErr.Store(&msg)
	}
}

// Health is the upstream's last health check, or nil.
func (u *Upstream) Health() *Health { return u.health.Load() }

// LastError is the error of its last failed dial or health check, or "".
func (u *Upstream) LastError() string {
	if p := u.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// Bytes returns the bytes relayed through the upstream each way: those
// of ended connections and of the open ones of stream s, never less than
// an earlier call returned (see bytes.go).
func (u *Upstream) Bytes(s *State) (sent, received uint64) {
	b := [2]uint64{u.ended[dirSent].Load(), u.ended[dirReceived].Load()}
	s.sessions.Range(func(_, v any) bool {
		ss := v.(*Session)
		if ss.peer.Load() == u && ss.peerCounted && !ss.folded.Load() {
			b[dirSent] += ss.sent.Load()
			b[dirReceived] += ss.received.Load()
		}
		return true
	})
	u.seenMu.Lock()
	defer u.seenMu.Unlock()
	for d := range b {
		u.seen[d] = max(u.seen[d], b[d])
	}
	return u.seen[dirSent], u.seen[dirReceived]
}

// SetPeer records that the session went to upstream u, for the log and
// the live list, and with count counts it in u's connections and bytes
// (a stream with several upstreams: one with a single upstream has the
// stream's own counters, and its connections write nothing more). Call it
// once, when the upstream is reached.
func (ss *Session) SetPeer(u *Upstream, count bool) {
	if count {
		ss.peerCounted = true
		u.Active.Add(1)
		u.Total.Add(1)
	}
	ss.peer.Store(u)
}

// Peer is the upstream the session went to, or nil.
func (ss *Session) Peer() *Upstream { return ss.peer.Load() }

// foldPeer moves the session's bytes and its connection out of its
// upstream's open counters; fold calls it once.
func (ss *Session) foldPeer() {
	u := ss.peer.Load()
	if u == nil || !ss.peerCounted {
		return
	}
	if n := ss.sent.Load(); n > 0 {
		u.ended[dirSent].Add(n)
	}
	if n := ss.received.Load(); n > 0 {
		u.ended[dirReceived].Add(n)
	}
	u.Active.Add(-1)
}
