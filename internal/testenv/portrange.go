package testenv

import "testing"

// FreePortRange returns the first of n consecutive ports that are free
// for TCP and UDP on 127.0.0.1 and ::1 and that no other test of this
// process was given, from the same span as FreePort. It skips the test
// when the span has no room left for n more.
func FreePortRange(t testing.TB, n int) int {
	t.Helper()
	for {
		old := int(portsUsed.Load())
		// The counter's next value old+1 stands for the port at offset
		// off, as in FreePort; a range that would run past the span's
		// end starts again at its beginning.
		off, skip := (portStart+old+1)%portSpan, 0
		if off+n > portSpan {
			skip, off = portSpan-off, 0
		}
		if old+skip+n > portSpan {
			t.Skipf("no room left for %d consecutive test ports below the ephemeral range", n)
		}
		if !portsUsed.CompareAndSwap(int32(old), int32(old+skip+n)) {
			continue
		}
		first := firstPort + off
		free := true
		for p := first; p < first+n && free; p++ {
			free = portFree(p)
		}
		if free {
			return first
		}
	}
}

// FreeLowPortRange returns the first of n consecutive free ports (TCP and
// UDP on 127.0.0.1 and ::1) below FreePort's span, 1024-19999, for a
// range too large for that span; it skips the test when none is free.
// Ports there are not handed out otherwise, so two tests of one process
// must not both use it.
func FreeLowPortRange(t testing.TB, n int) int {
	t.Helper()
	for first := firstPort - n; first >= 1024; first -= 1000 {
		free := true
		for p := first; p < first+n && free; p++ {
			free = portFree(p)
		}
		if free {
			return first
		}
	}
	t.Skipf("no %d consecutive free ports in 1024-%d", n, firstPort-1)
	return 0
}
