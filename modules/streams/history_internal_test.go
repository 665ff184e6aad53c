package streams

import (
	"testing"
	"time"
	"unsafe"

	"github.com/aegis-proxy/caddy-aegis/storage"
)

// A stream's ring holds 24 hours of samples and no more: 32 bytes each,
// 270 KiB at most, and grows with the samples.
func TestHistoryRingBounded(t *testing.T) {
	if size := unsafe.Sizeof(sample{}); size != 32 {
		t.Fatalf("a sample is %d bytes, want 32", size)
	}
	var h streamHistory
	h.add(sample{t: 10})
	if cap(h.buf) > 64 {
		t.Fatalf("a young stream holds room for %d samples", cap(h.buf))
	}
	for i := 2; i <= HistorySamples+5; i++ {
		h.add(sample{t: uint32(10 * i)})
	}
	if len(h.buf) != HistorySamples || cap(h.buf) != HistorySamples {
		t.Fatalf("len %d cap %d, want %d", len(h.buf), cap(h.buf), HistorySamples)
	}
	var first, last uint32
	n := 0
	h.each(0, func(s sample) {
		if n == 0 {
			first = s.t
		} else if s.t <= last {
			t.Fatalf("sample %d at %d after %d", n, s.t, last)
		}
		last = s.t
		n++
	})
	if n != HistorySamples || first != 60 || last != uint32(10*(HistorySamples+5)) {
		t.Fatalf("%d samples from %d to %d", n, first, last)
	}
	recent := 0
	h.each(last-100, func(sample) { recent++ })
	if recent != 10 {
		t.Fatalf("%d samples in the last 100 s, want 10", recent)
	}
	t.Logf("history per stream at 24 hours: %d samples of %d bytes = %d bytes",
		HistorySamples, unsafe.Sizeof(sample{}), uintptr(HistorySamples)*unsafe.Sizeof(sample{}))
}

// Steps longer than a sample average the rates, take the most active
// connections, and are unhealthy if any sample was; no health is null.
func TestHistoryAggregate(t *testing.T) {
	base := time.Unix(1_800_000_000, 0).UTC() // on a minute: 1.8e9 = 30e6 minutes
	yes, no := true, false
	at := func(s int) time.Time { return base.Add(time.Duration(s) * time.Second) }
	samples := []storage.HistorySample{
		{Time: at(10), BytesSent: 6, Active: 1, Healthy: &yes},
		{Time: at(20), BytesSent: 0, Active: 3, Healthy: &no},
		{Time: at(60), BytesSent: 3, Active: 2, Healthy: &yes},
		{Time: at(70), BytesSent: 1},
	}
	pts := aggregate(samples, 60)
	if len(pts) != 2 {
		t.Fatalf("%d points: %+v", len(pts), pts)
	}
	if p := pts[0]; !p.Time.Equal(at(60)) || p.BytesSentPerSec != 3 || p.ActiveConnections != 3 || p.Healthy == nil || *p.Healthy {
		t.Errorf("first minute: %+v", p)
	}
	if p := pts[1]; !p.Time.Equal(at(120)) || p.BytesSentPerSec != 1 || p.Healthy != nil {
		t.Errorf("second minute: %+v", p)
	}
	if p := aggregate(samples[2:3], 60)[0]; p.Healthy == nil || !*p.Healthy {
		t.Errorf("a healthy minute: %+v", p)
	}
	sum := sumPoints([][]HistoryPoint{aggregate(samples[:1], 10), aggregate(samples[1:2], 10), aggregate(samples[:2], 10)})
	if len(sum) != 2 || sum[0].BytesSentPerSec != 12 || sum[0].ActiveConnections != 2 || !*sum[0].Healthy || *sum[1].Healthy {
		t.Errorf("sum: %+v", sum)
	}
}
