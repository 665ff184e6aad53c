// Package streamstate holds the runtime state of a stream that outlives one
// config load, in one place: live counters, health, TLS handshake
// counters, the open connections, the connection-log queue and the UDP
// relay of each listen address. The streams app and the aegis layer4
// handlers share it by stream ID through one reference-counted pool, so a
// reload or an edit keeps counting the connections that are still open and
// keeps max_connections true across the change; the stats and the metrics
// read it there. Beside the pool sits the certificate registry (certs.go),
// keyed by certificate, which several streams may share.
//
// The package also holds the admission policy (policy.go) that the TCP
// guard and the UDP relay both apply.
package streamstate

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// DefaultGracePeriod is how long a stream that goes away waits for its open
// connections to end before closing them.
const DefaultGracePeriod = 5 * time.Second

// logQueueSize bounds the connection-log entries waiting to be written;
// logQueueKeep is the number of waiting entries that ends a burst's wait
// (logBurstWait), and the most room a quiet stream keeps for them. While
// entries come faster than that (each wait ends full), the writer and the
// queue swap the room they grew, so a busy stream makes none per entry.
const (
	logQueueSize = 4096
	logQueueKeep = 64
)

// logBurstWait is how long the log goroutine, woken by a burst's first
// entry, waits for more before it writes them; logQueueKeep entries
// waiting end the wait sooner, and a stop at once. Each line is a write()
// system call, and on a process that was idle the first system call wakes
// Go's monitor thread (sysmon) from its sleep: two more context switches
// for each line of a quiet stream, on the proxy's CPU. Written in bursts,
// it is once per burst. UDP new flows (a line each) from 1 client, per
// flow: context switches 4.2 -> 2.5, futex calls 1.2 -> 0.08, CPU 159 ->
// 138 µs; make bench, medians of 3 runs: 0.90 -> 0.96 × nginx's rate with
// 1 client, 0.70 -> 0.74 with 8. The storage's LogWriter, fed from the
// same goroutine, waits up to 200 ms for its batches anyway.
const logBurstWait = 20 * time.Millisecond

var pool = caddy.NewUsagePool()

// Acquire returns the shared state of stream id, creating it on first use.
// Every Acquire must be paired with one Release.
func Acquire(id int64) *State {
	v, _, _ := pool.LoadOrNew(key(id), func() (caddy.Destructor, error) {
		return New(id), nil
	})
	return v.(*State)
}

// Release drops one reference to stream id. The last release shuts the
// stream's state down: open connections get the grace period to end, then
// are closed.
func Release(id int64) {
	_, _ = pool.Delete(key(id))
}

func key(id int64) string { return "aegis.stream." + strconv.FormatInt(id, 10) }

// Lookup returns the shared state of stream id while some user holds it
// (Acquire), or nil. It takes no reference: it is for readers of the
// state (the stats), not for its users.
func Lookup(id int64) *State {
	var found *State
	pool.Range(func(_, v any) bool {
		if s, ok := v.(*State); ok && s.ID == id {
			found = s
			return false
		}
		return true
	})
	return found
}

// State is the runtime state of one stream. All counters are safe for
// concurrent use without locks.
type State struct {
	ID int64

	// Active is the number of connections (or UDP sessions) open now.
	Active atomic.Int64
	// Total counts connections accepted since the last reload, blocked ones
	// included.
	Total atomic.Uint64
	// Blocked counts connections refused by the ACL or max_connections
	// since the last reload.
	Blocked atomic.Uint64
	// LogDropped counts connection-log entries lost: the log queue or the
	// storage writer's queue was full, or storage failed to write them.
	LogDropped atomic.Uint64
	// DatagramsDropped counts UDP datagrams of open NAT entries that were
	// dropped (over a rate limit, socket buffer full, upstream gone) since
	// the last reload.
	DatagramsDropped atomic.Uint64
	// DialFailures counts connections whose dial to the upstream failed.
	DialFailures atomic.Uint64
	// UpstreamLoops counts connections (UDP: new clients) refused because
	// the upstream address is one of this process's own stream listeners
	// (loop.go); they are also dial failures.
	UpstreamLoops atomic.Uint64

	// Never reset, for the metrics (metrics.go).
	blockedBy [numBlockReasons]atomic.Uint64
	droppedBy [numDropReasons]atomic.Uint64
	durations [2]prometheus.Histogram // by Kind
	dials     prometheus.Histogram
	// Bytes are counted by each session, and folded into ended when it
	// ends (bytes.go): a relay step writes nothing the stream's other
	// connections write.
	ended     [2]atomic.Uint64 // by direction: bytes of ended sessions
	totalsMu  sync.Mutex       // guards the fields below, for readers only
	carried   Totals           // what ResetTotals took from the since-reload counters
	seenBytes [2]uint64        // the most bytes a reader has seen: never less again
	baseBytes [2]uint64        // the bytes at the last ResetTotals

	listeners [2]atomic.Int32 // by Kind
	health    atomic.Pointer[Health]
	tls       Handshakes
	sources   *Sources     // the per-source table (sources.go)
	attached  attachments  // the UDP relays of its addresses (attach.go)
	grace     atomic.Int64 // nanoseconds

	sessions sync.Map // uint64 → *Session
	conns    sync.WaitGroup

	ctx         context.Context
	cancel      context.CancelFunc
	draining    atomic.Bool   // Destruct waits for Active to reach 0
	idle        chan struct{} // Leave wakes that wait
	closing     atomic.Bool
	closeReason atomic.Uint32

	logq    logQueue
	logStop chan struct{}
	logDone chan struct{}
	// logWait is logBurstWait; a test may set another before the first
	// entry is queued.
	logWait time.Duration
	sink    atomic.Pointer[func(LogRecord) bool]
	// logFields is the writer goroutine's slice of a line's fields.
	logFields []zap.Field
	connLog   atomic.Pointer[zap.Logger]

	upMu sync.Mutex
	// healthRound counts ClearHealth calls; guarded by upMu.
	healthRound uint64
	upstreams   map[string]*Upstream // by host:port (upstreams.go)

	blockedMu       sync.Mutex
	blockedLogged   map[netip.Addr]time.Time // last log of a refused source
	blockedPruned   time.Time                // when blockedLogged was last pruned
	blockedUnlogged atomic.Uint64            // refusals not logged since the last summary
	summaryPending  atomic.Bool              // a summary is due (notLogged)
}

// New makes the state of a stream that is not shared through the pool (a
// handler used in a plain layer4 config without a stream_id). Call Destruct
// when done with it.
func New(id int64) *State {
	ctx, cancel := context.WithCancel(context.Background())
	s := &State{
		ID:      id,
		ctx:     ctx,
		cancel:  cancel,
		idle:    make(chan struct{}, 1),
		logq:    logQueue{wake: make(chan struct{}, 1), full: make(chan struct{}, 1)},
		logStop: make(chan struct{}),
		logDone: make(chan struct{}),
		logWait: logBurstWait,
		sources: NewSources(),
	}
	s.initMetrics()
	s.grace.Store(int64(DefaultGracePeriod))
	go s.writeLogs()
	return s
}

// Sources is the stream's per-source table.
func (s *State) Sources() *Sources { return s.sources }

// Context is cancelled when the stream's state is shut down. Dials and
// waits on behalf of its connections use it.
func (s *State) Context() context.Context { return s.ctx }

// SetGracePeriod sets how long the last Release waits for open connections.
func (s *State) SetGracePeriod(d time.Duration) { s.grace.Store(int64(d)) }

// Kind is a listener's transport.
type Kind int

// Listener kinds.
const (
	TCP Kind = iota
	UDP
)

// ListenerUp and ListenerDown track how many listeners of a kind serve the
// stream; a reload briefly has two.
func (s *State) ListenerUp(k Kind)   { s.listeners[k].Add(1) }
func (s *State) ListenerDown(k Kind) { s.listeners[k].Add(-1) }

// Listening reports whether at least one listener of kind k serves the
// stream.
func (s *State) Listening(k Kind) bool { return s.listeners[k].Load() > 0 }

// ResetTotals zeroes the since-reload counters. Active stays as it is,
// and Cumulative keeps counting from the first load.
func (s *State) ResetTotals() {
	s.totalsMu.Lock()
	s.carried.Connections += s.Total.Swap(0)
	s.baseBytes = s.bytesLocked()
	s.totalsMu.Unlock()
	s.Blocked.Store(0)
	s.DatagramsDropped.Store(0)
}

// Health is the outcome of the last health check.
type Health struct {
	Healthy   bool
	LastError string
	LastCheck time.Time
}

// SetHealth records a health check result.
func (s *State) SetHealth(h Health) { s.health.Store(&h) }

// HealthRound is the number of ClearHealth calls so far: a health check
// takes it as it starts, and records its results with it (RecordHealth).
func (s *State) HealthRound() uint64 {
	s.upMu.Lock()
	defer s.upMu.Unlock()
	return s.healthRound
}

// RecordHealth records the result h of a check of upstream u (nil: the
// stream's own result), unless ClearHealth ran since the check took round
// from HealthRound: a check that ends as checks are turned off would
// otherwise leave its result, which no later check corrects (an upstream
// marked down for good). It reports whether it recorded.
func (s *State) RecordHealth(round uint64, u *Upstream, h Health) bool {
	s.upMu.Lock()
	defer s.upMu.Unlock()
	if round != s.healthRound {
		return false
	}
	if u != nil {
		u.SetHealth(h)
	} else {
		s.SetHealth(h)
	}
	return true
}

// ClearHealth forgets health results (checks were turned off), the
// stream's and its upstreams', and those of checks under way
// (RecordHealth).
func (s *State) ClearHealth() {
	s.upMu.Lock()
	s.healthRound++
	s.health.Store(nil)
	for _, u := range s.upstreams {
		u.health.Store(nil)
	}
	s.upMu.Unlock()
}

// Health returns the last health check result, or nil if none ran.
func (s *State) Health() *Health { return s.health.Load() }

// ConnStarted must be called before a connection's goroutine starts and
// ConnDone when it ends, so shutdown can wait for it.
func (s *State) ConnStarted() { s.conns.Add(1) }

// ConnDone marks the end of a connection's goroutine.
func (s *State) ConnDone() { s.conns.Done() }

// Sessions calls f for each open connection until f returns false.
func (s *State) Sessions(f func(*Session) bool) {
	s.sessions.Range(func(_, v any) bool { return f(v.(*Session)) })
}

// Session returns the open connection with the given id, or nil.
func (s *State) Session(id uint64) *Session {
	v, ok := s.sessions.Load(id)
	if !ok {
		return nil
	}
	return v.(*Session)
}

// CloseAll closes every open connection with the given reason.
func (s *State) CloseAll(r Reason) {
	s.Sessions(func(ss *Session) bool {
		ss.Close(r)
		return true
	})
}

// Disable closes every open connection with r, and every one a handler
// opens from now on (one accepted before its listener closed, still on
// its way to Policy.Open, say waiting for its PROXY header), until
// Enable: its stream was turned off.
func (s *State) Disable(r Reason) {
	s.closeReason.Store(uint32(r))
	s.closing.Store(true)
	s.CloseAll(r)
}

// Enable undoes Disable: its stream serves again.
func (s *State) Enable() { s.closing.Store(false) }

// Destruct shuts the state down: it waits up to the grace period for open
// connections to end, closes the rest, waits for their goroutines and
// flushes the connection log. It implements caddy.Destructor.
func (s *State) Destruct() error {
	reason := ReasonStreamRemoved
	if caddy.Exiting() {
		reason = ReasonShutdown
	}
	// Leave wakes the wait when Active reaches 0: it reads draining after
	// its decrement, as this reads Active after setting draining.
	s.draining.Store(true)
	if s.Active.Load() > 0 {
		grace := time.NewTimer(time.Duration(s.grace.Load()))
	wait:
		for s.Active.Load() > 0 {
			select {
			case <-s.idle:
			case <-grace.C:
				break wait
			}
		}
		grace.Stop()
	}
	s.closeReason.Store(uint32(reason))
	s.closing.Store(true)
	s.destructAttached()
	s.CloseAll(reason)
	s.cancel() // ends dials and rate-limit waits of connections in flight
	s.conns.Wait()
	close(s.logStop)
	<-s.logDone
	return nil
}

// LogRecord is one connection-log entry: a connection (or UDP NAT entry)
// that ended, or one refused before it was relayed.
type LogRecord struct {
	StreamID int64
	// Stream is the stream's name.
	Stream string
	ConnID uint64
	// Source is the client's address.
	Source netip.AddrPort
	// SourceIP is Source's address as text (IPv4-mapped as IPv4): set by
	// the log writer before it hands the record to the sink, so that the
	// line and the stored entry share one string.
	SourceIP string
	UDP      bool
	// Blocked is true for a connection refused by the ACL or a limit.
	Blocked  bool
	Reason   Reason
	Start    time.Time
	Duration time.Duration
	// BytesSent went client→upstream, BytesReceived upstream→client.
	BytesSent, BytesReceived uint64
	// Datagrams each way, for UDP.
	DatagramsSent, DatagramsReceived uint64
	// Upstream is the host:port the connection went to; "" if none was
	// reached.
	Upstream string
}

// Action is "blocked" or "allowed".
func (r *LogRecord) Action() string {
	if r.Blocked {
		return "blocked"
	}
	return "allowed"
}

// logEntry is one connection-log line waiting to be written.
type logEntry struct {
	logger *zap.Logger
	rec    LogRecord
	// notLogged > 0 makes the entry the summary of that many refusals
	// that were not logged (LogBlocked).
	notLogged uint64
}

// SetLogSink makes the log writer also hand every entry to f (nil: none),
// from its own goroutine, never from a relay's. f must not block; it
// returns false when it had to drop the entry, which LogDropped counts.
func (s *State) SetLogSink(f func(LogRecord) bool) {
	if f == nil {
		s.sink.Store(nil)
		return
	}
	s.sink.Store(&f)
}

// SetConnLogger makes the log writer write every connection-log line to l
// (nil: to the logger the entry was queued with, the handler's own), so
// that a stream's TCP and UDP lines, allowed and blocked, come from one
// logger. The line carries the stream's name and ID itself: l must not.
func (s *State) SetConnLogger(l *zap.Logger) { s.connLog.Store(l) }

// stopping reports whether the state is shutting down (logStop closed).
func (s *State) stopping() bool {
	select {
	case <-s.logStop:
		return true
	default:
		return false
	}
}

// writeLogs writes queued connection-log entries off the data path until
// the state is shut down, then flushes what is queued. The queue is never
// closed, so a late entry is dropped instead of panicking.
func (s *State) writeLogs() {
	defer close(s.logDone)
	var batch []logEntry
	var pace logpace.Pacer // lines in slices (see logpace)
	burst := time.NewTimer(time.Hour)
	burst.Stop()
	for {
		stop, full := false, false
		select {
		case <-s.logq.wake:
			stop, full = s.awaitBurst(burst)
		case <-s.logStop:
			stop = true
		}
		if !full && cap(batch) > logQueueKeep {
			batch = nil // quiet: the queue gets no burst's room
		}
		batch = s.logq.take(batch)
		p := &pace
		for i, e := range batch {
			if i > 0 && i%logpace.Slice == 0 {
				if p == &pace && s.stopping() {
					p = logpace.Hurried() // the stream waits for what is left
				}
				p.Pause()
			}
			s.writeLog(e)
		}
		// Done with the batch: it holds no logger. Its room is the
		// queue's next while the burst goes on; once it is over, room
		// grown by it goes, so that a quiet stream holds none.
		clear(batch)
		if !full && cap(batch) > logQueueKeep {
			batch = nil
		}
		if stop {
			return
		}
	}
}

// awaitBurst waits for the rest of a burst of entries (logBurstWait) with
// the writer's timer, and reports whether the state stops meanwhile, or
// logQueueKeep entries came before the wait was over (full).
func (s *State) awaitBurst(t *time.Timer) (stop, full bool) {
	t.Reset(s.logWait)
	defer t.Stop()
	select {
	case <-s.logq.full:
		full = true
	case <-t.C:
	case <-s.logStop:
		stop = true
	}
	return stop, full
}

func (s *State) writeLog(e logEntry) {
	r := &e.rec
	if e.notLogged > 0 {
		logger := e.logger
		if l := s.connLog.Load(); l != nil {
			logger = l
		}
		logger.Warn("blocked connections not logged",
			zap.String("stream", r.Stream), zap.Int64("stream_id", s.ID), zap.Uint64("not_logged", e.notLogged),
			zap.String("why", fmt.Sprintf("more than %d refused sources in a minute, and more than %d refusals logged in a second over every stream", MaxBlockedSources, BlockedLinesPerSecond)))
		return
	}
	proto := "tcp"
	if r.UDP {
		proto = "udp"
	}
	r.SourceIP = r.Source.Addr().Unmap().String()
	// The writer's goroutine alone writes lines: one slice of fields
	// serves them all (zap's cores encode the fields before Write returns).
	fields := append(s.logFields[:0],
		zap.String("stream", r.Stream),
		zap.Int64("stream_id", s.ID),
		zap.String("protocol", proto),
		zap.Uint64("conn_id", r.ConnID),
		zap.String("source_ip", r.SourceIP),
		zap.Uint64("bytes_sent", r.BytesSent),
		zap.Uint64("bytes_received", r.BytesReceived),
		zap.Int64("duration_ms", r.Duration.Milliseconds()),
		zap.String("action", r.Action()),
		zap.String("disconnect_reason", r.Reason.String()))
	if r.Upstream != "" {
		fields = append(fields, zap.String("upstream", r.Upstream))
	}
	if r.UDP && !r.Blocked {
		fields = append(fields, zap.Uint64("datagrams_sent", r.DatagramsSent), zap.Uint64("datagrams_received", r.DatagramsReceived))
	}
	logger := e.logger
	if l := s.connLog.Load(); l != nil {
		logger = l
	}
	logger.Info("connection", fields...)
	clear(fields) // holds no string of this entry until the next
	s.logFields = fields
	if f := s.sink.Load(); f != nil && !(*f)(e.rec) {
		s.LogDropped.Add(1)
	}
}

// enqueueLog queues a log entry without ever blocking; a full queue drops
// it and counts it in LogDropped.
func (s *State) enqueueLog(e logEntry) {
	if !s.logq.push(e) {
		s.LogDropped.Add(1)
	}
}

// logQueue holds the log entries waiting for the stream's log goroutine,
// at most logQueueSize. Its memory grows with a burst and is given back
// after it, so an idle stream holds none: a buffered channel of that size
// would hold 576 KiB per stream for good.
type logQueue struct {
	mu      sync.Mutex
	entries []logEntry
	wake    chan struct{} // capacity 1: entries are waiting
	full    chan struct{} // capacity 1: logQueueKeep entries are waiting
}

// push adds e, or reports false when the queue is full.
func (q *logQueue) push(e logEntry) bool {
	q.mu.Lock()
	if len(q.entries) >= logQueueSize {
		q.mu.Unlock()
		return false
	}
	q.entries = append(q.entries, e)
	n := len(q.entries)
	q.mu.Unlock()
	signal(q.wake)
	if n == logQueueKeep {
		signal(q.full)
	}
	return true
}

// signal puts a token in c, a channel of capacity 1, unless one is there.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// take returns the waiting entries and leaves the queue empty, with
// spare (an earlier batch, done with and cleared) as its storage.
func (q *logQueue) take(spare []logEntry) []logEntry {
	q.mu.Lock()
	out := q.entries
	q.entries = spare[:0]
	select {
	case <-q.full: // about the entries taken
	default:
	}
	q.mu.Unlock()
	return out
}

// BlockedLogEvery is how often refused attempts of one source are logged at
// most, so that a flood cannot flood the log.
const BlockedLogEvery = time.Minute

// MaxBlockedSources bounds the sources a stream remembers for
// BlockedLogEvery: up to this many refused sources in a minute, each is
// logged once a minute. Past it, a new source's refusal is logged only
// within the process-wide BlockedLinesPerSecond, and the rest are counted
// in a "blocked connections not logged" line every BlockedSummaryEvery.
const MaxBlockedSources = 4096

// BlockedLinesPerSecond caps, over every stream, the refusals logged per
// second for sources past MaxBlockedSources: a flood from forged
// addresses cannot fill a disk through the log.
const BlockedLinesPerSecond = 100

// BlockedSummaryEvery is how often a stream logs how many refusals it did
// not log, while there are any.
const BlockedSummaryEvery = 5 * time.Second

// blockedLines is the process-wide budget of BlockedLinesPerSecond: the
// second it counts (unix seconds) and the lines logged in it.
var blockedLines struct {
	second atomic.Int64
	n      atomic.Int64
}

// takeBlockedLine reports whether one more refusal may be logged in this
// second under BlockedLinesPerSecond.
func takeBlockedLine(now time.Time) bool {
	sec := now.Unix()
	if old := blockedLines.second.Load(); old != sec && blockedLines.second.CompareAndSwap(old, sec) {
		blockedLines.n.Store(0)
	}
	return blockedLines.n.Add(1) <= BlockedLinesPerSecond
}

// LogBlocked queues the log entry of a connection (or, with udp, a new
// client's datagram) refused before it was relayed, unless the same source
// was logged within BlockedLogEvery, or (past MaxBlockedSources) the
// process logged BlockedLinesPerSecond this second: then it is counted,
// and the count logged every BlockedSummaryEvery.
func (s *State) LogBlocked(logger *zap.Logger, stream string, source netip.AddrPort, r Reason, udp bool) {
	ip := source.Addr().Unmap()
	now := time.Now()
	s.blockedMu.Lock()
	if last, ok := s.blockedLogged[ip]; ok && now.Sub(last) < BlockedLogEvery {
		s.blockedMu.Unlock()
		return
	}
	if len(s.blockedLogged) >= MaxBlockedSources && now.Sub(s.blockedPruned) >= time.Second {
		// At most once a second: a flood past the bound would otherwise
		// scan the whole map on each refusal.
		s.blockedPruned = now
		for a, t := range s.blockedLogged {
			if now.Sub(t) >= BlockedLogEvery {
				delete(s.blockedLogged, a)
			}
		}
	}
	if s.blockedLogged == nil {
		s.blockedLogged = map[netip.Addr]time.Time{}
	}
	_, known := s.blockedLogged[ip]
	if !known && len(s.blockedLogged) >= MaxBlockedSources {
		s.blockedMu.Unlock()
		if !takeBlockedLine(now) {
			s.notLogged(logger, stream)
			return
		}
	} else {
		s.blockedLogged[ip] = now
		s.blockedMu.Unlock()
	}
	s.enqueueLog(logEntry{logger: logger, rec: LogRecord{
		StreamID: s.ID, Stream: stream, Source: source, Blocked: true, Reason: r, UDP: udp, Start: now,
	}})
}

// notLogged counts a refusal that was not logged, and makes sure that a
// summary line goes out within BlockedSummaryEvery.
func (s *State) notLogged(logger *zap.Logger, stream string) {
	s.blockedUnlogged.Add(1)
	if !s.summaryPending.CompareAndSwap(false, true) {
		return
	}
	time.AfterFunc(BlockedSummaryEvery, func() {
		s.summaryPending.Store(false)
		if n := s.blockedUnlogged.Swap(0); n > 0 {
			s.enqueueLog(logEntry{logger: logger, notLogged: n, rec: LogRecord{StreamID: s.ID, Stream: stream}})
		}
	})
}
