package streamstate

import (
	"net/netip"
	"sync"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
)

func histogramCount(t *testing.T, s *State, k Kind) uint64 {
	t.Helper()
	var m dto.Metric
	if err := s.ConnectionDurations(k).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// ResetTotals starts the since-reload counters again; Cumulative goes on,
// and no count is lost to a reset that runs while connections count.
func TestCumulativeSurvivesResetTotals(t *testing.T) {
	st := New(1)
	defer st.Destruct()
	st.Total.Add(2)
	open := st.newSession(nopCloser{}, netip.MustParseAddrPort("192.0.2.1:1"), 0, zap.NewNop(), "t", false)
	open.AddSent(10)
	open.AddReceived(20)
	st.ResetTotals()
	if got := st.SinceReload(); got != (Totals{}) {
		t.Fatalf("since-reload counters after ResetTotals: %+v, want zero", got)
	}
	st.Total.Add(1)
	open.AddSent(5)
	if got := st.Cumulative(); got != (Totals{Connections: 3, BytesSent: 15, BytesReceived: 20}) {
		t.Fatalf("Cumulative = %+v, want 3 connections, 15 and 20 bytes", got)
	}
	open.End(ReasonClientClose, false)
	if got := st.SinceReload(); got != (Totals{Connections: 1, BytesSent: 5}) {
		t.Fatalf("SinceReload after the session ended = %+v, want 1 connection, 5 bytes sent", got)
	}

	// Resets racing with counting lose nothing, and a reader never sees
	// the cumulative count go down.
	const writers, adds = 4, 10000
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				st.ResetTotals()
			}
		}
	}()
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
			c := st.Cumulative().Connections
			if c < last {
				select {
				case errs <- "cumulative count went down":
				default:
				}
				return
			}
			last = c
		}
	}()
	var adders sync.WaitGroup
	for range writers {
		adders.Add(1)
		go func() {
			defer adders.Done()
			for range adds {
				st.Total.Add(1)
			}
		}()
	}
	adders.Wait()
	close(stop)
	wg.Wait()
	readers.Wait()
	select {
	case e := <-errs:
		t.Fatal(e)
	default:
	}
	if got := st.Cumulative().Connections; got != 3+writers*adds {
		t.Fatalf("Cumulative connections = %d, want %d", got, 3+writers*adds)
	}
}

func TestBlockAndDropCountByReason(t *testing.T) {
	st := New(1)
	defer st.Destruct()
	st.Block(BlockACL)
	st.Block(BlockNATTableFull)
	st.Block(BlockNATTableFull)
	st.DropDatagrams(DropRateLimit, 3)
	st.DropDatagrams(DropBufferFull, 1)
	if st.Blocked.Load() != 3 || st.DatagramsDropped.Load() != 4 {
		t.Fatalf("totals: blocked %d, dropped %d; want 3 and 4", st.Blocked.Load(), st.DatagramsDropped.Load())
	}
	st.ResetTotals()
	want := map[BlockReason]uint64{BlockACL: 1, BlockMaxConnections: 0, BlockNATTableFull: 2}
	for _, r := range BlockReasons() {
		if st.BlockedBy(r) != want[r] {
			t.Errorf("BlockedBy(%s) = %d, want %d (never reset)", r, st.BlockedBy(r), want[r])
		}
	}
	wantDrop := map[DropReason]uint64{DropRateLimit: 3, DropBufferFull: 1}
	for _, r := range DropReasons() {
		if st.DroppedBy(r) != wantDrop[r] {
			t.Errorf("DroppedBy(%s) = %d, want %d", r, st.DroppedBy(r), wantDrop[r])
		}
		if r.String() == "" || r.String() == "unknown" {
			t.Errorf("drop reason %d has no name", r)
		}
	}
	for _, r := range BlockReasons() {
		if r.String() == "" || r.String() == "unknown" {
			t.Errorf("block reason %d has no name", r)
		}
	}
	if BlockACL.LogReason() != ReasonACLDenied || BlockNATTableFull.LogReason() != ReasonMaxConnections {
		t.Error("block reasons must log as acl_denied and max_connections")
	}
}

// A session's end is observed in the duration histogram of its transport;
// a discarded one is not.
func TestSessionDurations(t *testing.T) {
	_, server := tcpPair(t)
	st := New(1)
	defer st.Destruct()
	src := netip.MustParseAddrPort("192.0.2.1:1")
	st.newSession(server, src, 0, zap.NewNop(), "t", false).End(ReasonClientClose, false)
	st.newSession(server, src, 0, zap.NewNop(), "t", true).End(ReasonIdleTimeout, false)
	st.newSession(server, src, 0, zap.NewNop(), "t", true).Discard()
	if tcp, udp := histogramCount(t, st, TCP), histogramCount(t, st, UDP); tcp != 1 || udp != 1 {
		t.Fatalf("observed %d TCP and %d UDP durations, want 1 and 1", tcp, udp)
	}
	n := 0
	st.Sessions(func(*Session) bool { n++; return true })
	if n != 0 {
		t.Fatalf("%d sessions still registered", n)
	}
}
