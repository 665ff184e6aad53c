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

// flowEndings are the two ways the new-flow test ends sessions: with
// their one answer (aegis udp_responses 1, nginx proxy_responses 1), so
// that nothing piles up; and, as a user who sets neither gets, after an
// idle timeout of a second, the shortest aegis takes, so that each proxy
// holds about a second's flows and ends each with its timer. key is what
// the second's metric keys end with.
//
// Kept sessions are measured with 1 client only: 8 clients make about
// 25,000 flows a second, and holding a second of them takes more sockets
// than the open-file hard limit here (20,000) lets a proxy have. And their
// queries come from 256 source addresses in turn (spread): from one
// address, the kernel's ephemeral ports (about 28,000) come round within
// the idle timeout, and a third of the queries would find a live session
// instead of making one.
var flowEndings = []flowEnding{
	{"", "udp-flows", udpEnding{responses: 1}, flowClients, 0},
	{"kept", "udp-flows-kept", udpEnding{idle: 1}, []int{1}, 256},
}

// flowEnding is one way of ending the new-flow test's sessions (see
// flowEndings).
type flowEnding struct {
	key, phase string
	end        udpEnding
	clients    []int
	spread     int // source addresses the clients take in turn; 0: the kernel's choice
}

// flowsUDP measures new UDP flows per second, as a resolver in front of
// DNS servers makes them: each client sends a query from a new socket,
// reads the answer and closes the socket, in a loop. For each of
// flowEndings, the proxies run at once, on fresh processes, and take turns
// for turnRounds rounds.
func flowsUDP(runs []*udpRun, cfg config, up *upstreams, tmp string) {
	for _, fe := range flowEndings {
		flowsUDPEnding(runs, cfg, up, tmp, fe)
	}
}

// flowsUDPEnding is flowsUDP for sessions that end as fe says, with each
// of its client counts, from its source addresses; the values go to the
// keys flows<clients><key>.
func flowsUDPEnding(runs []*udpRun, cfg config, up *upstreams, tmp string, fe flowEnding) {
	key, end, clients, spread := fe.key, fe.end, fe.clients, fe.spread
	type flowRun struct {
		r     *udpRun
		c     *child // nil for direct
		front int
		n     map[int]int64
		dur   map[int]time.Duration
	}
	what := "new flows"
	if key != "" {
		what += ", " + key
	}
	var frs []*flowRun
	for _, r := range runs {
		// Kept sessions pile up for their idle timeout: nginx gets room
		// for as many as the NAT test's.
		entries := 0
		if end.responses == 0 {
			entries = cfg.udpEntries
		}
		c, front, err := launchUDP(r.p, cfg, up, tmp, fe.phase, entries, end)
		if err != nil {
			r.res.notes = append(r.res.notes, what+": "+err.Error())
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
			for _, k := range clients {
				if fr.c != nil && fr.c.exited() {
					continue
				}
				udpStep(fr.r.p, fr.c, fr.r.res, fmt.Sprintf("%s, %s, round %d of %d", what, plural(k, "client"), i+1, turnRounds), func() error {
					n, err := flowLoad(addr(fr.front), k, spread, round)
					fr.n[k] += n
					fr.dur[k] += round.dur
					return err
				})
			}
		}
	}
	for _, fr := range frs {
		for _, k := range clients {
			if fr.dur[k] > 0 && fr.n[k] > 0 {
				fr.r.res.values[fmt.Sprintf("flows%d%s", k, key)] = float64(fr.n[k]) / fr.dur[k].Seconds()
			}
		}
	}
}

// flowLoad runs clients loops of query, answer, close (a new UDP socket
// each time) against addr for w, and returns the flows answered in the
// counted part. With spread > 0, the sockets are bound to the addresses
// 127.0.1.0 and up, spread of them, in turn. A query whose answer does not
// come within a second counts for nothing; more than 1% of them is an
// error.
func flowLoad(addr string, clients, spread int, w window) (int64, error) {
	to, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return 0, err
	}
	var counting, stop atomic.Bool
	var done, lost, next atomic.Int64
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			msg := []byte("query")
			buf := make([]byte, 64)
			for !stop.Load() {
				var from *net.UDPAddr
				if spread > 0 {
					i := next.Add(1) % int64(spread)
					from = &net.UDPAddr{IP: net.IPv4(127, 0, 1+byte(i>>8), byte(i))}
				}
				c, err := net.DialUDP("udp4", from, to)
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
