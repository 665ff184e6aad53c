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

// flowEndings are the ways the new-flow test ends sessions: with their
// one answer (aegis udp_responses 1, nginx proxy_responses 1), so that
// nothing piles up; and, as a user who sets neither gets, after an idle
// timeout of a second, the shortest aegis takes, so that each proxy holds
// the flows of the last second and ends each with its timer. key is what
// the metric keys end with.
//
// Kept sessions from 1 client are measured for a whole round, while
// sessions expire as fast as they come. 8 clients make about 25,000 flows
// a second, and holding a second of them takes more sockets than the
// open-file hard limit here (20,000) lets a proxy have: their rounds stop
// once the proxy holds flowCap entries (bounded), before the first expires,
// and the next waits until every one has. Kept sessions' queries come from
// 256 source addresses in turn (spread): from one address, the kernel's
// ephemeral ports (about 28,000) come round within the idle timeout, and a
// third of the queries would find a live session instead of making one.
var flowEndings = []flowEnding{
	{"", "udp-flows", udpEnding{responses: 1}, flowClients, 0, false},
	{"kept", "udp-flows-kept", udpEnding{idle: 1}, []int{1}, 256, false},
	{"kept", "udp-flows-kept-8", udpEnding{idle: 1}, []int{8}, 256, true},
}

// flowEnding is one way of ending the new-flow test's sessions (see
// flowEndings).
type flowEnding struct {
	key, phase string
	end        udpEnding
	clients    []int
	spread     int  // source addresses the clients take in turn; 0: the kernel's choice
	bounded    bool // a round stops at flowCap flows, and the next waits for them to expire
}

// flowCap is how many kept sessions a bounded round of the new-flow test
// may leave in a proxy that holds at most entries (the NAT test's count,
// which the open-file limit sets): three quarters of them, so that a
// proxy faster than the round's warm-up expects stays inside its limit.
func flowCap(entries int) int64 { return int64(entries) * 3 / 4 }

// boundedWarmup is the warm-up of a bounded round: short, because its
// flows count toward flowCap.
const boundedWarmup = 100 * time.Millisecond

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
	type flowRun struct {
		r       *udpRun
		c       *child // nil for direct
		front   int
		fds     func() (int, error) // the proxy's open descriptors; nil for direct
		baseFDs int                 // as the proxy started
		n       map[int]counted
	}
	what := "new flows"
	if fe.key != "" {
		what += ", " + fe.key
	}
	var frs []*flowRun
	for _, r := range runs {
		// Kept sessions pile up for their idle timeout: nginx gets room
		// for as many as the NAT test's.
		entries := 0
		if fe.end.responses == 0 {
			entries = cfg.udpEntries
		}
		c, front, err := launchUDP(r.p, cfg, up, tmp, fe.phase, entries, fe.end)
		if err != nil {
			r.res.notes = append(r.res.notes, what+": "+err.Error())
			continue
		}
		fr := &flowRun{r: r, c: c, front: front, n: map[int]counted{}}
		if fe.bounded && c != nil {
			pid, err := r.p.rssPID(c)
			if err == nil {
				fr.fds = func() (int, error) { return openFDs(pid) }
				fr.baseFDs, err = fr.fds()
			}
			if err != nil {
				c.stop()
				r.res.notes = append(r.res.notes, what+": "+err.Error())
				continue
			}
		}
		frs = append(frs, fr)
	}
	defer func() {
		for _, fr := range frs {
			if fr.c != nil {
				fr.c.stop()
			}
		}
	}()
	round := turnWindow(cfg.w)
	var limit int64
	if fe.bounded {
		round.warmup, limit = boundedWarmup, flowCap(cfg.udpEntries)
	}
	for i := range turnRounds {
		for _, fr := range frs {
			for _, k := range fe.clients {
				if fr.c != nil && fr.c.exited() {
					continue
				}
				udpStep(fr.r.p, fr.c, fr.r.res, fmt.Sprintf("%s, %s, round %d of %d", what, plural(k, "client"), i+1, turnRounds), func() error {
					if fr.fds != nil {
						n, want := 0, fr.baseFDs+expiredSlack
						if err := waitFor(expireWait, func() (ok bool, err error) {
							n, err = fr.fds()
							return n <= want, err
						}); err != nil {
							return fmt.Errorf("the last round's sessions did not expire: %d descriptors open after %v, want at most %d: %v", n, expireWait, want, err)
						}
					}
					got, err := flowLoad(addr(fr.front), k, fe.spread, round, limit)
					c := fr.n[k]
					c.add(got)
					fr.n[k] = c
					return err
				})
			}
		}
	}
	for _, fr := range frs {
		for _, k := range fe.clients {
			if c := fr.n[k]; c.secs > 0 && c.n > 0 {
				fr.r.res.values[fmt.Sprintf("flows%d%s", k, fe.key)] = c.rate()
			}
		}
	}
}

// A bounded round of kept sessions starts once the proxy has at most
// expiredSlack descriptors more than it started with, waiting expireWait
// at most: the last round's sessions live for their idle timeout of a
// second.
const (
	expiredSlack = 16
	expireWait   = 5 * time.Second
)

// flowLoad runs clients loops of query, answer, close (a new UDP socket
// each time) against addr for w, and returns the flows answered in the
// counted part and how long it lasted. With limit > 0, the loops stop once
// limit flows were made, warm-up included, and the counted part ends
// there; reaching it within the warm-up is an error. With spread > 0, the
// sockets are bound to the addresses 127.0.1.0 and up, spread of them, in
// turn. A query whose answer does not come within a second counts for
// nothing; more than 1% of them is an error.
func flowLoad(addr string, clients, spread int, w window, limit int64) (counted, error) {
	to, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return counted{}, err
	}
	var counting, stop atomic.Bool
	var done, lost, next, made atomic.Int64
	full := make(chan struct{})
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
				if limit > 0 && made.Add(1) == limit {
					stop.Store(true)
					close(full)
				}
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
	finish := func() {
		stop.Store(true)
		wg.Wait()
	}
	select {
	case <-time.After(w.warmup):
	case <-full:
		finish()
		return counted{}, fmt.Errorf("%d flows made within the warm-up of %v: the cap leaves nothing to count", limit, w.warmup)
	}
	counting.Store(true)
	t0 := time.Now()
	select {
	case <-time.After(w.dur):
	case <-full:
	}
	counting.Store(false)
	got := counted{n: done.Load(), secs: time.Since(t0).Seconds()}
	finish()
	if firstErr != nil {
		return got, firstErr
	}
	if l := lost.Load(); l > 0 && l*100 > got.n {
		return got, fmt.Errorf("%d of %d queries got no answer within 1s", l, got.n+l)
	}
	return got, nil
}
