package streamstate

import (
	"testing"

	"github.com/caddyserver/caddy/v2"
)

type fakeRelay struct {
	entries    int
	destructed int
}

func (f *fakeRelay) Destruct() error { f.destructed++; return nil }
func (f *fakeRelay) Entries() int    { return f.entries }

// A transport's state (a UDP relay) lives in the stream's state: shared
// by key while any user holds it, destructed by the last Detach, counted
// by UDPEntries, and destructed with the stream if a user forgot it.
func TestAttachSharesByKeyUntilLastDetach(t *testing.T) {
	st := New(1)
	made := 0
	mk := func() caddy.Destructor { made++; return &fakeRelay{entries: 3} }
	a := st.Attach("udp/127.0.0.1:53", mk).(*fakeRelay)
	if b := st.Attach("udp/127.0.0.1:53", mk); b != a || made != 1 {
		t.Fatalf("second Attach of the same key made a new value (%d made)", made)
	}
	other := st.Attach("udp/[::1]:53", mk).(*fakeRelay)
	if st.UDPEntries() != 6 {
		t.Fatalf("UDPEntries = %d, want 6 over two addresses", st.UDPEntries())
	}
	st.Detach("udp/127.0.0.1:53")
	if a.destructed != 0 {
		t.Fatal("destructed while a user still holds it")
	}
	st.Detach("udp/127.0.0.1:53")
	st.Detach("udp/127.0.0.1:53") // one too many: no effect
	if a.destructed != 1 || st.UDPEntries() != 3 {
		t.Fatalf("after the last Detach: destructed %d times, UDPEntries %d", a.destructed, st.UDPEntries())
	}
	st.SetGracePeriod(0)
	_ = st.Destruct()
	if other.destructed != 1 {
		t.Fatalf("value left attached destructed %d times with the stream, want 1", other.destructed)
	}
}

// Readers find a stream's state by id while a user holds it, and its TLS
// handshake counters in it.
func TestLookupFindsHeldState(t *testing.T) {
	const id = 919191
	if Lookup(id) != nil {
		t.Fatal("Lookup of a stream nobody holds is not nil")
	}
	st := Acquire(id)
	st.SetGracePeriod(0)
	st.Handshakes().Attach()
	st.Handshakes().Succeeded.Add(2)
	if got := Lookup(id); got != st || !got.Handshakes().Attached() || got.Handshakes().Succeeded.Load() != 2 {
		t.Fatal("Lookup does not return the held state with its handshake counters")
	}
	st.Handshakes().Detach()
	Release(id)
	if Lookup(id) != nil {
		t.Fatal("Lookup finds a released state")
	}
}
