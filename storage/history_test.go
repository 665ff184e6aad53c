package storage

import (
	"context"
	"testing"
	"time"
)

// TestStreamHistory stores two nodes' samples of a stream in PostgreSQL
// and reads them back per node, oldest first; a write prunes the samples
// older than HistoryRetention, and a sample stored twice is kept once.
func TestStreamHistory(t *testing.T) {
	b := backends[1]
	db := b.newDB(t)
	na := b.openAs(t, db, nil, "a").(*Postgres)
	nb := b.openAs(t, db, nil, "b").(*Postgres)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(10 * time.Second)
	yes, no := true, false
	old := HistorySample{StreamID: 1, Time: now.Add(-HistoryRetention - time.Minute), BytesSent: 1}
	if err := na.AppendHistory(ctx, []HistorySample{old}); err != nil {
		t.Fatal(err)
	}
	a := []HistorySample{
		{StreamID: 1, Time: now.Add(-20 * time.Second), BytesSent: 1.5, BytesReceived: 2, Connections: 0.1, Active: 3, Blocked: 0.2, DialFailures: 0.3, Healthy: &yes},
		{StreamID: 1, Time: now.Add(-10 * time.Second), BytesSent: 4, Active: 1, Healthy: &no},
		{StreamID: 2, Time: now.Add(-10 * time.Second), BytesSent: 9},
	}
	if err := na.AppendHistory(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := na.AppendHistory(ctx, a[1:2]); err != nil {
		t.Fatal(err)
	}
	if err := nb.AppendHistory(ctx, []HistorySample{{StreamID: 1, Time: now.Add(-10 * time.Second), BytesSent: 7}}); err != nil {
		t.Fatal(err)
	}
	got, err := nb.History(ctx, 1, now.Add(-25*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Node != "a" || got[1].Node != "b" {
		t.Fatalf("nodes: %+v", got)
	}
	if len(got[0].Samples) != 2 || len(got[1].Samples) != 1 {
		t.Fatalf("samples: %+v", got)
	}
	s := got[0].Samples[0]
	if !s.Time.Equal(a[0].Time) || s.BytesSent != 1.5 || s.BytesReceived != 2 || s.Connections != 0.1 || s.Active != 3 ||
		s.Blocked != 0.2 || s.DialFailures != 0.3 || s.Healthy == nil || !*s.Healthy {
		t.Errorf("sample: %+v", s)
	}
	if h := got[0].Samples[1].Healthy; h == nil || *h {
		t.Errorf("unhealthy sample: %v", h)
	}
	if got[1].Samples[0].Healthy != nil || got[1].Samples[0].BytesSent != 7 {
		t.Errorf("node b's sample: %+v", got[1].Samples[0])
	}
	since, err := na.History(ctx, 1, now.Add(-15*time.Second))
	if err != nil || len(since) != 2 || len(since[0].Samples) != 1 {
		t.Fatalf("since: %+v %v", since, err)
	}
}
