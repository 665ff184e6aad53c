package streamstate

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"time"
)

// The upstream picker: which of a stream's upstreams a new TCP connection
// or UDP NAT entry goes to, and the next one to try when a dial fails. The
// TCP dialer (l4aegisproxy's dial.go) and the UDP relay (udpnat) both use
// it. Picking takes no lock and allocates nothing.

// Load balancing methods, as spec names them.
const (
	RoundRobin       = "round_robin"
	LeastConnections = "least_connections"
	SourceHash       = "source_hash"
	Random           = "random"
	First            = "first"
)

// DefaultFailTimeout is how long a failed peer is skipped when nothing
// else is set.
const DefaultFailTimeout = 10 * time.Second

// MaxPeers is the most upstreams a Picker takes: Tried is a bit set.
const MaxPeers = 64

// Peer is one upstream as a Picker sees it.
type Peer struct {
	// Addr is host:port.
	Addr   string
	Weight int // >= 1
	Backup bool
	// State is its runtime state (State.Upstream).
	State *Upstream
	key   uint64 // hash of Addr, for source_hash
}

// Tried is the set of peers (by index) a connection has tried.
type Tried uint64

// Add marks peer i tried.
func (t *Tried) Add(i int) { *t |= 1 << uint(i) }

// Has reports whether peer i was tried.
func (t Tried) Has(i int) bool { return t&(1<<uint(i)) != 0 }

// Picker picks upstreams for one config of a stream.
type Picker struct {
	peers   []Peer
	method  string
	failFor time.Duration
	// order is one cycle of smooth weighted round robin over the peers
	// that are not backups, and over the backups (nginx's: no peer twice
	// in a row when others can go between).
	order [2][]uint8
	next  atomic.Uint64
}

// NewPicker makes the picker of peers with method (RoundRobin when ""),
// whose failed peers are skipped for failFor. Each peer's State must be
// set.
func NewPicker(method string, peers []Peer, failFor time.Duration) (*Picker, error) {
	switch method {
	case "":
		method = RoundRobin
	case RoundRobin, LeastConnections, SourceHash, Random, First:
	default:
		return nil, fmt.Errorf("load balancing %q: want %s, %s, %s, %s or %s", method, RoundRobin, LeastConnections, SourceHash, Random, First)
	}
	if len(peers) == 0 || len(peers) > MaxPeers {
		return nil, fmt.Errorf("%d upstreams: want 1-%d", len(peers), MaxPeers)
	}
	p := &Picker{peers: append([]Peer(nil), peers...), method: method, failFor: failFor}
	for i := range p.peers {
		pe := &p.peers[i]
		if pe.State == nil {
			return nil, fmt.Errorf("upstream %s: no state", pe.Addr)
		}
		pe.Weight = max(pe.Weight, 1)
		h := fnv.New64a()
		h.Write([]byte(pe.Addr))
		pe.key = h.Sum64()
	}
	p.order[0], p.order[1] = smoothOrder(p.peers, false), smoothOrder(p.peers, true)
	return p, nil
}

// smoothOrder is one cycle of smooth weighted round robin: each step adds
// every peer's weight to its current weight, takes the peer with the
// largest, and takes the total of the weights from it.
func smoothOrder(peers []Peer, backup bool) []uint8 {
	total := 0
	for _, pe := range peers {
		if pe.Backup == backup {
			total += pe.Weight
		}
	}
	cur := make([]int, len(peers))
	order := make([]uint8, 0, total)
	for range total {
		best := -1
		for i, pe := range peers {
			if pe.Backup != backup {
				continue
			}
			cur[i] += pe.Weight
			if best < 0 || cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= total
		order = append(order, uint8(best))
	}
	return order
}

// Len is the number of peers.
func (p *Picker) Len() int { return len(p.peers) }

// Peer returns peer i.
func (p *Picker) Peer(i int) *Peer { return &p.peers[i] }

// FailTimeout is how long a failed peer is skipped.
func (p *Picker) FailTimeout() time.Duration { return p.failFor }

// Failed records that peer i could not be reached.
func (p *Picker) Failed(i int, err error) { p.peers[i].State.Fail(err, p.failFor) }

// Pick returns the peer for a new connection from client that has tried
// the peers in tried, or -1 when every one was tried. It prefers, in
// order: a peer that is up and not a backup; a backup that is up; a peer
// that is down (none is up: it may be back); a backup that is down.
func (p *Picker) Pick(client netip.Addr, tried Tried) int {
	if len(p.peers) == 1 { // nothing to choose from
		if tried.Has(0) {
			return -1
		}
		return 0
	}
	now := time.Now().UnixNano()
	for tier := range 4 {
		backup, up := tier&1 == 1, tier < 2
		ok := func(i int) bool {
			pe := &p.peers[i]
			return !tried.Has(i) && pe.Backup == backup && (!up || pe.State.Up(now))
		}
		// A tier with no peer to give takes no turn from the round
		// robin: it would skew the next tier's turns.
		if p.any(ok) {
			if i := p.pickIn(ok, client, backup); i >= 0 {
				return i
			}
		}
	}
	return -1
}

// any reports whether ok is true for one of the peers.
func (p *Picker) any(ok func(int) bool) bool {
	for i := range p.peers {
		if ok(i) {
			return true
		}
	}
	return false
}

// pickIn picks one of the peers for which ok is true, by the method, or
// returns -1. backup says which tier ok takes.
func (p *Picker) pickIn(ok func(int) bool, client netip.Addr, backup bool) int {
	switch p.method {
	case First:
		for i := range p.peers {
			if ok(i) {
				return i
			}
		}
		return -1
	case SourceHash:
		// Rendezvous hashing: the peer with the highest hash of (client,
		// peer) wins, so a client keeps its peer while it is up, and only
		// the clients of a peer that goes down move.
		c := client.Unmap().As16()
		ch := fnvMix(fnvMix(0xcbf29ce484222325, c[:8]), c[8:])
		best, bestScore := -1, uint64(0)
		for i := range p.peers {
			if !ok(i) {
				continue
			}
			if s := mix64(ch ^ p.peers[i].key); best < 0 || s > bestScore {
				best, bestScore = i, s
			}
		}
		return best
	case LeastConnections:
		// The fewest connections per unit of weight; ties go round.
		n := len(p.peers)
		start := int(p.next.Add(1) % uint64(n))
		best := -1
		var bestActive int64
		for k := range n {
			i := (start + k) % n
			if !ok(i) {
				continue
			}
			a := p.peers[i].State.Active.Load()
			if best < 0 || a*int64(p.peers[best].Weight) < bestActive*int64(p.peers[i].Weight) {
				best, bestActive = i, a
			}
		}
		return best
	case Random:
		return p.weighted(ok, rand.Uint64())
	default: // RoundRobin
		order := p.order[0]
		if backup {
			order = p.order[1]
		}
		if len(order) == 0 {
			return -1
		}
		seq := p.next.Add(1) - 1
		if i := int(order[seq%uint64(len(order))]); ok(i) {
			return i
		}
		// Its turn's peer is out: share its turn among the others by
		// weight, rather than give it all to the one after it.
		return p.weighted(ok, mix64(seq))
	}
}

// weighted picks the peer for which ok is true that r falls on when the
// peers' weights are laid end to end, or -1.
func (p *Picker) weighted(ok func(int) bool, r uint64) int {
	total := 0
	for i := range p.peers {
		if ok(i) {
			total += p.peers[i].Weight
		}
	}
	if total == 0 {
		return -1
	}
	n := int(r % uint64(total))
	for i := range p.peers {
		if !ok(i) {
			continue
		}
		if n -= p.peers[i].Weight; n < 0 {
			return i
		}
	}
	return -1
}

func fnvMix(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= 0x100000001b3
	}
	return h
}

// mix64 is splitmix64's finalizer.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
