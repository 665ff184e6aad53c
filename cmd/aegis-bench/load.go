package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// window is the timing of one test: load runs for warmup+dur, and only
// the last dur counts.
type window struct{ warmup, dur time.Duration }

const dialTimeout = 2 * time.Second

// maxSamples bounds the latency samples kept per connection.
const maxSamples = 1 << 20

// measure runs load until the window ends and returns how much counter
// grew per second during the counted part.
func measure(w window, counter func() int64) float64 {
	return measureMarked(w, counter, nil).rate()
}

// counted is how much a counter grew in the counted part of a window, and
// how long that part took.
type counted struct {
	n    int64
	secs float64
}

func (c counted) rate() float64 { return float64(c.n) / c.secs }

func (c *counted) add(o counted) { c.n, c.secs = c.n+o.n, c.secs+o.secs }

// measureMarked is measure that returns the growth and the time it took,
// and calls mark, if not nil, when the counted part starts and ends.
func measureMarked(w window, counter func() int64, mark func()) counted {
	time.Sleep(w.warmup)
	a, t0 := counter(), time.Now()
	if mark != nil {
		mark()
	}
	time.Sleep(w.dur)
	b, t1 := counter(), time.Now()
	if mark != nil {
		mark()
	}
	return counted{n: b - a, secs: t1.Sub(t0).Seconds()}
}

// dialer opens one connection for a test; end is when the test ends.
type dialer func(end time.Time) (net.Conn, error)

// tcpDialer dials addr over plain TCP.
func tcpDialer(addr string) dialer {
	return func(time.Time) (net.Conn, error) { return net.DialTimeout("tcp", addr, dialTimeout) }
}

// dialAll opens n connections to addr, all with the deadline end.
func dialAll(addr string, n int, end time.Time) ([]net.Conn, error) {
	return dialAllWith(tcpDialer(addr), n, end)
}

// dialAllWith opens n connections with dial, all with the deadline end.
func dialAllWith(dial dialer, n int, end time.Time) ([]net.Conn, error) {
	var conns []net.Conn
	for range n {
		c, err := dial(end)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		c.SetDeadline(end)
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// upload writes to the sink through addr on n connections; the sink counts
// what arrives. Result in MB/s (1 MB = 10^6 bytes).
func upload(addr string, n int, w window, sink *upstream) (float64, error) {
	c, err := uploadWith(tcpDialer(addr), n, w, sink, nil)
	if err != nil {
		return 0, err
	}
	return c.rate() / 1e6, nil
}

// uploadWith is upload on connections that dial opens; it returns the bytes
// that reached the sink in the counted part, and calls mark as
// measureMarked does.
func uploadWith(dial dialer, n int, w window, sink *upstream, mark func()) (counted, error) {
	end := time.Now().Add(w.warmup + w.dur)
	conns, err := dialAllWith(dial, n, end)
	if err != nil {
		return counted{}, err
	}
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			buf := make([]byte, 64<<10)
			for time.Now().Before(end) {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		})
	}
	got := measureMarked(w, sink.read.Load, mark)
	closeAll(conns)
	wg.Wait()
	return got, nil
}

// download reads from the source through addr on n connections. Result in MB/s.
func download(addr string, n int, w window) (float64, error) {
	c, err := downloadWith(tcpDialer(addr), n, w, nil)
	if err != nil {
		return 0, err
	}
	return c.rate() / 1e6, nil
}

// downloadWith is download on connections that dial opens; it returns the
// bytes read in the counted part, and calls mark as measureMarked does.
func downloadWith(dial dialer, n int, w window, mark func()) (counted, error) {
	end := time.Now().Add(w.warmup + w.dur)
	conns, err := dialAllWith(dial, n, end)
	if err != nil {
		return counted{}, err
	}
	var got atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			buf := make([]byte, 64<<10)
			for time.Now().Before(end) {
				k, err := c.Read(buf)
				got.Add(int64(k))
				if err != nil {
					return
				}
			}
		})
	}
	res := measureMarked(w, got.Load, mark)
	closeAll(conns)
	wg.Wait()
	if res.n == 0 {
		return res, errors.New("no bytes came through")
	}
	return res, nil
}

// roundTrip writes msg and reads the echo of the same length.
func roundTrip(c net.Conn, msg, buf []byte) error {
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_, err := io.ReadFull(c, buf[:len(msg)])
	return err
}

// connRate runs workers that each connect to the echo through addr, do one
// small round trip and close, over and over. It returns connections per
// second and how many attempts failed in the counted part.
func connRate(addr string, workers int, w window) (float64, int64) {
	return connRateMarked(addr, workers, w, nil)
}

// connRateMarked is connRate that calls mark as measureMarked does.
func connRateMarked(addr string, workers int, w window, mark func()) (float64, int64) {
	end := time.Now().Add(w.warmup + w.dur)
	countFrom := time.Now().Add(w.warmup)
	var ok, failed atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			msg, buf := make([]byte, 32), make([]byte, 32)
			d := net.Dialer{Timeout: dialTimeout, Deadline: end}
			for time.Now().Before(end) {
				err := func() error {
					c, err := d.Dial("tcp", addr)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(end)
					return roundTrip(c, msg, buf)
				}()
				if err == nil {
					ok.Add(1)
				} else if now := time.Now(); now.Before(end) {
					if now.After(countFrom) {
						failed.Add(1)
					}
					time.Sleep(time.Millisecond)
				}
			}
		})
	}
	rate := measureMarked(w, ok.Load, mark).rate()
	wg.Wait()
	return rate, failed.Load()
}

// latencySamples runs n connections that each ping-pong 64-byte messages
// with the echo through addr, and returns the round-trip times, unsorted.
func latencySamples(addr string, n int, w window) ([]time.Duration, error) {
	end := time.Now().Add(w.warmup + w.dur)
	countFrom := time.Now().Add(w.warmup)
	conns, err := dialAll(addr, n, end)
	if err != nil {
		return nil, err
	}
	samples := make([][]time.Duration, n)
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() {
			msg, buf := make([]byte, 64), make([]byte, 64)
			for len(samples[i]) < maxSamples {
				t := time.Now()
				if !t.Before(end) || roundTrip(c, msg, buf) != nil {
					return
				}
				if t.After(countFrom) {
					samples[i] = append(samples[i], time.Since(t))
				}
			}
		})
	}
	wg.Wait()
	closeAll(conns)
	all := slices.Concat(samples...)
	if len(all) == 0 {
		return nil, errors.New("no round trip finished")
	}
	return all, nil
}

// percentile is the nearest-rank percentile p (0–100] of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// idleMemory opens n connections to the echo through addr, each with one
// round trip, and returns how much rss grew per connection, in KB.
func idleMemory(addr string, n int, rss func() (int64, error)) (float64, error) {
	time.Sleep(300 * time.Millisecond)
	before, err := rss()
	if err != nil {
		return 0, err
	}
	conns := make([]net.Conn, 0, n)
	defer func() { closeAll(conns) }()
	msg, buf := make([]byte, 64), make([]byte, 64)
	for i := range n {
		c, err := net.DialTimeout("tcp", addr, dialTimeout)
		if err != nil {
			return 0, fmt.Errorf("connection %d: %v", i+1, err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := roundTrip(c, msg, buf); err != nil {
			return 0, fmt.Errorf("connection %d: %v", i+1, err)
		}
	}
	time.Sleep(time.Second) // let the proxy settle
	after, err := rss()
	if err != nil {
		return 0, err
	}
	return float64(after-before) / float64(n), nil
}
