package l4aegisproxy

import "time"

// SetParkDelay sets how long a relay waits before it parks a quiet
// connection, until restore.
func SetParkDelay(d time.Duration) (restore func()) {
	old := parkDelay
	parkDelay = d
	return func() { parkDelay = old }
}
