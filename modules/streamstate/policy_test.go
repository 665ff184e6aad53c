package streamstate

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
)

// At the cap, goroutines keep asking for a slot while another watches
// Active: every one is refused and Active never passes the cap, not even
// for an instant. Then they take and give back slots: none is lost.
func TestAdmitNeverPassesTheCap(t *testing.T) {
	const limit, workers, rounds = 8, 8, 20000
	s := New(0)
	defer s.Destruct()
	for range limit {
		if !s.takeSlot(limit) {
			t.Fatal("a free slot was refused")
		}
	}
	var (
		wg       sync.WaitGroup
		done     atomic.Bool
		maxSeen  atomic.Int64
		admitted atomic.Int64
	)
	var watch sync.WaitGroup
	watch.Go(func() {
		for !done.Load() {
			if n := s.Active.Load(); n > maxSeen.Load() {
				maxSeen.Store(n)
			}
		}
	})
	for range workers {
		wg.Go(func() {
			for range rounds {
				if s.takeSlot(limit) {
					admitted.Add(1)
				}
			}
		})
	}
	wg.Wait()
	done.Store(true)
	watch.Wait()
	if m, a := maxSeen.Load(), admitted.Load(); m > limit || a != 0 {
		t.Fatalf("at the cap of %d: Active reached %d, %d admitted", limit, m, a)
	}

	s.Active.Store(0)
	for range workers {
		wg.Go(func() {
			for range rounds / 10 {
				if s.takeSlot(limit) {
					admitted.Add(1)
					s.Active.Add(-1)
				}
			}
		})
	}
	wg.Wait()
	if a := s.Active.Load(); a != 0 || admitted.Load() == 0 {
		t.Fatalf("after every slot was given back: Active %d, %d admitted", a, admitted.Load())
	}
	if !s.takeSlot(0) || s.Active.Load() != 1 {
		t.Fatalf("without a cap: Active %d, want 1", s.Active.Load())
	}
	s.Active.Store(0)
}

func mustPolicy(t *testing.T, l Limits) *Policy {
	t.Helper()
	p, err := NewPolicy(l, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// One admission for TCP and UDP: the access lists first, then the
// listener's cap, then max_connections; a refusal holds nothing and is
// counted by reason; an admitted connection's session holds its slots
// until it ends, and Unadmit gives back those of one that could not open.
func TestPolicyAdmitOrderAndSlots(t *testing.T) {
	st := New(1)
	defer st.Destruct()
	p := mustPolicy(t, Limits{Blacklist: []string{"192.0.2.66"}, MaxConnections: 2})
	in := netip.MustParseAddrPort("192.0.2.1:1000")
	bad := netip.MustParseAddrPort("[::ffff:192.0.2.66]:1000")
	c := &Cap{Max: 1}

	if _, ok := p.Admit(st, bad, true, c); ok || st.BlockedBy(BlockACL) != 1 || c.Len() != 0 || st.Active.Load() != 0 {
		t.Fatalf("blacklisted source (IPv4-mapped): admitted or held a slot: blocked %d, cap %d, active %d", st.BlockedBy(BlockACL), c.Len(), st.Active.Load())
	}
	a, ok := p.Admit(st, in, true, c)
	if !ok {
		t.Fatal("first UDP client refused")
	}
	ss := p.Open(st, nopCloser{}, in, true, a)
	if ss.IdleTimeout != DefaultUDPIdleTimeout {
		t.Fatalf("UDP session idle timeout %s, want the default %s", ss.IdleTimeout, DefaultUDPIdleTimeout)
	}
	if _, ok := p.Admit(st, in, true, c); ok || st.BlockedBy(BlockNATTableFull) != 1 || c.Len() != 1 || st.Active.Load() != 1 {
		t.Fatalf("over the cap: blocked %d, cap %d, active %d", st.BlockedBy(BlockNATTableFull), c.Len(), st.Active.Load())
	}
	// A TCP connection has no cap of its own but shares max_connections.
	a, ok = p.Admit(st, in, false, nil)
	if !ok {
		t.Fatal("TCP connection under max_connections refused")
	}
	tcp := p.Open(st, nopCloser{}, in, false, a)
	if _, ok := p.Admit(st, in, false, nil); ok || st.BlockedBy(BlockMaxConnections) != 1 || st.Active.Load() != 2 {
		t.Fatalf("over max_connections: blocked %d, active %d", st.BlockedBy(BlockMaxConnections), st.Active.Load())
	}
	if st.Blocked.Load() != 3 {
		t.Fatalf("Blocked = %d, want 3", st.Blocked.Load())
	}
	p.End(tcp, ReasonClientClose)
	p.End(ss, ReasonIdleTimeout)
	p.End(ss, ReasonIdleTimeout) // twice gives back nothing more
	if st.Active.Load() != 0 || c.Len() != 0 {
		t.Fatalf("after both ended: active %d, cap %d", st.Active.Load(), c.Len())
	}
	a, ok = p.Admit(st, in, true, c)
	if !ok {
		t.Fatal("slot not free again")
	}
	p.Unadmit(st, a)
	if st.Active.Load() != 0 || c.Len() != 0 {
		t.Fatalf("after Unadmit: active %d, cap %d", st.Active.Load(), c.Len())
	}
}

// Refused sources are logged once per source per BlockedLogEvery, for TCP
// and UDP alike, and only when the policy logs connections.
func TestPolicyLogsRefusalsOncePerSource(t *testing.T) {
	st := New(1)
	logger, read := fileLogger(t)
	p, err := NewPolicy(Limits{Name: "db", Whitelist: []string{"10.0.0.0/8"}, LogConnections: true}, logger)
	if err != nil {
		t.Fatal(err)
	}
	quiet := mustPolicy(t, Limits{Whitelist: []string{"10.0.0.0/8"}})
	a := netip.MustParseAddrPort("192.0.2.1:1")
	b := netip.MustParseAddrPort("192.0.2.2:1")
	quiet.Admit(st, netip.MustParseAddrPort("192.0.2.3:1"), false, nil)
	for range 5 {
		p.Admit(st, a, false, nil)
		p.Admit(st, b, true, nil)
	}
	_ = st.Destruct() // flushes the log
	lines := read()
	if len(lines) != 2 || st.Blocked.Load() != 11 {
		t.Fatalf("%d log lines, %d blocked: want 2 lines (one per source) and 11 blocked", len(lines), st.Blocked.Load())
	}
	for _, l := range lines {
		if l["action"] != "blocked" || l["disconnect_reason"] != "acl_denied" || l["stream"] != "db" {
			t.Fatalf("log line %v", l)
		}
	}
	if lines[0]["protocol"] != "tcp" || lines[1]["protocol"] != "udp" {
		t.Fatalf("protocols %v and %v, want tcp then udp", lines[0]["protocol"], lines[1]["protocol"])
	}
}

// The rate buckets: a TCP connection's start empty (shaping), a UDP
// client's full (policing); no rate, no bucket.
func TestPolicyBuckets(t *testing.T) {
	now := time.Now()
	p := mustPolicy(t, Limits{UploadRate: 1000})
	up, down := p.Buckets(false, now)
	if down != nil || up == nil || up.Allow(now, 1) {
		t.Fatalf("TCP buckets: up %v (want empty), down %v (want nil)", up, down)
	}
	up, _ = p.Buckets(true, now)
	if !up.Allow(now, 1000) || up.Allow(now, 1) {
		t.Fatal("UDP bucket: want one second's worth at once, then nothing")
	}
	if _, err := NewPolicy(Limits{UploadRate: -1}, nil); err == nil || !strings.Contains(err.Error(), "upload_rate_bytes -1") {
		t.Fatalf("negative rate: %v", err)
	}
	if _, err := NewPolicy(Limits{Whitelist: []string{"nope"}}, nil); err == nil || !strings.Contains(err.Error(), "whitelist_cidrs") {
		t.Fatalf("bad whitelist: %v", err)
	}
}

// The proxy asks the session for the raw path: only the session's own
// wrapper, without a rate limit, gives its raw socket; anything in
// between (TLS) or a limit keeps the bytes in the wrapper.
func TestSessionRawPath(t *testing.T) {
	_, server := tcpPair(t)
	st := New(1)
	defer st.Destruct()
	src := netip.MustParseAddrPort("127.0.0.1:1")
	open := mustPolicy(t, Limits{})
	ss := open.Open(st, server, src, false, Admission{})
	w := open.Wrap(server, ss)
	if raw, ok := ss.RawPath(w); !ok || raw != server {
		t.Fatalf("unlimited wrapper: raw path %v, %v; want the socket", raw, ok)
	}
	type other struct{ net.Conn }
	if _, ok := ss.RawPath(other{w}); ok {
		t.Fatal("a connection over the wrapper (TLS) got the raw path")
	}
	limited := mustPolicy(t, Limits{DownloadRate: 1 << 20})
	ls := limited.Open(st, server, src, false, Admission{})
	if _, ok := ls.RawPath(limited.Wrap(server, ls)); ok {
		t.Fatal("a rate-limited connection got the raw path")
	}
	bare := st.newSession(server, src, 0, zap.NewNop(), "t", false)
	if _, ok := bare.RawPath(server); ok {
		t.Fatal("a session without a wrapper gave the raw path")
	}
}

// TakeIdle hands the idle timeout to the relay: the wrapper stops enforcing
// it, so a read waits past it (the relay, which took it, ends the
// connection instead).
func TestTakeIdleStopsTheWrappersTimeout(t *testing.T) {
	client, server := tcpPair(t)
	st := New(1)
	defer st.Destruct()
	p := mustPolicy(t, Limits{IdleTimeout: 200 * time.Millisecond})
	src := netip.MustParseAddrPort("127.0.0.1:1")
	ss := p.Open(st, server, src, false, Admission{})
	c := p.Wrap(server, ss)
	if got := ss.TakeIdle(); got != 200*time.Millisecond {
		t.Fatalf("TakeIdle = %s, want the policy's 200ms", got)
	}
	go func() {
		time.Sleep(600 * time.Millisecond)
		_, _ = client.Write([]byte("late"))
	}()
	buf := make([]byte, 4)
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "late" {
		t.Fatalf("read after the idle timeout was taken over: %q, %v; want the late bytes", buf[:n], err)
	}
	if ss.Reason() != ReasonNone {
		t.Fatalf("reason %s, want none", ss.Reason())
	}
}

// The default caps share out the open-file limit as the README's table
// says.
func TestBudgetFor(t *testing.T) {
	for _, c := range []struct {
		limit uint64
		want  FDBudget
	}{
		{4096, FDBudget{Limit: 4096, Reserve: 512, PerStream: 1792, NATCap: 1792, ConnCap: 896, NATPerSource: 224}},
		{1 << 20, FDBudget{Limit: 1 << 20, Reserve: 4096, PerStream: 522240, NATCap: 100_000, ConnCap: 100_000, NATPerSource: 12_500}},
		{256, FDBudget{Limit: 256, Reserve: 128, PerStream: 64, NATCap: 64, ConnCap: 32, NATPerSource: 8}},
		{0, FDBudget{NATCap: 100_000, ConnCap: 100_000, NATPerSource: 12_500}},
	} {
		if got := BudgetFor(c.limit); got != c.want {
			t.Errorf("BudgetFor(%d) = %+v, want %+v", c.limit, got, c.want)
		}
	}
}
