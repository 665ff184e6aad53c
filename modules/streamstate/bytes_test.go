package streamstate

import (
	"net/netip"
	"sync"
	"testing"

	"go.uber.org/zap"
)

// A relay step counts its bytes in its own session only: nothing that the
// stream's other connections write changes, so relays of one stream on
// several cores do not bounce a cache line. The stream's totals still see
// the bytes of open sessions, and fold them in exactly when they end.
func TestRelayStepWritesNothingShared(t *testing.T) {
	st := New(1)
	defer st.Destruct()
	src := netip.MustParseAddrPort("192.0.2.1:1")
	a := st.newSession(nopCloser{}, src, 0, zap.NewNop(), "t", false)
	b := st.newSession(nopCloser{}, src, 0, zap.NewNop(), "t", true)
	for range 100 {
		a.AddSent(1000)
		a.AddReceived(10)
		b.AddDatagramSent(7)
		b.AddDatagramReceived(3)
	}
	if e0, e1 := st.ended[dirSent].Load(), st.ended[dirReceived].Load(); e0 != 0 || e1 != 0 {
		t.Fatalf("relay steps wrote the stream's counters (%d, %d): want them in the sessions only", e0, e1)
	}
	if got := st.SinceReload(); got.BytesSent != 100*1007 || got.BytesReceived != 100*13 {
		t.Fatalf("totals of open sessions = %+v, want 100700 and 1300 bytes", got)
	}
	a.End(ReasonClientClose, false)
	if got := st.SinceReload(); got.BytesSent != 100*1007 || got.BytesReceived != 100*13 {
		t.Fatalf("totals after one session ended = %+v, want 100700 and 1300 bytes", got)
	}
	b.End(ReasonIdleTimeout, false)
	if e0, e1 := st.ended[dirSent].Load(), st.ended[dirReceived].Load(); e0 != 100*1007 || e1 != 100*13 {
		t.Fatalf("ended counters = %d, %d: want every byte folded in once", e0, e1)
	}
	if got := st.Cumulative(); got.BytesSent != 100*1007 || got.BytesReceived != 100*13 {
		t.Fatalf("Cumulative = %+v, want 100700 and 1300 bytes", got)
	}
}

// Sessions that count and end while readers read: a reader never sees the
// bytes go down or above what was counted, and the end result is exact.
func TestByteTotalsWhileSessionsEnd(t *testing.T) {
	st := New(1)
	defer st.Destruct()
	const workers, sessions, steps = 4, 200, 50
	src := netip.MustParseAddrPort("192.0.2.1:1")
	stop := make(chan struct{})
	errs := make(chan string, 1)
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		var last uint64
		for {
			select {
			case <-stop:
				return
			default:
			}
			n := st.Cumulative().BytesSent
			if n < last || n > workers*sessions*steps {
				select {
				case errs <- "bytes went down or above the total":
				default:
				}
				return
			}
			last = n
		}
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range sessions {
				ss := st.newSession(nopCloser{}, src, 0, zap.NewNop(), "t", false)
				for range steps {
					ss.AddSent(1)
				}
				ss.End(ReasonClientClose, false)
			}
		}()
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	select {
	case e := <-errs:
		t.Fatal(e)
	default:
	}
	if got := st.Cumulative().BytesSent; got != workers*sessions*steps {
		t.Fatalf("bytes sent = %d, want %d", got, workers*sessions*steps)
	}
}
