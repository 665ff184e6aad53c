package testenv

import "testing"

// FreePortRange returns the first of n consecutive ports that are free
// for TCP and UDP on 127.0.0.1 and ::1 and that no other test of this
// process was given, from the same span as FreePort.
func FreePortRange(t testing.TB, n int) int {
	t.Helper()
	for {
		used := int(portsUsed.Add(int32(n)))
		if used > portSpan {
			t.Fatalf("ran out of test ports below the ephemeral range for a range of %d", n)
		}
		first := firstPort + (portStart+used-n+1)%portSpan
		if first+n > ephemeralStart {
			continue // it would wrap around the span
		}
		free := true
		for p := first; p < first+n && free; p++ {
			free = portFree(p)
		}
		if free {
			return first
		}
	}
}
