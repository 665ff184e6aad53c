package streams

// HoldWrites takes the lock of API writes, which the follower also takes
// to apply other nodes' changes, and returns its release: a test stops the
// follower with it while another node writes.
func HoldWrites() (release func()) {
	writeMu.Lock()
	return writeMu.Unlock
}
