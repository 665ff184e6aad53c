package streamstate

// Byte counting. A relay step adds the bytes it moved to its own session
// only (Session.AddSent, AddReceived): the counters of a stream's
// connections sit in different cache lines, so relays of one stream on
// several cores do not bounce one line between them. When a session ends
// its bytes are folded into the stream's ended counters, once. A reader
// (the stats, the metrics) adds the ended counters and the counters of the
// sessions still open, so the stats move during a long transfer and are
// exact once it is over.
//
// The reader loads the ended counters first, then each open session that
// has not folded yet; a session folds by marking itself folded before it
// adds to the ended counters. A session that ends while it is read is
// therefore counted once or, for that read, not at all, never twice; the
// reader keeps the most it has seen, so the counters never go back.

// Byte counter directions.
const (
	dirSent     = 0 // client → upstream
	dirReceived = 1 // upstream → client
)

// fold moves the session's bytes into the stream's ended counters, once.
// No byte may be counted to the session afterwards.
func (ss *Session) fold() {
	if ss.folded.Swap(true) {
		return
	}
	if n := ss.sent.Load(); n > 0 {
		ss.State.ended[dirSent].Add(n)
	}
	if n := ss.received.Load(); n > 0 {
		ss.State.ended[dirReceived].Add(n)
	}
	ss.foldPeer()
}

// bytesLocked returns the bytes relayed each way since the state was
// created, never less than an earlier call returned. The caller holds
// totalsMu.
func (s *State) bytesLocked() [2]uint64 {
	b := [2]uint64{s.ended[dirSent].Load(), s.ended[dirReceived].Load()}
	s.sessions.Range(func(_, v any) bool {
		ss := v.(*Session)
		if !ss.folded.Load() {
			b[dirSent] += ss.sent.Load()
			b[dirReceived] += ss.received.Load()
		}
		return true
	})
	for d := range b {
		s.seenBytes[d] = max(s.seenBytes[d], b[d])
	}
	return s.seenBytes
}
