//go:build !linux

package l4aegisproxy

import (
	"errors"
	"net"
	"syscall"
)

// canRaw is false where the relay cannot drive raw sockets itself: it
// copies through net.Conn instead.
const canRaw = false

type rawDir struct{ quiet bool }

func (*rawDir) bind(*relay, int) {}

func (*rawDir) started() bool { return false }

func (*rawDir) start(_, _ *net.TCPConn) error {
	return errors.New("raw relay is not available on this system")
}

func (*rawDir) release() {}

func (*rawDir) step() (int, bool, error) {
	return 0, false, errors.New("raw relay is not available on this system")
}

// KeepAliveControl does nothing here; Go's own keepalive settings apply.
func KeepAliveControl(_, _ string, _ syscall.RawConn) error { return nil }
