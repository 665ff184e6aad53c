package streamstate

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"
)

func testPicker(t *testing.T, method string, peers ...Peer) *Picker {
	t.Helper()
	s := New(0)
	t.Cleanup(func() { _ = s.Destruct() })
	for i := range peers {
		peers[i].State = s.Upstream(peers[i].Addr)
	}
	p, err := NewPicker(method, peers, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPickerRoundRobinWeights(t *testing.T) {
	p := testPicker(t, "", Peer{Addr: "a:1", Weight: 1}, Peer{Addr: "b:1", Weight: 2}, Peer{Addr: "c:1", Weight: 3})
	// Every cycle of 6 gives each peer its weight, smoothly (nginx's
	// order for weights 1, 2, 3: c b a c b c).
	for cycle := range 5 {
		var seq []int
		for range 6 {
			seq = append(seq, p.Pick(netip.Addr{}, 0))
		}
		if !slices.Equal(seq, []int{2, 1, 0, 2, 1, 2}) {
			t.Fatalf("cycle %d: order %v, want [2 1 0 2 1 2]", cycle, seq)
		}
	}
	// One down: its share goes to the others, by weight.
	p.Failed(2, errors.New("refused"))
	var n [3]int
	for range 300 {
		n[p.Pick(netip.Addr{}, 0)]++
	}
	if n[2] != 0 || n[0] < 70 || n[1] < 170 {
		t.Errorf("with c down: counts %v, want about [100 200 0]", n)
	}
}

// With every primary down, the backups take turns: a tier with no peer
// to give takes no turn from the round robin, which would otherwise give
// every second turn to the same backup.
func TestPickerRoundRobinBackupsTakeTurns(t *testing.T) {
	for _, down := range [][]int{{0}, {0, 1}} {
		p := testPicker(t, RoundRobin, Peer{Addr: "a:1"}, Peer{Addr: "b:1"},
			Peer{Addr: "backup1:1", Backup: true}, Peer{Addr: "backup2:1", Backup: true})
		if len(down) == 1 {
			// One primary left: its tier takes every connection.
			p.Failed(0, nil)
			for range 10 {
				if i := p.Pick(netip.Addr{}, 0); i != 1 {
					t.Fatalf("with a down: picked %d, want b (1)", i)
				}
			}
			continue
		}
		p.Failed(0, nil)
		p.Failed(1, nil)
		var n [4]int
		for range 100 {
			n[p.Pick(netip.Addr{}, 0)]++
		}
		if n[2] != 50 || n[3] != 50 {
			t.Errorf("both primaries down: counts %v, want the backups 50 each", n)
		}
	}
}

func TestPickerTiersAndTried(t *testing.T) {
	p := testPicker(t, First, Peer{Addr: "a:1"}, Peer{Addr: "b:1"}, Peer{Addr: "backup:1", Backup: true})
	var tried Tried
	want := []int{0, 1, 2, -1}
	for _, w := range want {
		i := p.Pick(netip.Addr{}, tried)
		if i != w {
			t.Fatalf("Pick after %b = %d, want %d", tried, i, w)
		}
		if i >= 0 {
			tried.Add(i)
		}
	}
	// The backup only once the others are down; a down primary is still
	// tried before a down backup when none is up.
	p.Failed(0, nil)
	if i := p.Pick(netip.Addr{}, 0); i != 1 {
		t.Errorf("a down: Pick = %d, want 1", i)
	}
	p.Failed(1, nil)
	if i := p.Pick(netip.Addr{}, 0); i != 2 {
		t.Errorf("a and b down: Pick = %d, want the backup", i)
	}
	p.Failed(2, nil)
	if i := p.Pick(netip.Addr{}, 0); i != 0 {
		t.Errorf("all down: Pick = %d, want 0 (tried anyway)", i)
	}
	p.Peer(0).State.Reached()
	if i := p.Pick(netip.Addr{}, 0); i != 0 {
		t.Errorf("a back: Pick = %d, want 0", i)
	}
}

func TestPickerSourceHash(t *testing.T) {
	p := testPicker(t, SourceHash, Peer{Addr: "a:1"}, Peer{Addr: "b:1"}, Peer{Addr: "c:1"})
	seen := map[int]bool{}
	for k := range 64 {
		c := netip.AddrFrom4([4]byte{10, 0, byte(k), 1})
		first := p.Pick(c, 0)
		seen[first] = true
		for range 5 {
			if i := p.Pick(c, 0); i != first {
				t.Fatalf("client %s: Pick = %d, then %d", c, first, i)
			}
		}
		// Another peer down: the client stays.
		other := (first + 1) % 3
		p.Failed(other, nil)
		if i := p.Pick(c, 0); i != first {
			t.Errorf("client %s: moved from %d to %d when %d went down", c, first, i, other)
		}
		p.Peer(other).State.Reached()
	}
	if len(seen) != 3 {
		t.Errorf("64 clients went to %d peers, want all 3", len(seen))
	}
}

func TestPickerLeastConnections(t *testing.T) {
	p := testPicker(t, LeastConnections, Peer{Addr: "a:1"}, Peer{Addr: "b:1"}, Peer{Addr: "c:1"})
	p.Peer(0).State.Active.Store(5)
	p.Peer(2).State.Active.Store(2)
	if i := p.Pick(netip.Addr{}, 0); i != 1 {
		t.Errorf("Pick = %d, want 1 (no connections)", i)
	}
	p.Peer(1).State.Active.Store(9)
	if i := p.Pick(netip.Addr{}, 0); i != 2 {
		t.Errorf("Pick = %d, want 2", i)
	}
}

func TestPickerNoAllocs(t *testing.T) {
	for _, m := range []string{RoundRobin, LeastConnections, SourceHash, Random, First} {
		p := testPicker(t, m, Peer{Addr: "a:1"}, Peer{Addr: "b:1", Weight: 3}, Peer{Addr: "c:1", Backup: true})
		p.Failed(0, nil)
		c := netip.MustParseAddr("192.0.2.7")
		if n := testing.AllocsPerRun(100, func() { p.Pick(c, 0) }); n != 0 {
			t.Errorf("%s: Pick allocates %v times", m, n)
		}
	}
}

func TestNewPickerRefuses(t *testing.T) {
	s := New(0)
	defer s.Destruct()
	if _, err := NewPicker("fastest", []Peer{{Addr: "a:1", State: s.Upstream("a:1")}}, 0); err == nil {
		t.Error("an unknown method was taken")
	}
	if _, err := NewPicker("", nil, 0); err == nil {
		t.Error("no peers was taken")
	}
}

func TestKeepUpstreams(t *testing.T) {
	s := New(0)
	defer s.Destruct()
	a, b, c := s.Upstream("a:1"), s.Upstream("b:1"), s.Upstream("c:1")
	c.Active.Store(1) // still has a connection
	s.KeepUpstreams([]string{"a:1"})
	if s.FindUpstream("a:1") != a || s.FindUpstream("b:1") != nil || s.FindUpstream("c:1") != c {
		t.Errorf("after KeepUpstreams(a): a %p b %p c %p", s.FindUpstream("a:1"), s.FindUpstream("b:1"), s.FindUpstream("c:1"))
	}
	_ = b
}
