package streamstate

import (
	"io"
	"net/netip"
	"testing"

	"go.uber.org/zap"
)

type nopCloser struct{}

func (nopCloser) Close() error { return nil }

var _ io.Closer = nopCloser{}

// BenchmarkRelayStepCounting is what each relay step costs for the byte
// counters: every parallel goroutine is one connection of the same stream
// adding the bytes of its steps, as the relays of a busy stream do on
// several cores at once.
func BenchmarkRelayStepCounting(b *testing.B) {
	st := New(1)
	b.Cleanup(func() { st.SetGracePeriod(0); _ = st.Destruct() })
	src := netip.MustParseAddrPort("192.0.2.1:1000")
	b.RunParallel(func(pb *testing.PB) {
		ss := st.newSession(nopCloser{}, src, 0, zap.NewNop(), "bench", false)
		for pb.Next() {
			ss.AddSent(1500)
			ss.AddReceived(1500)
		}
		ss.End(ReasonClientClose, false)
	})
}
