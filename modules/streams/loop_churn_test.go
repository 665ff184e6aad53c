package streams_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// frameUpstream echoes frames (4 bytes of length, a flag byte, the
// payload) and closes the connection after echoing one whose flag is 1.
func frameUpstream(c net.Conn) {
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		p := make([]byte, 5+binary.BigEndian.Uint32(hdr[:4]))
		copy(p, hdr[:])
		if _, err := io.ReadFull(c, p[5:]); err != nil {
			return
		}
		if _, err := c.Write(p); err != nil || hdr[4] == 1 {
			return
		}
	}
}

// How a churning connection ends.
const (
	endQuietClose = iota // the client closes after a quiet spell
	endBusyClose         // the client closes right after a round
	endShutWrite         // the client shuts its write side, reads the end
	endUpstream          // the upstream closes after its last echo
	endKinds
)

// churnPause is a pause between rounds: none, short, around the moment a
// quiet connection leaves the active path (250 ms today), or longer.
func churnPause(rng *rand.Rand) time.Duration {
	switch rng.IntN(4) {
	case 0:
		return 0
	case 1:
		return time.Duration(rng.IntN(50)) * time.Millisecond
	case 2:
		return time.Duration(200+rng.IntN(100)) * time.Millisecond
	default:
		return time.Duration(300+rng.IntN(500)) * time.Millisecond
	}
}

// churn runs one connection: rounds of a framed echo of random sizes
// with random pauses, then the end kind says. It returns the bytes that
// went each way (the same both ways).
func churn(port int, seed uint64, rounds, end int) (uint64, error) {
	rng := rand.New(rand.NewPCG(seed, 3))
	time.Sleep(time.Duration(rng.IntN(500)) * time.Millisecond)
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var moved uint64
	for i := range rounds {
		n := 1 + rng.IntN(1<<(4+rng.IntN(14))) // 1 byte to 256 KiB, small ones often
		frame := randomBytes(rng.Uint64(), 5+n)
		binary.BigEndian.PutUint32(frame, uint32(n))
		frame[4] = 0
		if i == rounds-1 && end == endUpstream {
			frame[4] = 1
		}
		if err := echoAll(c, frame, rng.Uint64()); err != nil {
			return moved, fmt.Errorf("round %d of %d: %v", i, rounds, err)
		}
		moved += uint64(len(frame))
		if i < rounds-1 || end == endQuietClose {
			time.Sleep(churnPause(rng))
		}
	}
	switch end {
	case endShutWrite:
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			return moved, err
		}
		fallthrough
	case endUpstream:
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
			return moved, fmt.Errorf("after the last round: read %d, %v; want the end", n, err)
		}
	}
	return moved, nil
}

// Many connections moving between quiet and active at once, under load:
// rounds of random sizes (1 byte to 256 KiB) with random pauses, some
// around and some well past the moment a quiet connection leaves the
// active path, ended at random moments in four ways (the client closes
// after a quiet spell or right after a round, shuts its write side, or
// the upstream closes). Every byte arrives intact, and the stats and each
// connection's log entry are exact.
func TestLoopQuietActiveChurn(t *testing.T) {
	checkNoLeaksOrFDs(t)
	up := newUpstream(t, frameUpstream)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, nil)))

	const conns = 150
	rng := rand.New(rand.NewPCG(2026, 15))
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	want := make([]connEnd, conns)
	var total uint64
	var mu sync.Mutex
	start := time.Now()
	for i := range conns {
		seed, rounds, end := rng.Uint64(), 2+rng.IntN(9), rng.IntN(endKinds)
		wg.Go(func() {
			moved, err := churn(port, seed, rounds, end)
			if err != nil {
				errs <- fmt.Errorf("connection %d (%d rounds, end %d): %v", i, rounds, end, err)
				return
			}
			reason := "client_close"
			if end == endUpstream {
				reason = "upstream_close"
			}
			mu.Lock()
			want[i] = connEnd{moved, moved, reason}
			total += moved
			mu.Unlock()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d connections, %d MiB each way, in %s", conns, total>>20, time.Since(start).Round(time.Millisecond))
	inst.expectTotals(1, conns, total, total)
	inst.expectEnds(1, want)
}
