package admin_test

import (
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// historyJSON is GET history's answer.
type historyJSON struct {
	StreamID    int64       `json:"stream_id"`
	StepSeconds int         `json:"step_seconds"`
	Points      []pointJSON `json:"points"`
	Nodes       []struct {
		Node   string      `json:"node"`
		Points []pointJSON `json:"points"`
	} `json:"nodes"`
}

type pointJSON struct {
	Time                time.Time `json:"time"`
	BytesSentPerSec     float64   `json:"bytes_sent_per_sec"`
	BytesReceivedPerSec float64   `json:"bytes_received_per_sec"`
	ConnectionsPerSec   float64   `json:"connections_per_sec"`
	ActiveConnections   int64     `json:"active_connections"`
	BlockedPerSec       float64   `json:"blocked_per_sec"`
	DialFailuresPerSec  float64   `json:"dial_failures_per_sec"`
	Healthy             *bool     `json:"healthy"`
}

func (inst *instance) history(sid int64, query string) historyJSON {
	inst.t.Helper()
	var h historyJSON
	inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/history%s", sid, query), nil).want(inst.t, http.StatusOK).decode(inst.t, &h)
	if h.Points == nil {
		inst.t.Fatalf("history%s: points is not an array", query)
	}
	return h
}

// statsOf is stream sid's row of GET stats.
func (inst *instance) statsOf(sid int64) obj {
	inst.t.Helper()
	for _, s := range inst.call("GET", "/api/v1/streams/stats", nil).want(inst.t, http.StatusOK).list(inst.t) {
		if id(s) == sid {
			return s
		}
	}
	inst.t.Fatalf("stream %d has no stats", sid)
	return nil
}

// historyBase is a time to take samples at: on a minute, ahead of the
// sampling loop's own samples (which then add none: a sample's time must
// be after the newest), and within the default hour of GET history.
func historyBase() time.Time { return time.Now().Add(2 * time.Minute).Truncate(time.Minute) }

func near(a, b float64) bool { return math.Abs(a-b) < 0.01 }

// TestStreamHistory sends traffic through a stream between two samples
// and reads the rates back; aggregates them to a minute; keeps the
// history through an API edit and gives it back when the stream is
// deleted.
func TestStreamHistory(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	created := inst.create(stream(0, port, up.Port, nil))
	sid := id(created)
	base := historyBase()
	since := "?since=" + url.QueryEscape(base.Add(-time.Second).Format(time.RFC3339))

	streams.SampleHistory(base)
	// 3 connections of 100 bytes each way that end, and one left open.
	msg := strings.Repeat("x", 100)
	for range 3 {
		c := dial(t, port)
		roundTrip(t, c, msg)
		c.Close()
	}
	open := dial(t, port)
	defer open.Close()
	eventually(t, "the stream counts 4 connections, 1 open, 300 bytes each way", func() bool {
		s := inst.statsOf(sid)
		return s["total_connections"] == 4.0 && s["active_connections"] == 1.0 && s["bytes_sent"] == 300.0 && s["bytes_received"] == 300.0
	})
	streams.SampleHistory(base.Add(10 * time.Second))

	h := inst.history(sid, since)
	if h.StreamID != sid || h.StepSeconds != 10 || len(h.Points) != 2 || h.Nodes != nil {
		t.Fatalf("history: %+v", h)
	}
	// A since past the samples' clock (uint32 seconds: 2106 on) is after
	// every sample; it does not wrap round to 1973 and give them all.
	if late := inst.history(sid, "?since=2110-01-01T00:00:00Z"); len(late.Points) != 0 {
		t.Errorf("history since 2110: %d points, want none", len(late.Points))
	}
	p := h.Points[1]
	if !p.Time.Equal(base.Add(10*time.Second)) || !near(p.BytesSentPerSec, 30) || !near(p.BytesReceivedPerSec, 30) ||
		!near(p.ConnectionsPerSec, 0.4) || p.ActiveConnections != 1 || p.BlockedPerSec != 0 || p.DialFailuresPerSec != 0 || p.Healthy != nil {
		t.Fatalf("the step with traffic: %+v", p)
	}
	if !h.Points[0].Time.Equal(base) {
		t.Fatalf("the first point's time %v, want %v", h.Points[0].Time, base)
	}
	if raw := string(inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/history%s", sid, since), nil).body); !strings.Contains(raw, `"healthy":null`) ||
		!strings.Contains(raw, `"time":"`+base.UTC().Format("2006-01-02T15:04:05.000Z")+`"`) {
		t.Fatalf("history's JSON: %s", raw)
	}

	// An edit through the API keeps the history; the samples go on.
	created["notes"] = "edited"
	delete(created, "id")
	for _, k := range []string{"created_at", "updated_at", "version", "status", "source"} {
		delete(created, k)
	}
	inst.call("PUT", fmt.Sprintf("/api/v1/streams/%d", sid), created).want(t, http.StatusOK)
	// And so does a reload of the config.
	if err := inst.load(streamsApp(), nil); err != nil {
		t.Fatal(err)
	}
	for i := 2; i <= 6; i++ {
		streams.SampleHistory(base.Add(time.Duration(i) * 10 * time.Second))
	}
	h = inst.history(sid, since)
	if len(h.Points) != 7 {
		t.Fatalf("after the edit: %d points, want 7: %+v", len(h.Points), h.Points)
	}
	// A minute: the 6 samples that end by base+60s, averaged; the open
	// connection is the most.
	m := inst.history(sid, since+"&step=60")
	if m.StepSeconds != 60 || len(m.Points) != 2 || !m.Points[1].Time.Equal(base.Add(time.Minute)) {
		t.Fatalf("step 60: %+v", m)
	}
	if p := m.Points[1]; !near(p.BytesSentPerSec, 5) || !near(p.ConnectionsPerSec, 0.4/6) || p.ActiveConnections != 1 {
		t.Fatalf("step 60's minute: %+v", p)
	}
	// The default since, an hour ago, holds them too.
	if d := inst.history(sid, ""); len(d.Points) < 7 {
		t.Fatalf("default since: %d points", len(d.Points))
	}

	// Validation.
	for _, q := range []struct{ query, field, says string }{
		{"?step=30", "step", "must be one of 10, 60, 300, 900"},
		{"?step=x", "step", "must be one of"},
		{"?since=yesterday", "since", "RFC 3339"},
		{"?since=2026-12-06T15:00:00Z&since=2026-12-06T15:00:00Z", "since", "once"},
		{"?from=1", "from", "the parameters are: since, step"},
	} {
		e := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/history%s", sid, q.query), nil).apiErr(t, http.StatusBadRequest)
		if e.Field != q.field || !strings.Contains(e.Error, q.says) {
			t.Errorf("%s: field %q, %q; want %q saying %q", q.query, e.Field, e.Error, q.field, q.says)
		}
	}
	inst.call("GET", "/api/v1/streams/999/history", nil).apiErr(t, http.StatusNotFound)

	// Deleting the stream gives its history back.
	if !streams.HasHistory(sid) {
		t.Fatal("no history before the delete")
	}
	open.Close()
	inst.call("DELETE", fmt.Sprintf("/api/v1/streams/%d", sid), nil).want(t, http.StatusNoContent)
	if streams.HasHistory(sid) {
		t.Fatal("the deleted stream's history is kept")
	}
	inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/history", sid), nil).apiErr(t, http.StatusNotFound)
}

// TestStreamHistoryHealth samples a stream with health checks while its
// upstream is up, then down: healthy is true, then false, and a step over
// both is false.
func TestStreamHistoryHealth(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, freePort(t), up.Port, obj{"health_check_enabled": true, "health_check_interval_seconds": 1})))
	base := historyBase()
	health := func(want string) {
		t.Helper()
		eventually(t, "health_status "+want, func() bool { return inst.statsOf(sid)["health_status"] == want })
	}
	health("healthy")
	streams.SampleHistory(base.Add(10 * time.Second))
	up.Close(5 * time.Second)
	health("unhealthy")
	streams.SampleHistory(base.Add(20 * time.Second))
	since := "?since=" + url.QueryEscape(base.Format(time.RFC3339))
	h := inst.history(sid, since)
	if len(h.Points) != 2 || h.Points[0].Healthy == nil || !*h.Points[0].Healthy || h.Points[1].Healthy == nil || *h.Points[1].Healthy {
		t.Fatalf("points: %+v", h.Points)
	}
	m := inst.history(sid, since+"&step=60")
	if len(m.Points) != 1 || m.Points[0].Healthy == nil || *m.Points[0].Healthy {
		t.Fatalf("step 60: %+v", m.Points)
	}
}

// TestStreamHistoryBlockedAcrossReload blocks connections before and after
// a reload, which zeroes the stream's since-reload blocked_connections:
// each step's blocked rate is its own refusals, whether fewer or more than
// before the reload (never an underflow, never the ones before it).
func TestStreamHistoryBlockedAcrossReload(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"blacklist_cidrs": []string{"127.0.0.1"}})))
	base := historyBase()
	block := func(n int, total float64) {
		t.Helper()
		for range n {
			c := dial(t, port)
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.Read(make([]byte, 1))
			c.Close()
		}
		eventually(t, fmt.Sprintf("blocked_connections %v", total), func() bool { return inst.statsOf(sid)["blocked_connections"] == total })
	}
	streams.SampleHistory(base)
	block(2, 2)
	streams.SampleHistory(base.Add(10 * time.Second))
	if err := inst.load(streamsApp(), nil); err != nil {
		t.Fatal(err)
	}
	block(3, 3) // more than before the reload
	streams.SampleHistory(base.Add(20 * time.Second))
	if err := inst.load(streamsApp(), nil); err != nil {
		t.Fatal(err)
	}
	block(1, 1) // fewer
	streams.SampleHistory(base.Add(30 * time.Second))
	h := inst.history(sid, "?since="+url.QueryEscape(base.Add(-time.Second).Format(time.RFC3339)))
	if len(h.Points) != 4 {
		t.Fatalf("%d points, want 4: %+v", len(h.Points), h.Points)
	}
	for i, want := range []float64{0.2, 0.3, 0.1} {
		if got := h.Points[i+1].BlockedPerSec; !near(got, want) {
			t.Errorf("step %d: blocked_per_sec %v, want %v", i+1, got, want)
		}
	}
}

// TestStreamHistoryGoneWithTheApp stops the streams app (a config
// without it): the histories are given back, so that a stream of the
// same id in a later config (another database) starts with none.
func TestStreamHistoryGoneWithTheApp(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, freePort(t), up.Port, nil)))
	streams.SampleHistory(historyBase())
	if !streams.HasHistory(sid) {
		t.Fatal("no history after a sample")
	}
	if err := inst.load(nil, nil); err != nil {
		t.Fatal(err)
	}
	if n := streams.HistoryStreams(); n != 0 {
		t.Fatalf("%d streams' histories kept after the app stopped", n)
	}
}
