package l4aegisproxy_test

import (
	"io"
	"net"
	"sync"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
)

// roundTrips sends msg and reads it back n times on c.
func roundTrips(b *testing.B, c net.Conn, msg []byte, n int) {
	buf := make([]byte, len(msg))
	for i := 0; i < n; i++ {
		if _, err := c.Write(msg); err != nil {
			b.Error(err)
			return
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Error(err)
			return
		}
	}
}

// BenchmarkRelayRoundTrip: one 64-byte message each way through guard and
// proxy (the raw path, no limit) to an echo upstream.
func BenchmarkRelayRoundTrip(b *testing.B) {
	c := benchConn(b, 1)[0]
	msg := make([]byte, 64)
	roundTrips(b, c, msg, 50)
	b.ReportAllocs()
	b.ResetTimer()
	roundTrips(b, c, msg, b.N)
}

// BenchmarkRelayParallel: four connections of one stream doing round trips
// of 16 KiB at once, so that the relays of one stream run on several cores.
func BenchmarkRelayParallel(b *testing.B) {
	const conns = 4
	cs := benchConn(b, conns)
	msg := make([]byte, 16<<10)
	b.SetBytes(int64(2 * len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range cs {
		n := b.N / conns
		if i < b.N%conns {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			roundTrips(b, c, msg, n)
		}()
	}
	wg.Wait()
}

// benchConn opens n client connections through one guard → proxy chain to
// an echo upstream.
func benchConn(b *testing.B, n int) []net.Conn {
	b.Helper()
	u := newUpstream(b, "127.0.0.1:0", func(c net.Conn) { _, _ = io.Copy(c, c) })
	ch := startChain(b, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: u.Addr})
	out := make([]net.Conn, n)
	for i := range out {
		c, err := net.Dial("tcp", ch.addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		out[i] = c
	}
	return out
}

// BenchmarkShortConnections: connect, one 64-byte round trip, close,
// through guard → proxy to echo upstreams: one upstream, and three in
// round robin (the picker's cost per connection).
func BenchmarkShortConnections(b *testing.B) {
	echo := func(c net.Conn) { _, _ = io.Copy(c, c) }
	for _, n := range []int{1, 3} {
		b.Run(map[int]string{1: "one_upstream", 3: "three_round_robin"}[n], func(b *testing.B) {
			p := &l4aegisproxy.Handler{}
			for range n {
				u := newUpstream(b, "127.0.0.1:0", echo)
				if n == 1 {
					p.Upstream = u.Addr
				} else {
					p.Upstreams = append(p.Upstreams, l4aegisproxy.Upstream{Address: u.Addr})
				}
			}
			ch := startChain(b, "127.0.0.1:0", &l4aegisguard.Handler{}, p)
			msg := make([]byte, 64)
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				c, err := net.Dial("tcp", ch.addr)
				if err != nil {
					b.Fatal(err)
				}
				roundTrips(b, c, msg, 1)
				c.Close()
			}
		})
	}
}
