package storage

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// fakeLogStore records what a LogWriter writes. Methods a LogWriter does
// not use are left to the nil Store, and panic.
type fakeLogStore struct {
	Store

	// gate, when not nil, holds AppendConnLogs until it is closed;
	// entered receives once each time AppendConnLogs starts waiting.
	gate    chan struct{}
	entered chan struct{}
	// fail, when not nil, is returned by AppendConnLogs.
	fail error
	// pruneFails is how many of the next prunes of each stream fail;
	// every prune of stream pruneBroken (> 0) fails.
	pruneFails  map[int64]int
	pruneBroken int64

	mu      sync.Mutex
	batches [][]ConnLog
	prunes  []int64
}

func (f *fakeLogStore) AppendConnLogs(ctx context.Context, entries []ConnLog) error {
	if f.gate != nil {
		select {
		case f.entered <- struct{}{}:
		default:
		}
		select {
		case <-f.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if f.fail != nil {
		return f.fail
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.batches = append(f.batches, append([]ConnLog(nil), entries...))
	return nil
}

func (f *fakeLogStore) PruneConnLogs(ctx context.Context, streamID int64, keep int) (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.prunes = append(f.prunes, streamID)
	if f.pruneFails[streamID] > 0 {
		f.pruneFails[streamID]--
		return 0, errors.New("prune failed")
	}
	if streamID == f.pruneBroken {
		return 0, errors.New("prune of a broken stream failed")
	}
	return 0, nil
}

func (f *fakeLogStore) batchSizes() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	var n []int
	for _, b := range f.batches {
		n = append(n, len(b))
	}
	return n
}

// prunesOf is the number of prunes of stream id so far.
func (f *fakeLogStore) prunesOf(id int64) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.prunes {
		if p == id {
			n++
		}
	}
	return n
}

func (f *fakeLogStore) pruneCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.prunes)
}

// waitFor polls cond until it holds, failing the test after a while.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func entry(stream int64, n int) ConnLog {
	return ConnLog{StreamID: stream, Action: ActionAllowed, BytesSent: int64(n)}
}

func TestLogWriterBatches(t *testing.T) {
	f := &fakeLogStore{}
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 10, FlushInterval: time.Hour})
	for i := range 25 {
		if !w.Enqueue(entry(1, i)) {
			t.Fatalf("Enqueue %d refused", i)
		}
	}
	// Full batches go at once; the rest waits for the interval or Close.
	waitFor(t, "two batches", func() bool { return len(f.batchSizes()) == 2 })
	time.Sleep(20 * time.Millisecond)
	if got := f.batchSizes(); len(got) != 2 || got[0] != 10 || got[1] != 10 {
		t.Errorf("batches %v before Close, want [10 10]", got)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got := f.batchSizes(); len(got) != 3 || got[2] != 5 {
		t.Errorf("batches %v after Close, want [10 10 5]", got)
	}
	n := 0
	for _, b := range f.batches {
		for _, e := range b {
			if e.BytesSent != int64(n) {
				t.Fatalf("entry %d written as %d: order not kept", n, e.BytesSent)
			}
			n++
		}
	}
	if w.Written() != 25 || w.Dropped() != 0 {
		t.Errorf("written %d, dropped %d; want 25, 0", w.Written(), w.Dropped())
	}
}

func TestLogWriterFlushInterval(t *testing.T) {
	f := &fakeLogStore{}
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 100, FlushInterval: 20 * time.Millisecond})
	defer w.Close()
	start := time.Now()
	for i := range 3 {
		w.Enqueue(entry(1, i))
	}
	waitFor(t, "the interval's flush", func() bool { return len(f.batchSizes()) == 1 })
	if got := f.batchSizes(); got[0] != 3 {
		t.Errorf("batch of %d, want 3", got[0])
	}
	if d := time.Since(start); d < 20*time.Millisecond {
		t.Errorf("flushed after %v, before the interval", d)
	}
	// The next entry starts a new interval.
	w.Enqueue(entry(1, 3))
	waitFor(t, "the second flush", func() bool { return len(f.batchSizes()) == 2 })
}

// TestLogWriterNeverBlocks holds the store's write, as a stalled disk would,
// and shows that Enqueue still returns at once, dropping what does not fit.
func TestLogWriterNeverBlocks(t *testing.T) {
	f := &fakeLogStore{gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	w := NewLogWriter(f, LogWriterOptions{QueueSize: 10, BatchSize: 5, FlushInterval: time.Millisecond})
	w.Enqueue(entry(1, 0))
	select {
	case <-f.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the writer did not start writing")
	}

	const n = 10000
	accepted := 0
	start := time.Now()
	for i := range n {
		if w.Enqueue(entry(1, i+1)) {
			accepted++
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("%d Enqueue calls took %v with the store stalled", n, d)
	}
	if accepted != 10 {
		t.Errorf("accepted %d entries while stalled, want the queue size 10", accepted)
	}
	if got := w.Dropped(); got != n-10 {
		t.Errorf("Dropped = %d, want %d", got, n-10)
	}

	close(f.gate)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if w.Written() != 11 || w.Dropped() != n-10 {
		t.Errorf("written %d, dropped %d; want 11, %d", w.Written(), w.Dropped(), n-10)
	}
}

func TestLogWriterCloseFlushesToSQLite(t *testing.T) {
	eachBackend(t, testLogWriterCloseFlushesToSQLite)
}

func testLogWriterCloseFlushesToSQLite(t *testing.T, b testBackend) {
	s := b.store(t)
	w := NewLogWriter(s, LogWriterOptions{BatchSize: 100, FlushInterval: time.Hour})
	for i := range 250 {
		w.Enqueue(entry(int64(1+i%2), i))
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConnLogs(context.Background(), ConnLogQuery{Limit: MaxConnLogLimit})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 250 || got[0].BytesSent != 249 || got[249].BytesSent != 0 {
		t.Errorf("after Close the log holds %d entries", len(got))
	}

	// After Close: dropped, no panic, Close again is harmless.
	if w.Enqueue(entry(1, 0)) {
		t.Error("Enqueue after Close accepted the entry")
	}
	if w.Dropped() != 1 {
		t.Errorf("Dropped = %d, want 1", w.Dropped())
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestLogWriterRetention(t *testing.T) { eachBackend(t, testLogWriterRetention) }

func testLogWriterRetention(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	// Entries a previous run left beyond the retention go at the first
	// flush.
	var old []ConnLog
	for i := range 20 {
		old = append(old, entry(3, i))
	}
	if err := s.AppendConnLogs(ctx, old); err != nil {
		t.Fatal(err)
	}

	w := NewLogWriter(s, LogWriterOptions{BatchSize: 7, FlushInterval: time.Millisecond, Retention: 5, PruneInterval: time.Hour})
	for i := range 30 {
		w.Enqueue(entry(1, i))
		w.Enqueue(entry(2, i))
	}
	w.Enqueue(entry(3, 20))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for stream, want := range map[int64][]int64{1: {29, 28, 27, 26, 25}, 2: {29, 28, 27, 26, 25}, 3: {20, 19, 18, 17, 16}} {
		got, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: stream})
		if err != nil {
			t.Fatal(err)
		}
		var sent []int64
		for _, e := range got {
			sent = append(sent, e.BytesSent)
		}
		if len(sent) != len(want) {
			t.Errorf("stream %d keeps %v, want %v", stream, sent, want)
			continue
		}
		for i := range want {
			if sent[i] != want[i] {
				t.Errorf("stream %d keeps %v, want %v", stream, sent, want)
				break
			}
		}
	}

	// Negative retention keeps everything.
	w = NewLogWriter(s, LogWriterOptions{Retention: -1, PruneInterval: time.Millisecond})
	for i := range 10 {
		w.Enqueue(entry(4, i))
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.ConnLogs(ctx, ConnLogQuery{StreamID: 4}); len(got) != 10 {
		t.Errorf("retention -1 kept %d of 10", len(got))
	}
}

// TestLogWriterPrunesEveryInterval writes many batches and prunes only at
// the first flush and at Close, PruneInterval being long.
func TestLogWriterPrunesEveryInterval(t *testing.T) {
	f := &fakeLogStore{}
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 1, PruneInterval: time.Hour})
	for i := range 20 {
		w.Enqueue(entry(1, i))
	}
	waitFor(t, "20 writes", func() bool { return w.Written() == 20 })
	if n := f.pruneCount(); n != 1 {
		t.Errorf("%d prunes during 20 batches, want 1", n)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if n := f.pruneCount(); n != 2 {
		t.Errorf("%d prunes after Close, want 2", n)
	}
}

// TestLogWriterPrunesAfterRetention prunes a stream once it got Retention
// entries since its last prune, PruneInterval being long, so that a busy
// stream's table stays near Retention; a quiet stream waits for the
// interval (here: Close).
func TestLogWriterPrunesAfterRetention(t *testing.T) {
	f := &fakeLogStore{}
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 5, FlushInterval: time.Millisecond, Retention: 10, PruneInterval: time.Hour})
	w.Enqueue(entry(2, 0)) // pruned at the first flush, with what came before
	waitFor(t, "the first write", func() bool { return w.Written() == 1 })
	w.Enqueue(entry(2, 1))
	for i := range 100 {
		w.Enqueue(entry(1, i))
	}
	count := func() map[int64]int {
		f.mu.Lock()
		defer f.mu.Unlock()
		n := map[int64]int{}
		for _, id := range f.prunes {
			n[id]++
		}
		return n
	}
	// A batch is counted written before its prunes run.
	waitFor(t, "102 writes and the prunes after them", func() bool { return w.Written() == 102 && count()[1] >= 6 })
	time.Sleep(10 * time.Millisecond)
	// Batches of up to 5: a prune after every 10 to 14 entries.
	if n := count(); n[1] < 6 || n[1] > 10 || n[2] != 1 {
		t.Errorf("prunes by stream after 100 entries of stream 1 and 2 of stream 2: %v, want 6 to 10 of stream 1 (one per 10 to 14 entries) and 1 of stream 2 (the first flush)", n)
	}
	before := count()[1]
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if n := count(); n[2] != 2 || n[1] > before+1 {
		t.Errorf("prunes by stream after Close: %v, want at most one more of stream 1 and 2 of stream 2", n)
	}
}

func TestLogWriterErrors(t *testing.T) {
	fail := errors.New("disk on fire")
	f := &fakeLogStore{fail: fail}
	var reported atomic.Int32
	w := NewLogWriter(f, LogWriterOptions{FlushInterval: time.Hour, OnError: func(err error) {
		if !errors.Is(err, fail) {
			t.Errorf("OnError(%v)", err)
		}
		reported.Add(1)
	}})
	if w.Enqueue(ConnLog{StreamID: 1, Action: "maybe"}) || w.Enqueue(ConnLog{Action: ActionAllowed}) {
		t.Error("Enqueue accepted an entry the store cannot hold")
	}
	for i := range 3 {
		w.Enqueue(entry(1, i))
	}
	if err := w.Close(); !errors.Is(err, fail) {
		t.Errorf("Close = %v, want the write error", err)
	}
	if w.Dropped() != 5 || w.Written() != 0 || reported.Load() != 1 {
		t.Errorf("dropped %d, written %d, reported %d; want 5, 0, 1", w.Dropped(), w.Written(), reported.Load())
	}
}

// TestLogWriterEnqueueDuringClose has goroutines enqueue while Close runs:
// every entry Enqueue accepted is written, every other one counted dropped.
func TestLogWriterEnqueueDuringClose(t *testing.T) {
	f := &fakeLogStore{}
	w := NewLogWriter(f, LogWriterOptions{QueueSize: 64, BatchSize: 16, FlushInterval: time.Millisecond})
	var accepted, total atomic.Uint64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				total.Add(1)
				if w.Enqueue(entry(int64(g+1), i)) {
					accepted.Add(1)
				}
			}
		})
	}
	time.Sleep(30 * time.Millisecond)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond)
	close(stop)
	wg.Wait()
	if w.Written() != accepted.Load() {
		t.Errorf("written %d, accepted %d", w.Written(), accepted.Load())
	}
	if w.Written()+w.Dropped() != total.Load() {
		t.Errorf("written %d + dropped %d != enqueued %d", w.Written(), w.Dropped(), total.Load())
	}
	if accepted.Load() == 0 {
		t.Error("nothing was accepted")
	}
}

// With one P, the LogWriter's write of a big batch lets the P go between
// its slices (two per page of connLogPage entries), so that other
// goroutines run during it: the relays the network woke, once the scheduler, with the P free,
// polls it. Here a goroutine that is always ready to run counts its turns
// while 4,096 entries are written: thousands, at least one per few pauses
// (a sleep the machine delays skips some, see logpace).
// Without the pauses it ran only when the runtime preempted the writer,
// every 10 ms: 1 to 16 turns.
func TestLogWriterYieldsBetweenSlices(t *testing.T) {
	s := newStore(t)
	batch := make([]ConnLog, 4096)
	for i := range batch {
		batch[i] = ConnLog{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i)}
	}
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var written atomic.Bool
	var turns atomic.Int64
	spun := make(chan struct{})
	go func() {
		defer close(spun)
		for !written.Load() {
			turns.Add(1)
			runtime.Gosched()
		}
	}()
	err := s.AppendConnLogs(forLogWriter(context.Background(), new(logpace.Pacer)), batch)
	written.Store(true)
	<-spun
	if err != nil {
		t.Fatal(err)
	}
	slices := 2 * len(batch) / connLogPage
	t.Logf("%d turns of another goroutine during a write of %d slices", turns.Load(), slices)
	if n := turns.Load(); n < int64(slices/4) {
		t.Fatalf("another goroutine ran %d times during a write of %d slices, want about one a pause: the writer held the only P", n, slices)
	}
}

// Close writes what is queued in one transaction, and hurries it
// (logpace.Hurried): a pause per 32 slices, not one per slice, which when
// nothing else runs lasts about 1 ms. Here 4,096 entries wait for Close
// (no batch fills, no flush comes due): its 64 pages, 128 slices, pause 3
// times, not 127, and there is nothing to prune.
func TestLogWriterCloseHurries(t *testing.T) {
	const entries = 4096
	s := newStore(t)
	w := NewLogWriter(s, LogWriterOptions{QueueSize: 2 * entries, BatchSize: 2 * entries, FlushInterval: time.Hour})
	for i := range entries {
		if !w.Enqueue(ConnLog{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i)}) {
			t.Fatalf("entry %d not queued", i)
		}
	}
	if err := w.Close(); err != nil || w.Written() != entries {
		t.Fatalf("Close: %v, %d of %d entries written", err, w.Written(), entries)
	}
	slices := 2 * entries / connLogPage
	if got, want := w.pace.Slept(), (slices-1)/32; got != want {
		t.Fatalf("Close paused %d times between %d slices, want %d (once per 32)", got, slices, want)
	}
}

// A failed prune is reported on its own: once, and not as a write outage.
// The next write that works is not a recovery, a write that fails after
// it is reported, and the stream is pruned again at the next interval.
func TestLogWriterPruneFailure(t *testing.T) {
	f := &fakeLogStore{pruneFails: map[int64]int{1: 2}}
	var mu sync.Mutex
	var errs []string
	recovered := 0
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 1, PruneInterval: 20 * time.Millisecond,
		OnError:   func(err error) { mu.Lock(); errs = append(errs, err.Error()); mu.Unlock() },
		OnRecover: func(uint64) { mu.Lock(); recovered++; mu.Unlock() }})
	defer w.Close()
	// The first flush prunes (and fails); the next interval's prune of the
	// same stream, with no new entry of it, fails again; the third works.
	w.Enqueue(entry(1, 0))
	waitFor(t, "three prunes of stream 1", func() bool {
		w.Enqueue(entry(2, 0)) // a flush, for the interval's prune to run
		time.Sleep(5 * time.Millisecond)
		return f.prunesOf(1) >= 3
	})
	mu.Lock()
	if len(errs) != 1 || !strings.Contains(errs[0], "prune failed") || recovered != 0 {
		t.Errorf("after two failed prunes and writes that worked: errors %q, recoveries %d; want the prune's error once and no recovery", errs, recovered)
	}
	mu.Unlock()
	f.mu.Lock()
	f.fail = errors.New("disk full")
	f.mu.Unlock()
	w.Enqueue(entry(1, 1))
	waitFor(t, "the write failure reported", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(errs) == 2 && strings.Contains(errs[1], "disk full")
	})
}

// A stream whose prunes always fail, beside streams whose prunes work, is
// reported once, not at every interval.
func TestLogWriterPruneFailingForOneStream(t *testing.T) {
	f := &fakeLogStore{pruneBroken: 3}
	var mu sync.Mutex
	var errs []string
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 1, PruneInterval: 5 * time.Millisecond,
		OnError: func(err error) { mu.Lock(); errs = append(errs, err.Error()); mu.Unlock() }})
	defer w.Close()
	for i := 0; f.prunesOf(3) < 10; i++ {
		w.Enqueue(entry(1+int64(i%3), i)) // streams 1, 2 and 3 in turn
		time.Sleep(2 * time.Millisecond)
		if i > 5000 {
			t.Fatal("stream 3 was not pruned 10 times")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(errs) != 1 || !strings.Contains(errs[0], "broken stream") {
		t.Errorf("after 10 failed prunes of one stream among working ones: %d reports %q, want 1", len(errs), errs)
	}
}

// With the store out (writes and prunes fail), the one report is the
// write's: not one more per stream whose prune fails.
func TestLogWriterOutageReportedOnce(t *testing.T) {
	f := &fakeLogStore{fail: errors.New("database down"), pruneBroken: 2}
	f.pruneFails = map[int64]int{1: 100, 3: 100}
	var mu sync.Mutex
	var errs []string
	w := NewLogWriter(f, LogWriterOptions{BatchSize: 1, PruneInterval: time.Millisecond,
		OnError: func(err error) { mu.Lock(); errs = append(errs, err.Error()); mu.Unlock() }})
	for i := range 30 {
		w.Enqueue(entry(1+int64(i%3), i))
		time.Sleep(time.Millisecond)
	}
	waitFor(t, "30 drops", func() bool { return w.Dropped() == 30 })
	w.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(errs) != 1 || !strings.Contains(errs[0], "database down") {
		t.Errorf("an outage of writes and prunes: %d reports %q, want the write's alone", len(errs), errs)
	}
}
