package streamstate

import (
	"context"
	"math"
	"sync/atomic"
	"time"
)

// Bucket is the token bucket of one rate limit (upload_rate_bytes or
// download_rate_bytes) of one TCP connection or one UDP client. Both
// protocols use it with the same rules:
//
//   - It fills at the rate and holds one second's worth (the rate in
//     bytes, at least 1).
//   - A transfer of n bytes may go when the bucket holds n, or, when n is
//     more than the bucket holds, only when the bucket is full. It then
//     takes n: a transfer larger than the bucket leaves it in debt by the
//     excess, so over any span the bytes let through stay within the rate
//     plus one bucket. One 60 KB datagram on a 1 kB/s limit passes at
//     once, and nothing passes for the next minute.
//
// TCP shapes with it (Wait: a transfer waits until it may go) and its
// bucket starts empty, so a transfer never runs ahead of the rate, even in
// its first second. UDP polices with it (Allow: a datagram that may not go
// now is dropped, as a router's policer does, since a datagram held back
// would arrive late and a queue would only add delay before the same loss)
// and its bucket starts full, so a new client's first second's worth goes
// through at once.
//
// The state is one atomic word: the time at which the bucket is full again
// (the theoretical arrival time of the generic cell rate algorithm). Allow
// and Wait take no lock and allocate nothing (Wait's timer aside).
type Bucket struct {
	perByte float64 // nanoseconds one byte costs
	size    int     // one second's worth, for callers that cut transfers
	full    atomic.Int64
}

// bucketEpoch is the origin of the bucket's clock: times are kept as
// monotonic nanoseconds since it.
var bucketEpoch = time.Now()

// NewBucket makes the bucket of a limit of bytesPerSec, full or empty. It
// returns nil for 0 or less (unlimited).
func NewBucket(bytesPerSec int64, full bool, now time.Time) *Bucket {
	if bytesPerSec <= 0 {
		return nil
	}
	b := &Bucket{
		perByte: float64(time.Second) / float64(bytesPerSec),
		size:    int(min(bytesPerSec, math.MaxInt32)),
	}
	t := int64(now.Sub(bucketEpoch))
	if !full {
		t += int64(time.Second)
	}
	b.full.Store(t)
	return b
}

// Size is what the full bucket holds: one second's worth.
func (b *Bucket) Size() int { return b.size }

// cost is the time n bytes take at the rate, rounded up to a whole
// nanosecond (so that no rate runs over its limit, however high), and the
// time the bucket must hold before they may go: their cost, at most a full
// second.
func (b *Bucket) cost(n int) (cost, need int64) {
	cost = int64(math.Ceil(float64(n) * b.perByte))
	return cost, min(cost, int64(time.Second))
}

// Allow takes n bytes from the bucket at now if they may go (policing):
// false, taking nothing, if not.
func (b *Bucket) Allow(now time.Time, n int) bool {
	t := int64(now.Sub(bucketEpoch))
	cost, need := b.cost(n)
	for {
		full := b.full.Load()
		// The bucket holds (t + 1s - full) worth, capped at 1s.
		if full+need-int64(time.Second) > t {
			return false
		}
		if b.full.CompareAndSwap(full, max(full, t)+cost) {
			return true
		}
	}
}

// Wait takes n bytes from the bucket, waiting until they may go
// (shaping). It returns ctx's error if ctx ends first; the bytes stay
// taken then.
func (b *Bucket) Wait(ctx context.Context, n int) error {
	cost, need := b.cost(n)
	var at int64
	for {
		t := int64(time.Since(bucketEpoch))
		full := b.full.Load()
		at = max(t, full+need-int64(time.Second))
		if b.full.CompareAndSwap(full, max(full, at)+cost) {
			at -= t
			break
		}
	}
	if at <= 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		default:
			return nil
		}
	}
	timer := time.NewTimer(time.Duration(at))
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
