package streamstate

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// police sends a datagram of size bytes every gap from start for span
// through b, on a fake clock, and returns the bytes let through and the
// times they went.
func police(b *Bucket, start time.Time, span, gap time.Duration, size int) (passed int, at []time.Duration) {
	for d := time.Duration(0); d < span; d += gap {
		if b.Allow(start.Add(d), size) {
			passed += size
			at = append(at, d)
		}
	}
	return passed, at
}

func TestBucketZeroIsUnlimited(t *testing.T) {
	if b := NewBucket(0, true, time.Now()); b != nil {
		t.Fatalf("0 must mean unlimited (nil), got %+v", b)
	}
	if b := NewBucket(-1, false, time.Now()); b != nil {
		t.Fatalf("a negative rate must mean unlimited (nil), got %+v", b)
	}
}

// The TCP bucket starts empty and holds one second's worth.
func TestBucketStartsEmptyWithOneSecondsWorth(t *testing.T) {
	now := time.Now()
	b := NewBucket(1000, false, now)
	if b.Size() != 1000 {
		t.Fatalf("size: got %d, want one second's worth (1000)", b.Size())
	}
	if b.Allow(now, 100) {
		t.Fatal("an empty bucket let 100 bytes through: a transfer may not run ahead of the rate")
	}
	if !b.Allow(now.Add(100*time.Millisecond), 100) {
		t.Fatal("after 100 ms at 1000 B/s the bucket holds 100 bytes")
	}
	// However high the rate, a byte costs something: an empty bucket of
	// 10 GB/s lets no byte through.
	if NewBucket(10_000_000_000, false, now).Allow(now, 1) {
		t.Fatal("an empty 10 GB/s bucket let a byte through: its cost was rounded down to nothing")
	}
	// Ten seconds later it still holds one second's worth, no more.
	later := now.Add(10 * time.Second)
	if !b.Allow(later, 1001) || b.Allow(later, 1) {
		t.Fatal("a full bucket lets one transfer through, even one larger than it, and then nothing")
	}
}

// At 500 B/s, 100 datagrams of 1,000 bytes sent over one second: the
// first passes (the UDP bucket starts full), the rest are dropped, and
// over ten seconds the rate holds.
func TestBucketPolicesDatagramsLargerThanIt(t *testing.T) {
	start := time.Now()
	b := NewBucket(500, true, start)
	if passed, at := police(b, start, time.Second, 10*time.Millisecond, 1000); passed != 1000 {
		t.Fatalf("500 B/s, 100 datagrams of 1000 B in 1 s: %d bytes passed (at %v), want one datagram", passed, at)
	}
	b = NewBucket(500, true, start)
	passed, at := police(b, start, 10*time.Second, 10*time.Millisecond, 1000)
	// A datagram larger than the bucket waits for it to be full and
	// leaves it 500 bytes in debt: one every two seconds.
	if want := []time.Duration{0, 2 * time.Second, 4 * time.Second, 6 * time.Second, 8 * time.Second}; len(at) != len(want) || passed != 5000 {
		t.Fatalf("500 B/s over 10 s: passed %d bytes at %v, want 5000 at %v", passed, at, want)
	} else {
		for i := range want {
			if at[i] != want[i] {
				t.Fatalf("500 B/s over 10 s: passed at %v, want %v", at, want)
			}
		}
	}
}

// One 60 KB datagram on a 1 kB/s limit passes once; then nothing passes
// for a minute, however small: the bucket is 59 kB in debt.
func TestBucketBigDatagramThenNothingForAMinute(t *testing.T) {
	start := time.Now()
	b := NewBucket(1000, true, start)
	if !b.Allow(start, 60000) {
		t.Fatal("a 60 KB datagram on a full 1 kB/s bucket was dropped")
	}
	for d := 100 * time.Millisecond; d < 59*time.Second; d += 100 * time.Millisecond {
		if b.Allow(start.Add(d), 100) {
			t.Fatalf("a 100-byte datagram passed %v after the 60 KB one, want nothing for a minute", d)
		}
	}
	if !b.Allow(start.Add(60*time.Second), 1000) {
		t.Fatal("a minute after the 60 KB datagram the bucket is full again, yet 1000 bytes were dropped")
	}
	if b.Allow(start.Add(60*time.Second), 60000) {
		t.Fatal("the bucket let a second big datagram through right behind another")
	}
}

// A steady flow over a 100 kB/s limit for 10 s: the bytes let through
// after the first (full) bucket stay within 5% of the limit; a flow at
// the limit loses nothing.
func TestBucketHoldsTheRateOverTenSeconds(t *testing.T) {
	const limit = 100_000
	start := time.Now()
	for _, offered := range []int{2 * limit, 10 * limit} {
		b := NewBucket(limit, true, start)
		gap := time.Second * 1000 / time.Duration(offered)
		passed, _ := police(b, start, 10*time.Second, gap, 1000)
		steady := float64(passed-limit) / 10 // what the first bucket let through aside
		if steady < 0.95*limit || steady > 1.05*limit {
			t.Errorf("offered %d B/s for 10 s at a %d B/s limit: %d bytes passed, %.0f B/s beyond the first bucket, want within 5%%",
				offered, limit, passed, steady)
		}
	}
	b := NewBucket(limit, false, start)
	if passed, _ := police(b, start.Add(time.Second), 10*time.Second, 10*time.Millisecond, 1000); passed != 10*limit {
		t.Errorf("a flow at the limit (1000 B every 10 ms): %d of %d bytes passed", passed, 10*limit)
	}
}

// Many goroutines at one instant share one full bucket: exactly its size
// passes (the compare-and-swap loses no update).
func TestBucketConcurrentAllow(t *testing.T) {
	now := time.Now()
	b := NewBucket(100_000, true, now)
	var passed atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				if b.Allow(now, 100) {
					passed.Add(100)
				}
			}
		})
	}
	wg.Wait()
	if passed.Load() != 100_000 {
		t.Fatalf("8 goroutines on a full 100 kB bucket at one instant let %d bytes through, want 100000", passed.Load())
	}
}

// Wait shapes: on an empty bucket, 1000 bytes at 10 kB/s wait 100 ms, and
// the next 1000 another 100 ms; a transfer larger than the bucket waits for
// it to be full and leaves it in debt. A context that ends stops a wait.
func TestBucketWait(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	b := NewBucket(10_000, false, start)
	for i, want := range []time.Duration{100 * time.Millisecond, 200 * time.Millisecond} {
		if err := b.Wait(ctx, 1000); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got < want-5*time.Millisecond || got > want+150*time.Millisecond {
			t.Fatalf("wait %d: done after %v, want %v", i, got, want)
		}
	}
	start = time.Now()
	b = NewBucket(10_000, true, start)
	if err := b.Wait(ctx, 15_000); err != nil {
		t.Fatal(err)
	}
	if got := time.Since(start); got > 50*time.Millisecond {
		t.Fatalf("15 kB on a full 10 kB bucket waited %v, want none", got)
	}
	if b.Allow(time.Now().Add(400*time.Millisecond), 1) {
		t.Fatal("after 15 kB on a full 10 kB bucket, 1 byte passed within 400 ms: the debt was forgotten")
	}
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := b.Wait(cctx, 1000); err == nil {
		t.Fatal("a wait longer than its context ended without an error")
	}
	if got := time.Since(start); got > time.Second {
		t.Fatalf("the context's end did not stop the wait: %v", got)
	}
}

// BenchmarkBucketAllow is the cost of a datagram's check.
func BenchmarkBucketAllow(b *testing.B) {
	bk := NewBucket(1<<40, true, time.Now())
	b.ReportAllocs()
	for b.Loop() {
		bk.Allow(time.Now(), 64)
	}
}
