package streamstate

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) { return testenv.TCPPair(t) }

// fileLogger writes JSON log lines to a file and returns a reader of them.
func fileLogger(t *testing.T) (*zap.Logger, func() []map[string]any) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(f), zap.InfoLevel)
	read := func() []map[string]any {
		rf, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer rf.Close()
		var out []map[string]any
		sc := bufio.NewScanner(rf)
		for sc.Scan() {
			var m map[string]any
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				t.Fatalf("log line %q: %v", sc.Text(), err)
			}
			out = append(out, m)
		}
		return out
	}
	return zap.New(core), read
}

func TestReasonNames(t *testing.T) {
	for r := ReasonClientClose; r <= ReasonTLSHandshakeFailed; r++ {
		if r.String() == "" || r.String() == "unknown" {
			t.Errorf("reason %d has no name", r)
		}
	}
	if got := Reason(200).String(); got != "unknown" {
		t.Errorf("out-of-range reason: %q", got)
	}
}

func TestConnCountsAndPassesHalfClose(t *testing.T) {
	client, server := tcpPair(t)
	st := New(1)
	defer st.Destruct()
	ss := st.newSession(server, netip.MustParseAddrPort("127.0.0.1:1"), 0, zap.NewNop(), "t", false)
	c := newConn(server, ss, nil, nil)

	if _, err := client.Write([]byte("12345")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	if tot := st.SinceReload(); ss.Sent() != 5 || ss.Received() != 3 || tot.BytesSent != 5 || tot.BytesReceived != 3 {
		t.Fatalf("counters: session %d/%d, stream %d/%d", ss.Sent(), ss.Received(), tot.BytesSent, tot.BytesReceived)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(client)
	if err != nil || string(got) != "abc" {
		t.Fatalf("client after CloseWrite: %q, %v", got, err)
	}
}

func TestConnIdleTimeoutWithoutRelay(t *testing.T) {
	_, server := tcpPair(t) // the client end stays open until the test ends
	st := New(1)
	defer st.Destruct()
	ss := st.newSession(server, netip.MustParseAddrPort("127.0.0.1:1"), 300*time.Millisecond, zap.NewNop(), "t", false)
	c := newConn(server, ss, nil, nil)

	// Writes to the client count as activity: reads keep waiting while
	// they happen, then time out once both directions are quiet.
	go func() {
		for i := 0; i < 4; i++ {
			_, _ = c.Write([]byte{'x'})
			time.Sleep(150 * time.Millisecond)
		}
	}()
	start := time.Now()
	_, err := c.Read(make([]byte, 1))
	if err == nil {
		t.Fatal("read returned data; none was sent")
	}
	if d := time.Since(start); d < 700*time.Millisecond {
		t.Fatalf("read timed out after %s while the other direction was active", d)
	}
	if ss.Reason() != ReasonIdleTimeout {
		t.Fatalf("reason: %s", ss.Reason())
	}
}

func TestDestructClosesLateAndOpenSessions(t *testing.T) {
	_, server := tcpPair(t)
	_, late := tcpPair(t)
	logger, logs := fileLogger(t)
	st := New(7)
	st.SetGracePeriod(50 * time.Millisecond)
	st.Active.Add(1)
	ss := st.newSession(server, netip.MustParseAddrPort("192.0.2.1:4000"), 0, logger, "db", false)
	st.ConnStarted()
	go func() {
		// The connection's goroutine: it ends when its session is closed.
		defer st.ConnDone()
		_, _ = server.Read(make([]byte, 1))
		st.Active.Add(-1)
		ss.End(ReasonClientClose, true)
	}()

	start := time.Now()
	if err := st.Destruct(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("Destruct returned after %s, before the grace period", d)
	}
	if ss.Reason() != ReasonStreamRemoved {
		t.Fatalf("open session closed with %s, want stream_removed", ss.Reason())
	}
	// A session that registers after shutdown began is closed at once.
	ls := st.newSession(late, netip.MustParseAddrPort("192.0.2.2:4000"), 0, logger, "db", false)
	if !ls.Closed() || ls.Reason() != ReasonStreamRemoved {
		t.Fatalf("late session: closed %v, reason %s", ls.Closed(), ls.Reason())
	}
	entries := logs()
	if len(entries) != 1 || entries[0]["disconnect_reason"] != "stream_removed" || entries[0]["source_ip"] != "192.0.2.1" || entries[0]["stream"] != "db" {
		t.Fatalf("log entries: %v", entries)
	}
}

func TestLogQueueNeverBlocks(t *testing.T) {
	st := New(1)
	// Stop the writer so the queue fills: enqueueing must drop, not wait.
	close(st.logStop)
	<-st.logDone
	done := make(chan struct{})
	go func() {
		for i := 0; i < logQueueSize+100; i++ {
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 1)
			st.LogBlocked(zap.NewNop(), "t", src, ReasonACLDenied, false)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("logging blocked with a full queue")
	}
	if got := st.LogDropped.Load(); got < 100 {
		t.Fatalf("dropped entries: got %d, want at least 100", got)
	}
	st.cancel()
}

func TestPoolSharesStateUntilLastRelease(t *testing.T) {
	a := Acquire(424242)
	b := Acquire(424242)
	if a != b {
		t.Fatal("two acquires of one id must share state")
	}
	a.Total.Add(3)
	Release(424242)
	if a.Context().Err() != nil {
		t.Fatal("state shut down while still referenced")
	}
	Release(424242)
	if a.Context().Err() == nil {
		t.Fatal("last release must shut the state down")
	}
	if c := Acquire(424242); c == a || c.Total.Load() != 0 {
		t.Fatal("a new acquire after the last release must start fresh")
	}
	Release(424242)
}

// A source that keeps being refused is logged once per BlockedLogEvery;
// other sources are not held back by it.
func TestLogBlockedOncePerSource(t *testing.T) {
	st := New(1)
	var got []LogRecord
	var mu sync.Mutex
	st.SetLogSink(func(r LogRecord) bool {
		mu.Lock()
		got = append(got, r)
		mu.Unlock()
		return true
	})
	flood := netip.MustParseAddrPort("192.0.2.1:1000")
	for i := range 1000 {
		st.LogBlocked(zap.NewNop(), "t", netip.AddrPortFrom(flood.Addr(), uint16(1000+i)), ReasonACLDenied, false)
	}
	st.LogBlocked(zap.NewNop(), "t", netip.MustParseAddrPort("[::ffff:192.0.2.1]:7"), ReasonACLDenied, false) // the same IP, mapped
	st.LogBlocked(zap.NewNop(), "t", netip.MustParseAddrPort("192.0.2.2:1"), ReasonMaxConnections, false)
	st.cancel()
	close(st.logStop)
	<-st.logDone
	if len(got) != 2 || got[0].Source.Addr() != flood.Addr() || got[1].Source.Addr().String() != "192.0.2.2" || !got[0].Blocked || got[1].Reason != ReasonMaxConnections {
		t.Fatalf("logged %+v, want one entry for 192.0.2.1 and one for 192.0.2.2", got)
	}
}

// An entry the sink cannot take (storage behind) counts as dropped.
func TestLogSinkDropsAreCounted(t *testing.T) {
	st := New(1)
	st.SetLogSink(func(LogRecord) bool { return false })
	for i := range 3 {
		st.LogBlocked(zap.NewNop(), "t", netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), 1), ReasonACLDenied, false)
	}
	st.cancel()
	close(st.logStop)
	<-st.logDone
	if got := st.LogDropped.Load(); got != 3 {
		t.Fatalf("LogDropped = %d after the sink refused 3 entries, want 3", got)
	}
}

// A burst of log entries is written in full, and the stream gives the
// queue's memory back once it is quiet.
func TestLogQueueGivesMemoryBack(t *testing.T) {
	st := New(1)
	defer func() { st.cancel(); close(st.logStop); <-st.logDone }()
	var written atomic.Int64
	st.SetLogSink(func(LogRecord) bool { written.Add(1); return true })
	const n = logQueueSize / 2
	for i := range n {
		src := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 1)
		st.LogBlocked(zap.NewNop(), "t", src, ReasonACLDenied, false)
	}
	deadline := time.Now().Add(5 * time.Second)
	for written.Load() < n && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := written.Load(); got != n || st.LogDropped.Load() != 0 {
		t.Fatalf("written %d of %d, dropped %d", got, n, st.LogDropped.Load())
	}
	// One more entry: the writer takes it with its spare batch, so after
	// it neither the queue nor the writer holds the burst's room.
	st.LogBlocked(zap.NewNop(), "t", netip.MustParseAddrPort("192.0.2.1:1"), ReasonACLDenied, false)
	for written.Load() < n+1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	st.logq.mu.Lock()
	room := cap(st.logq.entries)
	st.logq.mu.Unlock()
	if room > logQueueKeep {
		t.Fatalf("the quiet queue keeps room for %d entries; want at most %d", room, logQueueKeep)
	}
}

// While a burst goes on, the queue takes the room the writer's last batch
// grew, rather than growing its own again for each batch: entries are
// queued on the data path, and a grown queue is copied there.
func TestLogQueueKeepsItsRoomThroughABurst(t *testing.T) {
	st := New(1)
	st.logWait = time.Hour // only logQueueKeep waiting entries end a wait
	gate := make(chan struct{})
	st.SetLogSink(func(LogRecord) bool { <-gate; return true })
	defer func() {
		close(gate)
		st.cancel()
		close(st.logStop)
		<-st.logDone
	}()
	next := 0
	refuse := func(n int) {
		for range n {
			next++
			st.LogBlocked(zap.NewNop(), "t", netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(next >> 8), byte(next)}), 1), ReasonACLDenied, false)
		}
	}
	queued := func() (n, room int) {
		st.logq.mu.Lock()
		defer st.logq.mu.Unlock()
		return len(st.logq.entries), cap(st.logq.entries)
	}
	const more = logQueueKeep + logQueueKeep/2 // each batch outgrows logQueueKeep
	// Batch 1 is taken; while the writer is held on its first line, the
	// queue grows past logQueueKeep with batch 2.
	refuse(logQueueKeep)
	testenv.Eventually(t, "batch 1 taken", func() bool { n, _ := queued(); return n == 0 })
	refuse(more)
	for b := 2; b <= 4; b++ {
		// Let the writer finish the batch it holds; it takes the next,
		// which waits full, and gives the queue its spare room.
		for range logQueueKeep {
			gate <- struct{}{}
		}
		if b > 2 {
			for range more - logQueueKeep {
				gate <- struct{}{}
			}
		}
		testenv.Eventually(t, fmt.Sprintf("batch %d taken", b), func() bool { n, _ := queued(); return n == 0 })
		if _, room := queued(); b > 2 && room < more {
			t.Fatalf("batch %d: the queue has room for %d entries after the writer took a burst's batch of %d; want the room that batch grew", b, room, more)
		}
		refuse(more)
	}
}

// Lines wait for the rest of their burst: until logQueueKeep entries are
// waiting, or a stop, which writes the rest at once.
func TestLogLinesWaitForTheirBurst(t *testing.T) {
	st := New(1)
	st.logWait = time.Hour // before the first entry: the writer reads it after
	var written atomic.Int64
	st.SetLogSink(func(LogRecord) bool { written.Add(1); return true })
	refuse := func(i int) {
		st.LogBlocked(zap.NewNop(), "t", netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 1), ReasonACLDenied, false)
	}
	for i := range 3 {
		refuse(i)
		time.Sleep(2 * time.Millisecond) // time enough for a writer that did not wait
	}
	time.Sleep(50 * time.Millisecond)
	if got := written.Load(); got != 0 {
		t.Fatalf("%d lines written before their burst was complete, want 0", got)
	}
	for i := 3; i < logQueueKeep; i++ {
		refuse(i)
	}
	deadline := time.Now().Add(5 * time.Second)
	for written.Load() < logQueueKeep && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := written.Load(); got != logQueueKeep {
		t.Fatalf("written %d lines after %d were queued, want all of them without waiting for logWait", got, logQueueKeep)
	}
	refuse(logQueueKeep)
	st.cancel()
	close(st.logStop)
	select {
	case <-st.logDone:
	case <-time.After(5 * time.Second):
		t.Fatal("a stop waited for the lone entry's burst")
	}
	if got := written.Load(); got != logQueueKeep+1 {
		t.Fatalf("written %d lines after the stop, want %d", got, logQueueKeep+1)
	}
}

// The queue signals a burst once logQueueKeep entries wait, and a take
// clears the signal with them.
func TestLogQueueSignalsAFullBurst(t *testing.T) {
	q := logQueue{wake: make(chan struct{}, 1), full: make(chan struct{}, 1)}
	for range logQueueKeep - 1 {
		q.push(logEntry{})
	}
	if len(q.full) != 0 {
		t.Fatalf("full signalled with %d entries waiting, want at %d", logQueueKeep-1, logQueueKeep)
	}
	q.push(logEntry{})
	if len(q.full) != 1 {
		t.Fatalf("full not signalled with %d entries waiting", logQueueKeep)
	}
	if got := len(q.take(nil)); got != logQueueKeep || len(q.full) != 0 {
		t.Fatalf("take returned %d entries and left full at %d, want %d and 0", got, len(q.full), logQueueKeep)
	}
}

// A side's error replaces that side's clean close, which the other
// direction may have seen first, and nothing else.
func TestSetFailure(t *testing.T) {
	st := New(1)
	defer func() { st.cancel(); close(st.logStop); <-st.logDone }()
	for _, tc := range []struct {
		set, want Reason
	}{
		{ReasonNone, ReasonUpstreamError},
		{ReasonUpstreamClose, ReasonUpstreamError},
		{ReasonClientClose, ReasonClientClose},
		{ReasonIdleTimeout, ReasonIdleTimeout},
		{ReasonStreamRemoved, ReasonStreamRemoved},
	} {
		ss := st.newSession(io.NopCloser(nil), netip.MustParseAddrPort("192.0.2.1:1"), 0, zap.NewNop(), "t", false)
		if tc.set != ReasonNone {
			ss.SetReason(tc.set)
		}
		ss.SetFailure(ReasonUpstreamError, ReasonUpstreamClose)
		if got := ss.Reason(); got != tc.want {
			t.Errorf("after %s: %s, want %s", tc.set, got, tc.want)
		}
		ss.End(ReasonNone, false)
	}
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// The last release of a stream ends its grace period when its last
// connection ends, at that moment: it waits on the event, not on a clock.
func TestDestructWakesWhenTheLastConnectionEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(1)
		s.SetGracePeriod(time.Hour)
		p, err := NewPolicy(Limits{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		src := netip.MustParseAddrPort("192.0.2.1:1000")
		a, ok := p.Admit(s, src, false, nil)
		if !ok {
			t.Fatal("not admitted")
		}
		ss := p.Open(s, closerFunc(func() error { return nil }), src, false, a)
		var done atomic.Bool
		go func() {
			_ = s.Destruct()
			done.Store(true)
		}()
		synctest.Wait()
		if done.Load() {
			t.Fatal("Destruct returned while a connection was open, within the grace period")
		}
		start := time.Now()
		ss.ReleaseSlot()
		synctest.Wait()
		if !done.Load() {
			t.Fatal("Destruct still waits after the last connection ended")
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("Destruct returned %s after the last connection ended, want at once", d)
		}
	})
}

// The log writer makes a line and the sink's record from one entry: the
// sink gets the source's text the line has (IPv4-mapped as IPv4), and a
// line has only its own entry's fields, though the writer reuses their
// slice.
func TestLogLineAndSinkShareSourceIP(t *testing.T) {
	st := New(1)
	core, lines := observer.New(zap.InfoLevel)
	st.SetConnLogger(zap.New(core))
	var got []LogRecord
	var mu sync.Mutex
	st.SetLogSink(func(r LogRecord) bool {
		mu.Lock()
		got = append(got, r)
		mu.Unlock()
		return true
	})
	st.enqueueLog(logEntry{rec: LogRecord{StreamID: 1, Stream: "t", Source: netip.MustParseAddrPort("[::ffff:192.0.2.9]:53"),
		UDP: true, Upstream: "192.0.2.10:53", DatagramsSent: 1, DatagramsReceived: 1}})
	st.enqueueLog(logEntry{rec: LogRecord{StreamID: 1, Stream: "t", Source: netip.MustParseAddrPort("[2001:db8::1]:9")}})
	st.cancel()
	close(st.logStop)
	<-st.logDone
	if len(got) != 2 || got[0].SourceIP != "192.0.2.9" || got[1].SourceIP != "2001:db8::1" {
		t.Fatalf("the sink got %+v, want source_ip 192.0.2.9, then 2001:db8::1", got)
	}
	all := lines.All()
	if len(all) != 2 {
		t.Fatalf("%d lines, want 2", len(all))
	}
	first, second := all[0].ContextMap(), all[1].ContextMap()
	if first["source_ip"] != "192.0.2.9" || first["upstream"] != "192.0.2.10:53" || first["datagrams_sent"] != uint64(1) {
		t.Errorf("first line %v", first)
	}
	if second["source_ip"] != "2001:db8::1" || second["protocol"] != "tcp" || len(second) != 10 {
		t.Errorf("second line %v: want its own 10 fields, no upstream and no datagram counts", second)
	}
}

// With one P, the log goroutine lets the P go between slices of a burst
// of lines (logpace.Slice), so that other goroutines run during it: the
// relays the network woke, once the scheduler, with the P free, polls it.
// Here a goroutine that is always ready to run counts its turns while
// 2,048 queued lines are written: hundreds, at least one per few pauses
// (a sleep the machine delays skips some, see logpace).
// Without the pauses it ran only when the runtime preempted the writer,
// every 10 ms: 1 or 2 turns.
func TestLogBurstYieldsBetweenSlices(t *testing.T) {
	const lines = 2048
	st := New(1)
	defer func() {
		st.cancel()
		close(st.logStop)
		<-st.logDone
	}()
	logged := queueLines(t, st, lines)
	var turns atomic.Int64
	for logged.Load() < lines {
		turns.Add(1)
		runtime.Gosched()
	}
	slices := lines / logpace.Slice
	t.Logf("%d turns of another goroutine while %d lines were written in %d slices", turns.Load(), lines, slices)
	if n := turns.Load(); n < int64(slices/4) {
		t.Fatalf("another goroutine ran %d times while %d slices of lines were written, want about one a pause: the log goroutine held the only P", n, slices)
	}
}

// queueLines sets GOMAXPROCS to 1 for the rest of the test and queues n
// log entries on st, whose lines go nowhere; it returns the count of
// entries st's log goroutine has written so far.
func queueLines(t *testing.T, st *State, n int) *atomic.Int64 {
	t.Helper()
	st.SetConnLogger(zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zap.InfoLevel)))
	logged := new(atomic.Int64)
	st.SetLogSink(func(LogRecord) bool { logged.Add(1); return true })
	procs := runtime.GOMAXPROCS(1)
	t.Cleanup(func() { runtime.GOMAXPROCS(procs) })
	for i := range n {
		st.enqueueLog(logEntry{rec: LogRecord{StreamID: 1, Stream: "t", ConnID: uint64(i), Source: netip.MustParseAddrPort("192.0.2.9:53"), Upstream: "192.0.2.10:53"}})
	}
	return logged
}

// A stopping stream waits for its log goroutine to write what is queued,
// so that goroutine hurries (logpace.Hurried): a pause per 32 slices, not
// one per slice, which when nothing else runs lasts about 1 ms, seconds
// for a full queue. A goroutine that is always ready to run counts the
// times it finds more lines written since its last turn, that is, the
// writer's runs between two pauses (or preemptions): about 32 for 2,048
// lines, against about a thousand with a pause per slice.
func TestStoppingLogWriterHurries(t *testing.T) {
	const lines = 2048
	st := New(1)
	logged := queueLines(t, st, lines)
	st.cancel()
	close(st.logStop)
	runs, seen := 0, int64(0)
	for done := false; !done; {
		select {
		case <-st.logDone:
			done = true
		default:
			if n := logged.Load(); n != seen {
				runs, seen = runs+1, n
			}
			runtime.Gosched()
		}
	}
	if n := logged.Load(); n != lines {
		t.Fatalf("%d of %d queued lines written before the stop ended", n, lines)
	}
	slices := lines / logpace.Slice
	t.Logf("the stopping stream's log goroutine wrote %d lines in %d slices and %d runs", lines, slices, runs)
	if runs >= slices/4 {
		t.Fatalf("a stopping stream wrote %d slices of lines in %d runs: it paused at about every slice, not once per 32", slices, runs)
	}
}

// The web UI's log page suggests the disconnect reasons a log entry can
// have: every reason's name, and no other but sni_no_match (which the
// streams app gives a connection no stream on a shared port took).
func TestUIOffersEveryReason(t *testing.T) {
	src, err := os.ReadFile("../../ui/static/log.js")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)const REASONS = \[(.*?)\];`).FindSubmatch(src)
	if m == nil {
		t.Fatal("ui/static/log.js: no REASONS list")
	}
	offered := map[string]bool{}
	for _, q := range regexp.MustCompile(`'([a-z_]+)'`).FindAllSubmatch(m[1], -1) {
		offered[string(q[1])] = true
	}
	want := map[string]bool{"sni_no_match": true}
	for _, name := range reasonNames {
		if name != "" {
			want[name] = true
		}
	}
	for name := range want {
		if !offered[name] {
			t.Errorf("ui/static/log.js REASONS lacks %q", name)
		}
	}
	for name := range offered {
		if !want[name] {
			t.Errorf("ui/static/log.js REASONS has %q, which no log entry has", name)
		}
	}
}

// A health check that ends as checks are turned off (ClearHealth) records
// nothing: no later check would correct what it left, and an upstream it
// found down would stay skipped.
func TestHealthOfACheckEndedByClearHealth(t *testing.T) {
	s := New(1)
	u := s.Upstream("127.0.0.1:1")
	round := s.HealthRound()
	if !s.RecordHealth(round, u, Health{Healthy: true}) || u.Health() == nil {
		t.Fatal("a check of the current round was not recorded")
	}
	s.ClearHealth()
	if s.RecordHealth(round, u, Health{Healthy: false, LastError: "refused"}) || s.RecordHealth(round, nil, Health{}) {
		t.Error("a check that began before ClearHealth recorded its result")
	}
	if u.Health() != nil || s.Health() != nil || !u.Up(time.Now().UnixNano()) {
		t.Errorf("after ClearHealth and a late check: upstream health %+v, stream health %+v; want none, and the upstream up", u.Health(), s.Health())
	}
}
