//go:build !linux

package l4aegisproxy

import (
	"errors"
	"syscall"
	"time"
)

// canSplice is false where splice(2) does not exist: the relay copies.
const canSplice = false

func (r *relay) spliceStep(int, syscall.RawConn, syscall.RawConn, interface{ SetWriteDeadline(time.Time) error }) (int, bool, error) {
	return 0, false, errors.New("splice is not available on this system")
}
