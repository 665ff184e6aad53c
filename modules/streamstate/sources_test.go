package streamstate

import (
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

func v4(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 1000)
}

// Without per-source limits, a stream's connections never reach its
// per-source table.
func TestSourcesUntouchedWithoutLimits(t *testing.T) {
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	p := mustPolicy(t, Limits{MaxConnections: 10})
	for i := range 5 {
		a, ok := p.Admit(st, v4(i), false, nil)
		if !ok || a.src != nil {
			t.Fatalf("admission %d: %v, source entry %v", i, ok, a.src)
		}
		p.Unadmit(st, a)
	}
	if n := st.Sources().Len(); n != 0 {
		t.Fatalf("%d sources in the table, want none", n)
	}
}

// max_connections_per_ip counts IPv4-mapped and plain IPv4 as one source
// and IPv6 by /64; a refusal takes nothing; the slot comes back when the
// session ends, and the entry goes with it when it has no rate history.
func TestSourcesPerIPAndIPv6Prefix(t *testing.T) {
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	p := mustPolicy(t, Limits{MaxConnectionsPerIP: 2})
	open := func(src string) *Session {
		t.Helper()
		a, ok := p.Admit(st, netip.MustParseAddrPort(src), false, nil)
		if !ok {
			return nil
		}
		return p.Open(st, nopCloser{}, netip.MustParseAddrPort(src), false, a)
	}
	a := open("192.0.2.1:1")
	b := open("[::ffff:192.0.2.1]:2")
	if a == nil || b == nil || open("192.0.2.1:3") != nil {
		t.Fatal("IPv4 and IPv4-mapped: want 2 admitted, the third refused")
	}
	c := open("[2001:db8:1:2::1]:1")
	d := open("[2001:db8:1:2:ffff::9]:1")
	if c == nil || d == nil || open("[2001:db8:1:2:abcd::1]:1") != nil {
		t.Fatal("one /64: want 2 admitted, the third refused")
	}
	if open("[2001:db8:1:3::1]:1") == nil {
		t.Fatal("another /64 refused")
	}
	if got := st.BlockedBy(BlockMaxPerIP); got != 2 || st.Active.Load() != 5 {
		t.Fatalf("blocked %d, active %d; want 2 and 5", got, st.Active.Load())
	}
	p.End(a, ReasonClientClose)
	if open("192.0.2.1:4") == nil {
		t.Fatal("a freed slot did not let the source in again")
	}
	if n := st.Sources().Open(netip.MustParseAddr("2001:db8:1:2::77")); n != 2 {
		t.Fatalf("the /64 holds %d, want 2", n)
	}
	st.CloseAll(ReasonShutdown)
	st.Sessions(func(ss *Session) bool { p.End(ss, ReasonShutdown); return true })
	if n := st.Sources().Len(); n != 0 {
		t.Fatalf("%d sources left with no connection and no rate limit, want 0", n)
	}
}

// A listener's cap with a default (the UDP relay's NAT cap) lets one
// source hold an eighth of it while max_connections_per_ip is 0
// (source_share); max_connections_per_ip replaces that share.
func TestSourcesDefaultShareOfCap(t *testing.T) {
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	c := &Cap{Max: 1000, Default: 16}
	p := mustPolicy(t, Limits{})
	src := netip.MustParseAddrPort("192.0.2.1:1")
	for i := range 2 {
		if _, ok := p.Admit(st, src, true, c); !ok {
			t.Fatalf("entry %d refused", i)
		}
	}
	if _, ok := p.Admit(st, src, true, c); ok || st.BlockedBy(BlockSourceShare) != 1 {
		t.Fatalf("third entry: admitted %v, source_share %d; want refused (16/8 = 2)", ok, st.BlockedBy(BlockSourceShare))
	}
	if _, ok := p.Admit(st, netip.MustParseAddrPort("192.0.2.2:1"), true, c); !ok {
		t.Fatal("another source refused")
	}
	own := mustPolicy(t, Limits{MaxConnectionsPerIP: 4})
	for i := range 2 {
		if _, ok := own.Admit(st, src, true, c); !ok {
			t.Fatalf("with max_connections_per_ip 4: entry %d refused", i+3)
		}
	}
	if _, ok := own.Admit(st, src, true, c); ok || st.BlockedBy(BlockMaxPerIP) != 1 {
		t.Fatal("with max_connections_per_ip 4: the fifth admitted")
	}
	// The default cap of the listener: 16 with max_connections 0.
	for i := 0; c.Len() < 16; i++ {
		if _, ok := p.Admit(st, v4(i), true, c); !ok {
			t.Fatalf("entry %d of %d refused", c.Len()+1, 16)
		}
	}
	if _, ok := p.Admit(st, v4(100), true, c); ok || st.BlockedBy(BlockNATTableFull) != 1 {
		t.Fatal("past the cap's default: admitted")
	}
	// max_connections replaces the default.
	if _, ok := mustPolicy(t, Limits{MaxConnections: 100}).Admit(st, v4(101), true, c); !ok {
		t.Fatal("with max_connections 100: refused at the default of 16")
	}
}

// connection_rate_per_ip is a token bucket: N at once, then one per
// window/N; a refusal spends no token, and a connection refused by a
// stream-wide limit after the rate check gives its token back.
func TestSourcesRate(t *testing.T) {
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	const window = 400 * time.Millisecond
	p := mustPolicy(t, Limits{ConnectionRatePerIP: 4, ConnectionRateWindow: window, MaxConnections: 100})
	src := netip.MustParseAddrPort("192.0.2.1:1")
	admit := func() bool {
		a, ok := p.Admit(st, src, false, nil)
		if ok {
			p.Unadmit(st, a)
		}
		return ok
	}
	start := time.Now()
	for i := range 4 {
		if !admit() {
			t.Fatalf("connection %d refused", i+1)
		}
	}
	if admit() {
		t.Skip("the machine is too slow for a 100ms token")
	}
	if st.BlockedBy(BlockRateLimited) != 1 {
		t.Fatalf("rate_limited %d, want 1", st.BlockedBy(BlockRateLimited))
	}
	time.Sleep(time.Until(start.Add(window / 4)))
	if !admit() {
		t.Fatal("no token after window/4")
	}
	// Refused by max_connections after the rate check: the token is
	// given back.
	full := mustPolicy(t, Limits{ConnectionRatePerIP: 1, ConnectionRateWindow: time.Hour, MaxConnections: 1})
	other := netip.MustParseAddrPort("192.0.2.9:1")
	blocker, _ := full.Admit(st, netip.MustParseAddrPort("192.0.2.8:1"), false, nil)
	if _, ok := full.Admit(st, other, false, nil); ok {
		t.Fatal("admitted over max_connections")
	}
	full.Unadmit(st, blocker)
	if _, ok := full.Admit(st, other, false, nil); !ok {
		t.Fatal("the token of a connection refused by max_connections was spent")
	}
}

// The table holds at most MaxSources: past it each shard forgets its
// oldest idle source first (its rate history goes, so it is let in again);
// when a shard holds only busy sources a new one is refused
// (source_table_full).
func TestSourcesBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("fills the table")
	}
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	p := mustPolicy(t, Limits{ConnectionRatePerIP: 1, ConnectionRateWindow: time.Hour})
	n := MaxSources + MaxSources/5
	for i := range n {
		a, ok := p.Admit(st, v4(i), false, nil)
		if !ok {
			t.Fatalf("source %d refused", i)
		}
		p.Unadmit(st, a)
	}
	if got := st.Sources().Len(); got > MaxSources {
		t.Fatalf("%d sources remembered, want at most %d", got, MaxSources)
	}
	if _, ok := p.Admit(st, v4(0), false, nil); !ok {
		t.Fatal("the oldest idle source is still remembered (refused by its rate)")
	}
	if _, ok := p.Admit(st, v4(n-1), false, nil); ok {
		t.Fatal("the newest source was forgotten (admitted again within its window)")
	}

	busy := NewSources()
	refused := 0
	for i := 0; i < MaxSources+MaxSources/5 && refused == 0; i++ {
		if _, r, ok := busy.take(v4(i).Addr(), 1, false, Rate{}); !ok {
			if r != BlockSourcesFull {
				t.Fatalf("refused for %s, want source_table_full", r)
			}
			refused++
		}
	}
	if refused == 0 || busy.Len() > MaxSources {
		t.Fatalf("busy table: %d refused, %d sources", refused, busy.Len())
	}
}

// Memory per source: the table's heap per remembered source.
func TestSourcesMemoryPerSource(t *testing.T) {
	if testing.Short() {
		t.Skip("fills the table")
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tab := NewSources()
	r := Rate{N: 1, Window: time.Hour}
	for i := range MaxSources {
		s, _, ok := tab.take(v4(i).Addr(), 0, false, r)
		if !ok {
			t.Fatal("refused")
		}
		tab.release(s) // idle, kept for its rate history
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(tab.Len())
	t.Logf("%d sources remembered of %d: %.0f bytes per source (heap)", tab.Len(), MaxSources, per)
	if per > 400 {
		t.Errorf("%.0f bytes per source, want at most 400", per)
	}
	runtime.KeepAlive(tab)
}

// BenchmarkAdmit is the admission of a TCP connection (Admit and
// Unadmit): without per-source limits, and with them (max_connections_per_ip
// and connection_rate_per_ip) for known sources (each holds another
// connection open), every parallel goroutine a source of its own; and
// new_source: with the limits, from a source the table does not hold.
func BenchmarkAdmit(b *testing.B) {
	for _, c := range []struct {
		name string
		l    Limits
	}{
		{"off", Limits{}},
		{"per_ip", Limits{MaxConnectionsPerIP: 1 << 20, ConnectionRatePerIP: 1_000_000, ConnectionRateWindow: time.Millisecond}},
		{"new_source", Limits{MaxConnectionsPerIP: 1 << 20}},
	} {
		b.Run(c.name, func(b *testing.B) {
			st := New(1)
			b.Cleanup(func() { st.SetGracePeriod(0); _ = st.Destruct() })
			p, err := NewPolicy(c.l, nil)
			if err != nil {
				b.Fatal(err)
			}
			var next atomic.Int64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				src := v4(int(next.Add(1)))
				if c.name == "per_ip" {
					held, _ := p.Admit(st, src, false, nil)
					defer p.Unadmit(st, held)
				}
				for pb.Next() {
					a, ok := p.Admit(st, src, false, nil)
					if !ok {
						b.Fatal("refused")
					}
					p.Unadmit(st, a)
				}
			})
		})
	}
}

// With max_connections 0 a stream's TCP connections stop at the default
// cap of the open-file limit (connection_cap); an explicit max_connections
// replaces it.
func TestPolicyDefaultConnectionCap(t *testing.T) {
	st := New(1)
	st.SetGracePeriod(0)
	defer st.Destruct()
	p := mustPolicy(t, Limits{})
	if p.connCap != Budget().ConnCap || p.connCap < 1 {
		t.Fatalf("default cap %d, want Budget().ConnCap %d", p.connCap, Budget().ConnCap)
	}
	p.connCap = 2
	for i := range 2 {
		if _, ok := p.Admit(st, v4(i), false, nil); !ok {
			t.Fatalf("connection %d refused", i+1)
		}
	}
	if _, ok := p.Admit(st, v4(2), false, nil); ok || st.BlockedBy(BlockConnectionCap) != 1 {
		t.Fatalf("third connection with a default cap of 2: admitted %v, connection_cap %d", ok, st.BlockedBy(BlockConnectionCap))
	}
	own := mustPolicy(t, Limits{MaxConnections: 3})
	own.connCap = 2
	if _, ok := own.Admit(st, v4(2), false, nil); !ok {
		t.Fatal("with max_connections 3: refused at the default cap")
	}
	// A UDP entry is bounded by its listener's cap, not by the TCP default.
	if _, ok := p.Admit(st, v4(3), true, &Cap{Max: 10}); !ok {
		t.Fatal("a UDP entry refused at the TCP default cap")
	}
}
