package streamstate

import (
	"crypto/rand"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/cpu"
)

// MaxSources bounds the sources a stream's per-source table remembers;
// past it the oldest idle source is forgotten first (see Sources).
const MaxSources = 100_000

// sourceShards is the number of locks the table is split by: one
// connection locks one shard, chosen by a seeded hash of its source, so the
// connections of different sources rarely wait for each other.
const sourceShards = 64

// perShard is each shard's part of MaxSources.
const perShard = MaxSources / sourceShards

// SourceKey is the address per-source limits count by: an IPv4 source (or
// IPv4-mapped IPv6) as itself, an IPv6 source by its /64, which one host
// or one customer usually holds whole.
func SourceKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		b := a.As16()
		clear(b[8:])
		return netip.AddrFrom16(b)
	}
	return a
}

// Source is one source's entry in a stream's per-source table: what it
// holds open and when its connection rate lets it in again. It is
// reached only under its shard's lock. An entry that holds something is
// never evicted, so a session may keep a pointer to it until it gives
// back what it holds.
type Source struct {
	key        netip.Addr
	open       int32 // TCP connections and UDP NAT entries holding a slot
	handshakes int32 // TLS handshakes in progress
	// tat is the rate limit's state (GCRA, a token bucket in one number):
	// the unix nanosecond at which the source's bucket is full again.
	tat        int64
	prev, next *Source // in the shard's idle list, while idle
	listed     bool
}

func (s *Source) idle() bool { return s.open == 0 && s.handshakes == 0 }

// Rate is a per-source connection rate: at most N new connections in
// Window, as a token bucket of N tokens that refills one every Window/N
// (GCRA). A source may open N at once, and one more each Window/N after.
// The zero Rate is unlimited.
type Rate struct {
	N      int
	Window time.Duration
}

func (r Rate) on() bool { return r.N > 0 && r.Window > 0 }

// interval is the refill time of one token; tau how far ahead of now a
// source's bucket may run (a full bucket's worth less one token).
func (r Rate) gcra() (interval, tau int64) {
	interval = max(int64(r.Window)/int64(r.N), 1)
	return interval, int64(r.Window) - interval
}

// Sources is the per-source table of one stream, which every per-source
// limit uses: max_connections_per_ip and connection_rate_per_ip of TCP
// and UDP (through Policy.Admit), the default share of a listener's cap one
// source may hold (Cap.PerSource) and the TLS handshakes in progress per
// source (TakeHandshake). It holds at most MaxSources sources (about: each
// of its shards holds its part); a new source past that evicts the shard's
// oldest idle one (nothing open, no handshake), which forgets its rate
// history, and is refused (source_table_full) when every one of them is
// busy. Entries whose rate history no longer matters go as new sources come.
// A stream without per-source limits never touches it.
type Sources struct {
	seed   [2]uint64 // random: which sources share a shard is not known outside
	shards [sourceShards]sourceShard
}

type sourceShard struct {
	mu         sync.Mutex
	m          map[netip.Addr]*Source
	head, tail *Source // idle entries, oldest first
	free       *Source // entries forgotten, for reuse (linked by next)
	nfree      int
	_          cpu.CacheLinePad
}

// maxFree bounds each shard's entries kept for reuse: a source that comes
// and goes (one short connection at a time) costs no allocation.
const maxFree = 8

// NewSources makes an empty per-source table.
func NewSources() *Sources {
	t := new(Sources)
	var b [16]byte
	_, _ = rand.Read(b[:])
	t.seed = [2]uint64{binary.LittleEndian.Uint64(b[:8]) | 1, binary.LittleEndian.Uint64(b[8:])}
	return t
}

// shard is k's shard: a seeded multiply-and-fold hash of its 16 bytes.
func (t *Sources) shard(k netip.Addr) *sourceShard {
	b := k.As16()
	hi, lo := bits.Mul64(binary.LittleEndian.Uint64(b[:8])^t.seed[1], t.seed[0])
	x := hi ^ lo ^ binary.LittleEndian.Uint64(b[8:])
	hi, lo = bits.Mul64(x^t.seed[1], t.seed[0])
	return &t.shards[(hi^lo)%sourceShards]
}

// Len is the number of sources the table remembers now.
func (t *Sources) Len() int {
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}

// Open reports how many connections (NAT entries) the source of ip holds
// open in the table now.
func (t *Sources) Open(ip netip.Addr) int {
	k := SourceKey(ip)
	sh := t.shard(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s := sh.m[k]; s != nil {
		return int(s.open)
	}
	return 0
}

// take admits one more connection of the source of ip if it holds fewer
// than maxOpen (0: any number; the refusal is max_connections_per_ip, or
// source_share when share, the cap's default share, is the lower bound) and
// its rate r lets it in now. Admitted, the entry holds it until release.
func (t *Sources) take(ip netip.Addr, maxOpen int32, share bool, r Rate) (*Source, BlockReason, bool) {
	k := SourceKey(ip)
	sh := t.shard(k)
	var now int64 // read only when the rate needs it
	if r.on() {
		now = time.Now().UnixNano()
	}
	sh.mu.Lock()
	s, why, ok := sh.get(k, now)
	if !ok {
		sh.mu.Unlock()
		return nil, why, false
	}
	if maxOpen > 0 && s.open >= maxOpen {
		sh.mu.Unlock()
		if share {
			return nil, BlockSourceShare, false
		}
		return nil, BlockMaxPerIP, false
	}
	if r.on() {
		interval, tau := r.gcra()
		tat := max(s.tat, now)
		if tat-now > tau {
			sh.mu.Unlock()
			return nil, BlockRateLimited, false
		}
		s.tat = tat + interval
	}
	sh.busy(s)
	s.open++
	sh.mu.Unlock()
	return s, 0, true
}

// untake gives back a take whose connection was refused after it (by a
// stream-wide limit): the slot and the rate token.
func (t *Sources) untake(s *Source, r Rate) {
	sh := t.shard(s.key)
	sh.mu.Lock()
	if r.on() {
		interval, _ := r.gcra()
		s.tat -= interval
	}
	s.open--
	sh.rest(s)
	sh.mu.Unlock()
}

// release gives back one connection that take admitted.
func (t *Sources) release(s *Source) {
	sh := t.shard(s.key)
	sh.mu.Lock()
	s.open--
	sh.rest(s)
	sh.mu.Unlock()
}

// TakeHandshake counts one more TLS handshake in progress for the source of
// ip unless it has max (> 0) in progress already. Admitted, the caller
// gives it back with DoneHandshake.
func (t *Sources) TakeHandshake(ip netip.Addr, max int) (*Source, bool) {
	k := SourceKey(ip)
	sh := t.shard(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	s, _, ok := sh.get(k, 0)
	if !ok || max > 0 && int(s.handshakes) >= max {
		return nil, false
	}
	sh.busy(s)
	s.handshakes++
	return s, true
}

// DoneHandshake gives back a handshake that TakeHandshake counted.
func (t *Sources) DoneHandshake(s *Source) {
	sh := t.shard(s.key)
	sh.mu.Lock()
	s.handshakes--
	sh.rest(s)
	sh.mu.Unlock()
}

// get returns k's entry, making it if need be: room is made by dropping
// idle entries whose rate history has expired, then, when the shard is
// full, the oldest idle one. It fails (source_table_full) when the shard is
// full of busy sources. now is the time in unix nanoseconds, 0 if not read
// yet.
func (sh *sourceShard) get(k netip.Addr, now int64) (*Source, BlockReason, bool) {
	if s := sh.m[k]; s != nil {
		return s, 0, true
	}
	if now == 0 && sh.head != nil {
		now = time.Now().UnixNano()
	}
	// Forget up to two idle sources whose bucket is full again: as new
	// sources come, the ones that carry no state go, at O(1) each.
	for i := 0; i < 2 && sh.head != nil && sh.head.tat <= now; i++ {
		sh.drop(sh.head)
	}
	if len(sh.m) >= perShard {
		if sh.head == nil {
			return nil, BlockSourcesFull, false
		}
		sh.drop(sh.head)
	}
	if sh.m == nil {
		sh.m = make(map[netip.Addr]*Source)
	}
	s := sh.free
	if s != nil {
		sh.free, sh.nfree = s.next, sh.nfree-1
		*s = Source{key: k}
	} else {
		s = &Source{key: k}
	}
	sh.m[k] = s
	return s, 0, true
}

// busy takes s off the idle list.
func (sh *sourceShard) busy(s *Source) {
	if !s.listed {
		return
	}
	if s.prev != nil {
		s.prev.next = s.next
	} else {
		sh.head = s.next
	}
	if s.next != nil {
		s.next.prev = s.prev
	} else {
		sh.tail = s.prev
	}
	s.prev, s.next, s.listed = nil, nil, false
}

// rest files s after it gave something back: an idle source with no rate
// history is forgotten at once, one with history goes to the end of the
// idle list.
func (sh *sourceShard) rest(s *Source) {
	if !s.idle() {
		return
	}
	if s.tat == 0 || s.tat <= time.Now().UnixNano() {
		sh.drop(s)
		return
	}
	if s.listed {
		return
	}
	s.prev, s.listed = sh.tail, true
	if sh.tail != nil {
		sh.tail.next = s
	} else {
		sh.head = s
	}
	sh.tail = s
}

// drop forgets s, an idle entry, and keeps it for reuse if there is room.
func (sh *sourceShard) drop(s *Source) {
	sh.busy(s)
	delete(sh.m, s.key)
	if sh.nfree < maxFree {
		*s = Source{next: sh.free}
		sh.free, sh.nfree = s, sh.nfree+1
	}
}
