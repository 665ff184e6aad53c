package streams

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// Each stream's history: a 10 s sample of its counters, the last 24 hours
// of them in memory. One ticker for the process (historyLoop, started by
// the first App to start and stopped with the last) reads the counters
// streamstate.State keeps anyway (no write per connection or packet) and
// appends a sample per stream to its ring in history, which is keyed by
// stream id beside the runtime state, so it outlives reloads and API
// edits; a stream's ring goes when the stream does (removeInstance, and
// at the next tick for streams a reload dropped). On a cluster, each tick
// also writes the new samples to PostgreSQL (stream_history), which is
// where GET history reads the nodes' samples from.

const (
	// HistoryStep is the time between two samples.
	HistoryStep = 10 * time.Second
	// HistorySamples is the most samples a stream keeps: 24 hours.
	HistorySamples = int(24 * time.Hour / HistoryStep)
	// historyWriteTimeout bounds a tick's write to PostgreSQL.
	historyWriteTimeout = 5 * time.Second
	// historyBacklog is the most samples per stream a tick writes to
	// PostgreSQL after the database was unreachable: the last hour.
	historyBacklog = 360
)

// sample is one stream's 10 s: rates per second over the step that ends
// at t, and the state at t. 32 bytes.
type sample struct {
	t                                   uint32 // Unix seconds, a multiple of 10
	sent, received, conns, blocked, dfs float32
	active                              uint32
	health                              uint8 // healthNone, healthUp, healthDown
}

const (
	healthNone = iota
	healthUp
	healthDown
)

// counters are the cumulative counters a sample is the difference of.
type counters struct {
	sent, received, conns, blocked, dfs uint64
}

// streamHistory is one stream's ring of samples.
type streamHistory struct {
	buf   []sample // oldest at start once full
	start int
	last  counters // at the newest sample
	// written is the time of the newest sample stored in PostgreSQL.
	written uint32
}

// add appends s, overwriting the oldest once HistorySamples are kept.
// The ring grows with the samples, so a young stream holds little.
func (h *streamHistory) add(s sample) {
	if len(h.buf) < HistorySamples {
		if len(h.buf) == cap(h.buf) {
			nb := make([]sample, len(h.buf), min(max(2*cap(h.buf), 64), HistorySamples))
			copy(nb, h.buf)
			h.buf = nb
		}
		h.buf = append(h.buf, s)
		return
	}
	h.buf[h.start] = s
	h.start = (h.start + 1) % len(h.buf)
}

// newest is the newest sample, if any.
func (h *streamHistory) newest() (sample, bool) {
	if len(h.buf) == 0 {
		return sample{}, false
	}
	return h.buf[(h.start+len(h.buf)-1)%len(h.buf)], true
}

// each calls f for each sample after since (Unix seconds), oldest first.
// It finds the first from the newest back, so a tick's few new samples
// cost no walk over the whole ring.
func (h *streamHistory) each(since uint32, f func(sample)) {
	n := len(h.buf)
	k := 0 // the samples after since: the newest k
	for k < n && h.buf[(h.start+n-1-k)%n].t > since {
		k++
	}
	for i := n - k; i < n; i++ {
		f(h.buf[(h.start+i)%n])
	}
}

// historyBook is every stream's history, by stream id.
type historyBook struct {
	mu      sync.Mutex
	streams map[int64]*streamHistory
	// users counts the started apps; the first starts the loop, the last
	// stops it.
	users int
	stop  context.CancelFunc // ends the loop and cancels its write
	done  chan struct{}
}

var history = historyBook{streams: map[int64]*streamHistory{}}

// startHistory starts the sampling loop if no app has.
func startHistory() {
	history.mu.Lock()
	defer history.mu.Unlock()
	history.users++
	if history.users == 1 {
		ctx, stop := context.WithCancel(context.Background())
		history.stop, history.done = stop, make(chan struct{})
		go historyLoop(ctx, history.done)
	}
}

// stopHistory stops the loop when the last app stops, and drops every
// stream's history.
func stopHistory() {
	history.mu.Lock()
	history.users--
	if history.users > 0 {
		history.mu.Unlock()
		return
	}
	stop, done := history.stop, history.done
	history.stop, history.done = nil, nil
	history.mu.Unlock()
	if stop != nil {
		stop()
		<-done
	}
	// No app runs: give the histories back, lest a stream of the same id
	// in a later config (another database) carry this one's.
	history.mu.Lock()
	if history.users == 0 {
		history.streams = map[int64]*streamHistory{}
	}
	history.mu.Unlock()
}

// historyLoop samples every HistoryStep, on the step's boundaries, until
// ctx ends (which cancels a write to the database under way: the last
// app's Stop does not wait for a database that does not answer).
func historyLoop(ctx context.Context, done chan struct{}) {
	defer close(done)
	wait := time.Until(time.Now().Truncate(HistoryStep).Add(HistoryStep))
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-timer.C:
			sampleHistory(ctx, now)
			timer.Reset(time.Until(time.Now().Truncate(HistoryStep).Add(HistoryStep)))
		}
	}
}

// forgetHistory drops stream id's history.
func forgetHistory(id int64) {
	history.mu.Lock()
	delete(history.streams, id)
	history.mu.Unlock()
}

// HistoryStreams is the number of streams that have a history: for tests
// and tools, to see that a deleted stream's was given back.
func HistoryStreams() int {
	history.mu.Lock()
	defer history.mu.Unlock()
	return len(history.streams)
}

// HasHistory reports whether stream id has a history.
func HasHistory(id int64) bool {
	history.mu.Lock()
	defer history.mu.Unlock()
	return history.streams[id] != nil
}

// SampleHistory takes the running app's streams' samples for the step that
// ends at now (rounded to HistoryStep), drops the history of streams the
// app no longer has, and on a cluster writes the new samples to the
// database. The sampling loop calls it every HistoryStep; tests call it to
// take a sample without waiting. A now not after the newest sample's step
// takes none (the next one covers the time since).
func SampleHistory(now time.Time) { sampleHistory(context.Background(), now) }

// sampleHistory is SampleHistory, its write to the database done in ctx.
func sampleHistory(ctx context.Context, now time.Time) {
	a := Running()
	if a == nil {
		return
	}
	t := uint32(now.Round(HistoryStep).Unix())
	type read struct {
		id     int64
		c      counters
		active int64
		health uint8
	}
	a.mu.Lock()
	reads := make([]read, 0, len(a.streams))
	for _, inst := range a.streams {
		st := inst.state
		cum := st.Cumulative()
		r := read{id: inst.cfg.ID, active: st.Active.Load(),
			c: counters{sent: cum.BytesSent, received: cum.BytesReceived, conns: cum.Connections,
				blocked: blockedSinceCreated(st), dfs: st.DialFailures.Load()}}
		// As StatusOf: only an enabled stream with TCP health checks has a
		// health, once a check ran.
		if s := inst.cfg; s.HealthCheckEnabled && s.Enabled && s.HasTCP() {
			if h := st.Health(); h != nil {
				r.health = healthDown
				if h.Healthy {
					r.health = healthUp
				}
			}
		}
		reads = append(reads, r)
	}
	store := a.store
	a.mu.Unlock()

	var pending []storage.HistorySample
	cluster := store != nil && store.cluster != nil
	history.mu.Lock()
	seen := make(map[int64]bool, len(reads))
	for _, r := range reads {
		seen[r.id] = true
		h := history.streams[r.id]
		if h == nil {
			h = &streamHistory{}
			history.streams[r.id] = h
		}
		elapsed := float32(HistoryStep.Seconds())
		if last, ok := h.newest(); ok {
			if t <= last.t {
				continue
			}
			elapsed = float32(t - last.t)
		}
		rate := func(cur, prev uint64) float32 {
			if cur < prev { // not after a reload: every counter read here is never reset
				prev = 0
			}
			return float32(cur-prev) / elapsed
		}
		h.add(sample{t: t,
			sent: rate(r.c.sent, h.last.sent), received: rate(r.c.received, h.last.received),
			conns: rate(r.c.conns, h.last.conns), blocked: rate(r.c.blocked, h.last.blocked),
			dfs: rate(r.c.dfs, h.last.dfs), active: uint32(min(max(r.active, 0), math.MaxUint32)),
			health: r.health})
		h.last = r.c
		if cluster {
			from := h.written
			if n := len(h.buf); n > historyBacklog {
				from = max(from, h.buf[(h.start+n-historyBacklog-1)%n].t)
			}
			h.each(from, func(s sample) { pending = append(pending, s.stored(r.id)) })
		}
	}
	for id := range history.streams {
		if !seen[id] {
			delete(history.streams, id)
		}
	}
	history.mu.Unlock()

	if len(pending) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, historyWriteTimeout)
	defer cancel()
	if err := store.cluster.AppendHistory(ctx, pending); err != nil {
		a.logger.Debug("stream history not written to the database; the next sample tries again", zap.Error(err))
		return
	}
	history.mu.Lock()
	for _, s := range pending {
		if h := history.streams[s.StreamID]; h != nil {
			h.written = max(h.written, uint32(s.Time.Unix()))
		}
	}
	history.mu.Unlock()
}

// blockReasons are streamstate's block reasons, listed once.
var blockReasons = streamstate.BlockReasons()

// blockedSinceCreated is st's refusals since it was created: the sum of
// BlockedBy, which, unlike Blocked, a reload does not zero (a rate from
// Blocked would miss the refusals before a reload, or, when there were
// fewer after it, count only those since the reload).
func blockedSinceCreated(st *streamstate.State) uint64 {
	var n uint64
	for _, r := range blockReasons {
		n += st.BlockedBy(r)
	}
	return n
}

// stored is s as the database keeps it.
func (s sample) stored(id int64) storage.HistorySample {
	out := storage.HistorySample{StreamID: id, Time: time.Unix(int64(s.t), 0).UTC(),
		BytesSent: f64(s.sent), BytesReceived: f64(s.received), Connections: f64(s.conns),
		Blocked: f64(s.blocked), DialFailures: f64(s.dfs), Active: int64(s.active)}
	if s.health != healthNone {
		up := s.health == healthUp
		out.Healthy = &up
	}
	return out
}

// f64 is f as the float64 of its shortest decimal form: a rate of 0.1
// kept as float32 is 0.1, not 0.10000000149011612.
func f64(f float32) float64 {
	v, _ := strconv.ParseFloat(strconv.FormatFloat(float64(f), 'g', -1, 32), 64)
	return v
}

// HistoryPoint is one step of a stream's history: rates per second
// averaged over the step that ends at Time, the most connections open at
// once at a sample, and whether every sample found it healthy (null
// without health checks).
type HistoryPoint struct {
	Time                jsontime.Time `json:"time"`
	BytesSentPerSec     float64       `json:"bytes_sent_per_sec"`
	BytesReceivedPerSec float64       `json:"bytes_received_per_sec"`
	ConnectionsPerSec   float64       `json:"connections_per_sec"`
	ActiveConnections   int64         `json:"active_connections"`
	BlockedPerSec       float64       `json:"blocked_per_sec"`
	DialFailuresPerSec  float64       `json:"dial_failures_per_sec"`
	Healthy             *bool         `json:"healthy"`
}

// NodeHistory is one node's points of a stream.
type NodeHistory struct {
	Node   string         `json:"node"`
	Points []HistoryPoint `json:"points"`
}

// History is the answer of GET /api/v1/streams/{id}/history.
type History struct {
	StreamID    int64          `json:"stream_id"`
	StepSeconds int            `json:"step_seconds"`
	Points      []HistoryPoint `json:"points"`
	// Nodes are each node's points, on a cluster; Points are their sum.
	Nodes []NodeHistory `json:"nodes,omitempty"`
}

// HistorySteps are the steps, in seconds, History aggregates to.
var HistorySteps = []int{10, 60, 300, 900}

// History returns stream id's samples after since, aggregated to steps of
// step seconds (one of HistorySteps): on a cluster, each node's from the
// database and their sum; else this node's from memory.
func (a *App) History(ctx context.Context, id int64, since time.Time, step int) (History, error) {
	a.mu.Lock()
	inst, store := a.find(id), a.store
	a.mu.Unlock()
	if inst == nil {
		return History{}, fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	}
	out := History{StreamID: id, StepSeconds: step}
	if store != nil && store.cluster != nil {
		nodes, err := store.cluster.History(ctx, id, since)
		if err == nil {
			var all [][]HistoryPoint
			out.Nodes = []NodeHistory{}
			for _, n := range nodes {
				pts := aggregate(n.Samples, step)
				out.Nodes = append(out.Nodes, NodeHistory{Node: n.Node, Points: pts})
				all = append(all, pts)
			}
			out.Points = sumPoints(all)
			return out, nil
		}
		// The database is unreachable: this node's own samples.
		a.logger.Debug("stream history: the database is unreachable, answering with this node's samples", zap.Error(err))
	}
	var samples []storage.HistorySample
	history.mu.Lock()
	if h := history.streams[id]; h != nil {
		// Samples' times are uint32 seconds: a since past their range
		// (year 2106 on) is after every sample, not a wrapped early time.
		s0 := uint32(min(max(since.Unix(), 0), math.MaxUint32))
		samples = make([]storage.HistorySample, 0, len(h.buf))
		h.each(s0, func(s sample) { samples = append(samples, s.stored(id)) })
	}
	history.mu.Unlock()
	out.Points = aggregate(samples, step)
	return out, nil
}

// aggregate turns samples (oldest first) into points of step seconds,
// each at the end of its step: rates averaged, active connections the
// most, healthy false if any sample was unhealthy.
func aggregate(samples []storage.HistorySample, step int) []HistoryPoint {
	out := []HistoryPoint{}
	n := 0
	for _, s := range samples {
		sec := s.Time.Unix()
		end := (sec + int64(step) - 1) / int64(step) * int64(step)
		if len(out) == 0 || out[len(out)-1].Time.Unix() != end {
			if len(out) > 0 {
				average(&out[len(out)-1], n)
			}
			out = append(out, HistoryPoint{Time: jsontime.Of(time.Unix(end, 0).UTC())})
			n = 0
		}
		p := &out[len(out)-1]
		n++
		p.BytesSentPerSec += s.BytesSent
		p.BytesReceivedPerSec += s.BytesReceived
		p.ConnectionsPerSec += s.Connections
		p.BlockedPerSec += s.Blocked
		p.DialFailuresPerSec += s.DialFailures
		p.ActiveConnections = max(p.ActiveConnections, s.Active)
		p.Healthy = andHealthy(p.Healthy, s.Healthy)
	}
	if len(out) > 0 {
		average(&out[len(out)-1], n)
	}
	return out
}

// average divides p's sums of n samples' rates by n.
func average(p *HistoryPoint, n int) {
	if n <= 1 {
		return
	}
	f := float64(n)
	p.BytesSentPerSec /= f
	p.BytesReceivedPerSec /= f
	p.ConnectionsPerSec /= f
	p.BlockedPerSec /= f
	p.DialFailuresPerSec /= f
}

// andHealthy is healthy when both are (a nil, no checks, counts as
// neither): nil only when both are nil.
func andHealthy(a, b *bool) *bool {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	}
	v := *a && *b
	return &v
}

// sumPoints adds the nodes' points of the same time, in time order.
func sumPoints(nodes [][]HistoryPoint) []HistoryPoint {
	byTime := map[int64]*HistoryPoint{}
	var times []int64
	for _, pts := range nodes {
		for _, p := range pts {
			sec := p.Time.Unix()
			q := byTime[sec]
			if q == nil {
				q = &HistoryPoint{Time: p.Time}
				byTime[sec] = q
				times = append(times, sec)
			}
			q.BytesSentPerSec += p.BytesSentPerSec
			q.BytesReceivedPerSec += p.BytesReceivedPerSec
			q.ConnectionsPerSec += p.ConnectionsPerSec
			q.ActiveConnections += p.ActiveConnections
			q.BlockedPerSec += p.BlockedPerSec
			q.DialFailuresPerSec += p.DialFailuresPerSec
			q.Healthy = andHealthy(q.Healthy, p.Healthy)
		}
	}
	slices.Sort(times)
	out := make([]HistoryPoint, 0, len(times))
	for _, sec := range times {
		out = append(out, *byTime[sec])
	}
	return out
}

// AuditLog returns the audit trail, newest first, as q pages and filters
// it; ErrNoStorage without storage.
func (a *App) AuditLog(ctx context.Context, q storage.AuditQuery) ([]storage.AuditEntry, error) {
	store := a.storage()
	if store == nil {
		return nil, spec.ErrNoStorage
	}
	out, err := store.db.AuditLog(ctx, q)
	if err != nil {
		return nil, storeError(err)
	}
	return out, nil
}
