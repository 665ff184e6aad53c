package streamstate

import (
	"net/netip"
	"testing"
)

// The check on every dial takes no lock and allocates nothing.
func TestCheckUpstreamAllocatesNothing(t *testing.T) {
	defer listeners.Store(listeners.Load())
	SetListeners([]Listener{
		{Addr: netip.MustParseAddr("127.0.0.1"), Port: 5432},
		{Port: 5433},
		{UDP: true, Addr: netip.IPv4Unspecified(), Port: 53},
	})
	for _, tc := range []struct {
		udp  bool
		addr string
		want bool
	}{
		{false, "127.0.0.1:5432", true},
		{false, "127.0.0.2:5432", false},
		{true, "127.0.0.1:5432", false},
		{false, "[::1]:5433", true},
		{false, "127.9.9.9:5433", true},
		{false, "192.0.2.200:5433", false},
		{true, "127.0.0.1:53", true},
		{true, "[::1]:53", false},
		{false, "0.0.0.0:5432", true},
		{false, "10.0.0.1:80", false},
		{false, "db.internal:5432", false},
	} {
		if got := CheckUpstream(tc.udp, tc.addr) != nil; got != tc.want {
			t.Errorf("CheckUpstream(udp %v, %s) refuses: %v, want %v", tc.udp, tc.addr, got, tc.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { _ = CheckUpstream(false, "127.0.0.1:5432") }); n != 0 {
		t.Errorf("CheckUpstream allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { _ = CheckUpstream(false, "10.0.0.1:9000") }); n != 0 {
		t.Errorf("CheckUpstream allocates %v times", n)
	}
}
