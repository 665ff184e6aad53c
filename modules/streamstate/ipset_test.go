package streamstate

import (
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"

	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
)

// prefixesFrom turns fuzz bytes into prefixes: 6 bytes each for IPv4 (4
// address bytes, a length byte, a spare) and 18 for IPv6, chosen by the
// first byte's low bit, so that they overlap and touch often.
func prefixesFrom(b []byte) []netip.Prefix {
	var out []netip.Prefix
	for len(b) > 0 && len(out) < 64 {
		if b[0]&1 == 0 && len(b) >= 6 {
			a := netip.AddrFrom4([4]byte{b[1] & 0x0f, b[2], b[3], b[4]})
			out = append(out, netip.PrefixFrom(a, int(b[5])%33).Masked())
			b = b[6:]
			continue
		}
		if len(b) < 18 {
			break
		}
		var x [16]byte
		copy(x[:], b[1:17])
		x[0] &= 0x0f
		a := netip.AddrFrom16(x)
		if a.Is4In6() {
			a = a.Unmap()
		}
		out = append(out, netip.PrefixFrom(a, int(b[17])%(a.BitLen()+1)).Masked())
		b = b[18:]
	}
	return out
}

// FuzzIPSet checks the range set against netip.Prefix.Contains over every
// prefix, on each prefix's edges and on the probe.
//
//	go test -run '^$' -fuzz '^FuzzIPSet$' -fuzztime 60s ./modules/streamstate
func FuzzIPSet(f *testing.F) {
	f.Add([]byte{0, 10, 0, 0, 0, 8, 0, 10, 0, 0, 0, 9, 0, 10, 128, 0, 0, 9}, []byte{10, 0, 0, 1})
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 32}, []byte{255, 255, 255, 255})
	f.Add(append([]byte{1}, make([]byte, 17)...), make([]byte, 16))
	f.Fuzz(func(t *testing.T, list, probe []byte) {
		ps := prefixesFrom(list)
		set := newIPSet(ps)
		probes := []netip.Addr{}
		for _, p := range ps {
			probes = append(probes, testenv.PrefixEdges(p)...)
		}
		if a, ok := netip.AddrFromSlice(probe); ok {
			probes = append(probes, a)
		}
		for _, a := range probes {
			want := false
			for _, p := range ps {
				if p.Contains(a) {
					want = true
					break
				}
			}
			if got := set.contains(a); got != want {
				t.Fatalf("prefixes %v: contains(%v) = %v, want %v", ps, a, got, want)
			}
		}
	})
}

// bigList is n disjoint /32 entries (every other address from 10.0.0.0)
// and n/4 IPv6 /64s.
func bigList(n int) []string {
	out := make([]string, 0, n+n/4)
	for i := range n {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], 10<<24|uint32(2*i))
		out = append(out, netip.AddrFrom4(b).String())
	}
	for i := range n / 4 {
		out = append(out, fmt.Sprintf("2001:db8:%x:%x::/64", i>>16, i&0xffff))
	}
	return out
}

// The ACL's cost per connection does not grow with the list: compare
// ns/op of 10 and 100000 entries. No allocation either way.
//
//	go test -run '^$' -bench BenchmarkACLAllowed -benchmem ./modules/streamstate
func BenchmarkACLAllowed(b *testing.B) {
	for _, n := range []int{10, 100_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			acl, err := NewACL(nil, bigList(n))
			if err != nil {
				b.Fatal(err)
			}
			probes := []netip.Addr{
				netip.MustParseAddr("10.0.0.1"),        // between entries
				netip.MustParseAddr("10.0.0.2"),        // in one
				netip.MustParseAddr("192.0.2.7"),       // past them all
				netip.MustParseAddr("2001:db8::1"),     // in the first /64
				netip.MustParseAddr("2001:db9::1"),     // past them all
				netip.MustParseAddr("::ffff:10.0.0.4"), // mapped
				netip.MustParseAddr("fe80::1%eth0"),    // zoned
				netip.MustParseAddr("10.0.0.0").Prev(), // before them all
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				acl.Allowed(probes[i%len(probes)])
			}
		})
	}
}

// Allocations: none per check, with 100,000 entries.
func TestACLAllowedAllocatesNothing(t *testing.T) {
	acl, err := NewACL([]string{"10.0.0.0/8", "2001:db8::/32"}, bigList(100_000))
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("10.0.3.7")
	if n := testing.AllocsPerRun(100, func() { acl.Allowed(a) }); n != 0 {
		t.Errorf("Allowed allocates %v times per call", n)
	}
	if !acl.Allowed(a) || acl.Allowed(netip.MustParseAddr("10.0.3.6")) || acl.Allowed(netip.MustParseAddr("11.0.0.1")) {
		t.Error("wrong answers with 100,000 entries")
	}
}

// A zoned link-local source matches the lists as its address does: the
// scan of prefixes never matched one (netip.Prefix.Contains is false with
// a zone), so a blacklisted fe80::/10 let fe80::1%eth0 in.
func TestACLZonedSource(t *testing.T) {
	acl, err := NewACL(nil, []string{"fe80::/10"})
	if err != nil {
		t.Fatal(err)
	}
	if acl.Allowed(netip.MustParseAddr("fe80::1%eth0")) {
		t.Errorf("blacklisted fe80::/10 lets %s in", "fe80::1%eth0")
	}
}

// A 100,000-entry list costs about what a 10-entry one does per check
// (the scan it replaced cost 7,000 times more: 1.09 ms against 150 ns).
// The bound is loose, for a busy machine.
func TestACLCostIndependentOfLength(t *testing.T) {
	if testing.Short() {
		t.Skip("timing")
	}
	cost := func(n int) float64 {
		acl, err := NewACL(nil, bigList(n))
		if err != nil {
			t.Fatal(err)
		}
		a := netip.MustParseAddr("192.0.2.7")
		r := testing.Benchmark(func(b *testing.B) {
			for b.Loop() {
				acl.Allowed(a)
			}
		})
		return float64(r.T.Nanoseconds()) / float64(r.N)
	}
	small, big := cost(10), cost(100_000)
	if big > 20*small+200 {
		t.Errorf("a check costs %.0f ns with 100,000 entries, %.0f ns with 10", big, small)
	}
	t.Logf("%.1f ns with 10 entries, %.1f ns with 100,000", small, big)
}
