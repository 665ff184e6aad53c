//go:build !linux

package l4aegisproxy

// parkedConn is empty where relays do not park (no raw path).
type parkedConn struct{}

// park never parks here.
func (*relay) park() bool { return false }
