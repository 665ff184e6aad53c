package main

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// flowClients are the client counts of the new-flow test.
var flowClients = []int{1, 8}

// flowsUDP measures new UDP flows per second, as a resolver in front of
// DNS servers makes them: each client sends a query from a new socket,
// reads the answer and closes the socket, in a loop. The proxies end each
// session after its one answer (aegis udp_responses 1, nginx
// proxy_responses 1), so nothing piles up. They run at once, on fresh
// processes, and take turns for turnRounds rounds.
func flowsUDP(runs []*udpRun, cfg config, up *upstreams, tmp string) {
	type flowRun struct {
		r     *udpRun
		c     *child // nil for direct
		front int
		n     map[int]int64
		dur   map[int]time.Duration
	}
	var frs []*flowRun
	for _, r := range runs {
		c, front, err := launchUDP(r.p, cfg, up, tmp, "udp-flows", 0, 1)
		if err != nil {
			r.res.notes = append(r.res.notes, "new flows: "+err.Error())
			continue
		}
		frs = append(frs, &flowRun{r: r, c: c, front: front, n: map[int]int64{}, dur: map[int]time.Duration{}})
	}
	defer func() {
		for _, fr := range frs {
			if fr.c != nil {
				fr.c.stop()
			}
		}
	}()
	round := turnWindow(cfg.w)
	for i := range turnRounds {
		for _, fr := range frs {
			for _, clients := range flowClients {
				if fr.c != nil && fr.c.exited() {
					continue
				}
				udpStep(fr.r.p, fr.c, fr.r.res, fmt.Sprintf("new flows, %s, round %d of %d", plural(clients, "client"), i+1, turnRounds), func() error {
					n, err := flowLoad(addr(fr.front), clients, round)
					fr.n[clients] += n
					fr.dur[clients] += round.dur
					return err
				})
			}
		}
	}
	for _, fr := range frs {
		for _, clients := range flowClients {
			if fr.dur[clients] > 0 && fr.n[clients] > 0 {
				fr.r.res.values[fmt.Sprintf("flows%d", clients)] = float64(fr.n[clients]) / fr.dur[clients].Seconds()
			}
		}
	}
}

// flowLoad runs clients loops of query, answer, close (a new UDP socket
// each time) against addr for w, and returns the flows answered in the
// counted part. A query whose answer does not come within a second counts
// for nothing; more than 1% of them is an error.
func flowLoad(addr string, clients int, w window) (int64, error) {
	to, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return 0, err
	}
	var counting, stop atomic.Bool
	var done, lost atomic.Int64
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			msg := []byte("query")
			buf := make([]byte, 64)
			for !stop.Load() {
				c, err := net.DialUDP("udp4", nil, to)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				_ = c.SetReadDeadline(time.Now().Add(time.Second))
				_, err = c.Write(msg)
				if err == nil {
					_, err = c.Read(buf)
				}
				c.Close()
				if !counting.Load() {
					continue
				}
				if err != nil {
					lost.Add(1)
				} else {
					done.Add(1)
				}
			}
		})
	}
	time.Sleep(w.warmup)
	counting.Store(true)
	time.Sleep(w.dur)
	counting.Store(false)
	n := done.Load()
	stop.Store(true)
	wg.Wait()
	if firstErr != nil {
		return n, firstErr
	}
	if l := lost.Load(); l > 0 && l*100 > n {
		return n, fmt.Errorf("%d of %d queries got no answer within 1s", l, n+l)
	}
	return n, nil
}
