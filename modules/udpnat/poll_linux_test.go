package udpnat

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// openFDs is how many descriptors this process has open.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	return len(ents)
}

// TestEntriesHoldNoGoroutine: 2,000 NAT entries open at once add no
// goroutine each (one poller per relay reads them all), every client gets
// its answers, and when an admin closes them every upstream socket is
// closed and each session ends with admin_closed.
func TestEntriesHoldNoGoroutine(t *testing.T) {
	const clients, wave = 2000, 100
	// One source holds them all: past the default share of one source.
	tr := newTestRelay(t, Config{Policy: limits(t, streamstate.Limits{IdleTimeout: time.Minute, MaxConnections: 2 * clients, MaxConnectionsPerIP: 2 * clients})})
	buf := make([]byte, 64)
	// One entry first, so that the relay's poller is there.
	first := tr.client(t)
	_ = first.SetDeadline(time.Now().Add(10 * time.Second))
	roundTrip(t, first, []byte("x"), buf)
	runtime.GC()
	goroutines, fds := runtime.NumGoroutine(), openFDs(t)

	cs := make([]*net.UDPConn, clients)
	for i := range cs {
		cs[i] = tr.client(t)
		_ = cs[i].SetDeadline(time.Now().Add(20 * time.Second))
	}
	// Two rounds: the first datagram opens each entry, the second uses it.
	for round := range 2 {
		for lo := 0; lo < clients; lo += wave {
			for i := lo; i < lo+wave; i++ {
				if _, err := cs[i].Write(fmt.Appendf(nil, "%d/%d", round, i)); err != nil {
					t.Fatal(err)
				}
			}
			for i := lo; i < lo+wave; i++ {
				n, err := cs[i].Read(buf)
				if want := fmt.Sprintf("%d/%d", round, i); err != nil || string(buf[:n]) != want {
					t.Fatalf("round %d, client %d: got %q, %v; want %q (entries %d, dropped %d)", round, i, buf[:n], err, want, tr.r.Entries(), tr.state.DatagramsDropped.Load())
				}
			}
		}
	}
	if n := tr.r.Entries(); n != clients+1 {
		t.Fatalf("%d entries, want %d", n, clients+1)
	}
	if d := runtime.NumGoroutine() - goroutines; d > 5 {
		t.Errorf("%d entries added %d goroutines, want none", clients, d)
	}
	// Each entry holds its upstream socket, and nothing else.
	if d := openFDs(t) - fds; d != 2*clients {
		t.Errorf("%d entries and their %d clients added %d descriptors, want %d", clients, clients, d, 2*clients)
	}

	// An admin closes them all: every upstream socket closes, each
	// session ends with the admin's reason.
	tr.state.Sessions(func(ss *streamstate.Session) bool {
		ss.Close(streamstate.ReasonAdminClosed)
		return true
	})
	deadline := time.Now().Add(10 * time.Second)
	for tr.r.Entries() > 0 || tr.state.Active.Load() > 0 || openFDs(t)-fds > clients-1 {
		if time.Now().After(deadline) {
			t.Fatalf("after closing them all: %d entries, %d active, %d descriptors more than before", tr.r.Entries(), tr.state.Active.Load(), openFDs(t)-fds)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := tr.state.Total.Load(); n != clients+1 {
		t.Errorf("total %d, want %d", n, clients+1)
	}
	// None waits for its idle deadline in the poller any more.
	if n := expiring(tr.r); n != 0 {
		t.Errorf("%d closed entries still in the poller's expiry heap", n)
	}
}

// expiring is how many entries wait in r's poller for their idle deadline.
func expiring(r *Relay) int {
	p := r.poll.Load()
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.expiry)
}

// TestAnsweredEntriesLeaveTheExpiryHeap: 1,000 DNS-shaped flows
// (Responses 1, an idle timeout of a minute) leave nothing in the poller:
// an entry that ends with its answer does not wait there for its idle
// deadline.
func TestAnsweredEntriesLeaveTheExpiryHeap(t *testing.T) {
	tr := newTestRelay(t, Config{Responses: 1, Policy: limits(t, streamstate.Limits{IdleTimeout: time.Minute})})
	buf := make([]byte, 64)
	for i := range 1000 {
		tr.flow(t, fmt.Appendf(nil, "q%d", i), buf)
	}
	deadline := time.Now().Add(5 * time.Second)
	for tr.r.Entries() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d entries left after their answers", tr.r.Entries())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := expiring(tr.r); n != 0 {
		t.Fatalf("%d answered entries still in the poller's expiry heap", n)
	}
}

// TestQueriesRelayedWhileManyEntriesExpire: 640 entries made one after
// another reach their idle timeout in the same order, each ends at its own
// deadline, and a client's queries are relayed while they end, not held
// back until the last one has. Before, a sweep every quarter of the idle
// timeout ended all that were due at once, and the poller finished them
// all in one wake-up: no query was answered while some of them were left
// (at 6,000 new flows a second with a 1 s idle timeout, one query in a
// thousand waited 4-8 ms). With one P, what runs between two of them is
// only what the poller lets run.
func TestQueriesRelayedWhileManyEntriesExpire(t *testing.T) {
	const entries = 10 * expireBatch
	const idle = 300 * time.Millisecond
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	tr := newTestRelay(t, Config{Policy: limits(t, streamstate.Limits{IdleTimeout: idle, MaxConnections: 2 * entries, MaxConnectionsPerIP: 2 * entries})})
	buf := make([]byte, 64)
	cs := make([]*net.UDPConn, entries)
	for i := range cs {
		cs[i] = tr.client(t)
		_ = cs[i].SetDeadline(time.Now().Add(10 * time.Second))
		roundTrip(t, cs[i], []byte("x"), buf) // one at a time: the echo's socket would drop a burst
	}
	idleOnes := map[string]bool{}
	for _, c := range cs {
		idleOnes[c.LocalAddr().String()] = true
	}
	// The probe asks over and over (its entry stays busy) and notes how
	// many of the idle ones are left at each answer, until they are all
	// gone.
	probe := tr.client(t)
	_ = probe.SetDeadline(time.Now().Add(15 * time.Second))
	during := 0
	deadline := time.Now().Add(10 * time.Second)
	for left := entries; left > 0; {
		roundTrip(t, probe, []byte("probe"), buf)
		left = 0
		tr.state.Sessions(func(ss *streamstate.Session) bool {
			if idleOnes[ss.Source.String()] {
				left++
			}
			return true
		})
		if left > 0 && left < entries {
			during++
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of the %d idle entries left after 10 s", left, entries)
		}
	}
	if during == 0 {
		t.Fatalf("no query was answered while the %d idle entries were ending: they ended all at once", entries)
	}
	t.Logf("%d queries answered while the idle entries ended", during)
}

// TestAnswerCountedAfterQuestion: the poller may read an answer while the
// reader that sent its question is still in its send: the question is
// counted first. So the stream's stats never show an answer without its
// question and, with Responses 1, where the answer ends the entry, the
// session (its log line, the stream's totals) has both.
func TestAnswerCountedAfterQuestion(t *testing.T) {
	const flows = 1000
	p, buf := []byte("question"), make([]byte, 64)
	for _, responses := range []int{0, 1} {
		tr := newTestRelay(t, Config{Responses: responses, Policy: limits(t, streamstate.Limits{LogConnections: true, MaxConnections: 2 * flows, MaxConnectionsPerIP: 2 * flows})})
		for i := range flows {
			tr.flow(t, p, buf)
			// (An entry that ends while the stats are read may be left
			// out of that read: only open ones are checked each time.)
			if st := tr.state.SinceReload(); responses == 0 && st.BytesSent < uint64((i+1)*len(p)) {
				t.Fatalf("flow %d answered: %d bytes sent counted, want %d", i, st.BytesSent, (i+1)*len(p))
			}
		}
		// The last answer is counted just after it is sent: its client
		// may have it first.
		want := uint64(flows * len(p))
		deadline := time.Now().Add(5 * time.Second)
		for (tr.state.Active.Load() > 0 && responses > 0 || tr.state.SinceReload().BytesReceived < want) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if st := tr.state.SinceReload(); st.BytesSent != want || st.BytesReceived != want {
			t.Fatalf("responses %d, after %d flows of %d bytes each way: sent %d, received %d; want %d each", responses, flows, len(p), st.BytesSent, st.BytesReceived, want)
		}
	}
}

// A relay's listening socket and its reply poller are watched by the log's
// pacers while the relay serves them, and no longer once it is gone: a
// Watch without its Unwatch would leave a closed descriptor (or the next
// file to get its number) in what every pacer asks.
func TestRelaySocketsAreWatchedWhileTheyServe(t *testing.T) {
	if got := logpace.Waiting(); got != logpace.Unwatched {
		t.Fatalf("before any relay: Waiting() = %v, want Unwatched (%v)", got, logpace.Unwatched)
	}
	t.Run("serving", func(t *testing.T) {
		tr := newTestRelay(t, Config{})
		roundTrip(t, tr.client(t), []byte("query"), make([]byte, 64)) // starts the poller
		if got := logpace.Waiting(); got == logpace.Unwatched {
			t.Fatalf("while the relay serves: Waiting() = %v, want its sockets watched", got)
		}
	})
	if got := logpace.Waiting(); got != logpace.Unwatched {
		t.Fatalf("after the relay is gone: Waiting() = %v, want Unwatched (%v)", got, logpace.Unwatched)
	}
}

// TestRelaysReleaseAYieldingPacer: a log pacer that finds a datagram
// waiting on a relay's socket yields until the relay, having read it, says
// Served at the end of its wake-up; without Served it would wait for its
// bound (logpace's yieldWait, a millisecond). The listener's reader and
// the reply poller each say it: the upstream here answers nothing by
// itself, so a query wakes only the reader, and a datagram the test sends
// from the upstream wakes only the poller. With one P the relay cannot
// read before the pacer asks. Out of 20 tries, some must be released
// early: on a loaded machine one may still take the millisecond.
func TestRelaysReleaseAYieldingPacer(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	c := startRelay(t, Config{Upstream: up.LocalAddr().String()}).client(t)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	up.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	// The first query makes the entry; the upstream learns its address.
	if _, err := c.Write([]byte("query")); err != nil {
		t.Fatal(err)
	}
	_, entry, err := up.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}

	const tries = 20
	for _, side := range []struct {
		name string
		send func() error // a datagram for the relay to read
		take func() error // where the relay puts it
	}{
		{"listener", func() error { _, err := c.Write([]byte("query")); return err },
			func() error { _, _, err := up.ReadFromUDPAddrPort(buf); return err }},
		{"reply poller", func() error { _, err := up.WriteToUDPAddrPort([]byte("reply"), entry); return err },
			func() error { _, err := c.Read(buf); return err }},
	} {
		released := testenv.YieldsReleased(t, tries, side.send, side.take)
		if released == 0 {
			t.Errorf("%s: none of %d yields to it with a datagram waiting was released early: it does not say Served", side.name, tries)
		}
		t.Logf("%s: %d of %d yields released", side.name, released, tries)
	}
}

// A new entry's first datagram goes upstream before its socket is
// registered with the poller (the epoll_ctl is not on the query's way),
// so its answer may be waiting in the socket by then: the poller must
// relay it all the same, and the entry must end with it.
func TestAnswerWaitingBeforeRegistrationIsRelayed(t *testing.T) {
	const flows = 20
	var waited atomic.Int32
	t.Cleanup(func() { startEntry = (*Relay).start }) // after the relay's
	startEntry = func(r *Relay, e *entry) error {
		fds := []unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, 2000); err == nil && n == 1 {
			waited.Add(1)
		}
		return r.start(e)
	}
	tr := newTestRelay(t, Config{Responses: 1, Policy: limits(t, streamstate.Limits{MaxConnections: flows, MaxConnectionsPerIP: flows})})
	p, buf := []byte("question"), make([]byte, 64)
	for range flows {
		tr.flow(t, p, buf)
	}
	if n := waited.Load(); n != flows {
		t.Fatalf("%d of %d answers were waiting in the entry's socket when it was registered: the query must go upstream first", n, flows)
	}
	deadline := time.Now().Add(5 * time.Second)
	for tr.state.Active.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := tr.state.Active.Load(); n != 0 {
		t.Fatalf("%d entries left after %d answered flows with udp_responses 1", n, flows)
	}
}

// Two sockets of a relay (during a reload) may read the first datagrams
// of one new client at once: one entry is stored and started, once; the
// other socket's datagram goes through it; both are answered.
func TestNewClientOnTwoSocketsAtOnce(t *testing.T) {
	const clients = 300
	cfg := Config{Policy: limits(t, streamstate.Limits{IdleTimeout: time.Minute, MaxConnections: 2 * clients, MaxConnectionsPerIP: 2 * clients})}
	tr := newTestRelay(t, cfg)
	// A picker (a stream with several upstreams) counts each entry in its
	// upstream's counters too: the one that went, not the twin that lost.
	up := tr.r.cfg.Load().Upstream
	picker, err := streamstate.NewPicker("", []streamstate.Peer{{Addr: up, State: tr.state.Upstream(up)}}, streamstate.DefaultFailTimeout)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Upstream, cfg.Picker = up, picker
	tr.r.SetConfig(cfg)
	tr.r.mu.Lock()
	s := tr.r.socks[0]
	tr.r.mu.Unlock()
	rb := make([]byte, 64)
	for i := range clients {
		c := tr.client(t)
		src := c.LocalAddr().(*net.UDPAddr).AddrPort()
		start := make(chan struct{})
		var wg sync.WaitGroup
		for k := range 2 {
			wg.Go(func() {
				buf := make([]byte, headroom+16)
				n := copy(buf[headroom:], fmt.Sprintf("%d/%d", i, k))
				<-start
				tr.r.datagram(s, buf, n, src, nil)
			})
		}
		close(start)
		wg.Wait()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := map[string]bool{}
		for range 2 {
			n, err := c.Read(rb)
			if err != nil {
				t.Fatalf("client %d: %d of its 2 datagrams answered: %v", i, len(got), err)
			}
			got[string(rb[:n])] = true
		}
		if !got[fmt.Sprintf("%d/0", i)] || !got[fmt.Sprintf("%d/1", i)] {
			t.Fatalf("client %d: answers %v", i, got)
		}
		if n := tr.r.Entries(); n != i+1 {
			t.Fatalf("after client %d: %d entries", i, n)
		}
	}
	if n := tr.state.Total.Load(); n != clients {
		t.Fatalf("%d entries counted for %d clients", n, clients)
	}
	if n := tr.state.Upstream(up).Total.Load(); n != clients {
		t.Fatalf("the upstream counted %d entries for %d clients", n, clients)
	}
}

// When the poller cannot take a new entry's socket (epoll_ctl fails: out
// of memory or watches), the query is upstream already: the entry ends at
// once as upstream_error with its datagram counted sent, not dropped; the
// client's next datagram opens a new entry, which answers.
func TestEntryThePollerCannotTake(t *testing.T) {
	var fail atomic.Bool
	fail.Store(true)
	t.Cleanup(func() { startEntry = (*Relay).start }) // after the relay's
	startEntry = func(r *Relay, e *entry) error {
		if fail.Swap(false) {
			return os.NewSyscallError("epoll_ctl", unix.ENOMEM)
		}
		return r.start(e)
	}
	tr := newTestRelay(t, Config{Responses: 1, Policy: limits(t, streamstate.Limits{LogConnections: true, MaxConnections: 4, MaxConnectionsPerIP: 4})})
	logged := tr.logs()
	c := tr.client(t)
	if _, err := c.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	if r := nextLog(t, logged, "the entry the poller could not take"); r.Reason != streamstate.ReasonUpstreamError || r.DatagramsSent != 1 || r.DatagramsReceived != 0 {
		t.Fatalf("log: %+v; want upstream_error, 1 datagram sent, none received", r)
	}
	if n := tr.state.DatagramsDropped.Load(); n != 0 {
		t.Fatalf("%d datagrams counted dropped; the one that went upstream is not", n)
	}
	if n := tr.r.Entries(); n != 0 {
		t.Fatalf("%d entries left", n)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	roundTrip(t, c, []byte("second"), make([]byte, 16))
}

// An entry whose idle timeout passes while its socket is being registered
// is ended once, by the poller after the registration; not by an expiry
// that closes the socket epoll_ctl is adding, after which the failed
// registration would end the entry a second time.
func TestEntryExpiringAsItIsRegistered(t *testing.T) {
	const idle = 200 * time.Millisecond
	var held atomic.Bool
	t.Cleanup(func() { registering = func(*entry) {} }) // after the relay's
	registering = func(*entry) {
		if held.CompareAndSwap(false, true) {
			time.Sleep(3 * idle)
		}
	}
	tr := newTestRelay(t, Config{Policy: limits(t, streamstate.Limits{IdleTimeout: idle, LogConnections: true, MaxConnections: 4, MaxConnectionsPerIP: 4})})
	logged := tr.logs()
	c := tr.client(t)
	if _, err := c.Write([]byte("first")); err != nil {
		t.Fatal(err)
	}
	// Its answer may come first, or the expiry may find it waiting.
	if r := nextLog(t, logged, "the entry"); r.Reason != streamstate.ReasonIdleTimeout || r.DatagramsSent != 1 {
		t.Fatalf("log: %+v; want idle_timeout, 1 datagram sent", r)
	}
	select {
	case r := <-logged:
		t.Fatalf("the entry ended a second time: %+v", r)
	case <-time.After(3 * idle):
	}
	if n, a := tr.r.Entries(), tr.state.Active.Load(); n != 0 || a != 0 {
		t.Fatalf("%d entries, %d active after the entry ended", n, a)
	}
	// The first answer, if the poller relayed it, is read and let go.
	buf := make([]byte, 16)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
	if n, err := c.Read(buf); err == nil && string(buf[:n]) != "first" {
		t.Fatalf("read %q before the second query, want the first answer or nothing", buf[:n])
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	roundTrip(t, c, []byte("second"), buf)
}

// An entry made under the config that SetConfig is replacing, and stored
// after SetConfig ended the entries the new one does not keep, is made
// again under the new config: its client's datagrams go to the new
// upstream, not to the removed one for as long as the client talks.
func TestEntryStoredAsTheConfigChanges(t *testing.T) {
	next := tagEcho(t, "next:")
	var relay atomic.Pointer[Relay]
	var swapped atomic.Bool
	t.Cleanup(func() { storing = func(*entry) {} }) // after the relay's
	storing = func(*entry) {
		if r := relay.Load(); r != nil && swapped.CompareAndSwap(false, true) {
			cfg := r.cfg.Load().Config
			cfg.Upstream = next
			r.SetConfig(cfg)
		}
	}
	tr := newTestRelay(t, Config{Policy: limits(t, streamstate.Limits{IdleTimeout: time.Minute, MaxConnections: 4, MaxConnectionsPerIP: 4})})
	relay.Store(tr.r)
	c := tr.client(t)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	for _, q := range []string{"first", "second"} {
		if _, err := c.Write([]byte(q)); err != nil {
			t.Fatal(err)
		}
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(buf[:n]); got != "next:"+q {
			t.Fatalf("answer %q, want %q from the new upstream", got, "next:"+q)
		}
	}
	if n, a := tr.r.Entries(), tr.state.Active.Load(); n != 1 || a != 1 {
		t.Fatalf("%d entries, %d active; want the one made again", n, a)
	}
}
