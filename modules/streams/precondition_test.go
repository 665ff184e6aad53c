package streams_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// An API stream's version changes with every write, even one to the same
// settings (a config stream's is a hash of its settings); a precondition sees the current version and runs under the lock of the
// write it vets, so no other write can come between the check and the
// change; a precondition that fails leaves the stream as it was.
func TestPreconditions(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	cfgPort, p1 := freePort(t), freePort(t)
	startCaddy(t, hosts(host(1, cfgPort, up.Port, nil)))
	ctx := context.Background()
	app := streams.Running()
	version := func(id int64) string {
		t.Helper()
		hs, err := app.HostStatus(id)
		if err != nil {
			t.Fatal(err)
		}
		if hs.Version == "" {
			t.Fatalf("stream %d has no version", id)
		}
		return hs.Version
	}
	if v := version(1); len(v) != 24 {
		t.Fatalf("the config stream's version %q, want 24 hex digits", v)
	}

	created, err := streams.CreateHost(ctx, apiStream(2, p1, up.Port))
	if err != nil {
		t.Fatal(err)
	}
	id := created.ID
	v0 := version(id)
	if created.Version != v0 {
		t.Fatalf("CreateHost answered version %s, HostStatus %s", created.Version, v0)
	}
	// The same settings again: a write all the same, and a new version.
	hs, err := streams.UpdateHost(ctx, id, apiStream(id, p1, up.Port))
	if err != nil || hs.Version == v0 {
		t.Fatalf("an update to the same settings: version %s (was %s), %v", hs.Version, v0, err)
	}
	v1 := version(id)
	if hs.Version != v1 {
		t.Fatalf("UpdateHost answered version %s, HostStatus %s", hs.Version, v1)
	}

	// A failing precondition: its error, and nothing changes.
	stale := errors.New("stale")
	refuse := func(string) error { return stale }
	s := apiStream(id, p1, up.Port)
	s.Name = "lost"
	if _, err := streams.UpdateHost(ctx, id, s, refuse); !errors.Is(err, stale) {
		t.Fatalf("UpdateHost with a failing precondition: %v, want its error", err)
	}
	if err := streams.DeleteHost(ctx, id, refuse); !errors.Is(err, stale) {
		t.Fatalf("DeleteHost with a failing precondition: %v, want its error", err)
	}
	if hs, err := app.HostStatus(id); err != nil || hs.Name != apiStream(id, 0, 0).Name || hs.Version != v1 {
		t.Fatalf("after the refused writes: %+v, %v", hs, err)
	}
	if got := roundTrip(t, dial(t, p1), "kept"); got != "kept" {
		t.Fatalf("through the stream after the refused writes: %q", got)
	}

	// A write that starts while a precondition runs waits for the write
	// the precondition vets.
	other := make(chan error, 1)
	s.Name = "first"
	hs, err = streams.UpdateHost(ctx, id, s, func(v string) error {
		if v != v1 {
			t.Errorf("the precondition saw version %s, want %s", v, v1)
		}
		go func() {
			s2 := apiStream(id, p1, up.Port)
			s2.Name = "second"
			_, err := streams.UpdateHost(ctx, id, s2)
			other <- err
		}()
		select {
		case err := <-other:
			t.Errorf("another write went through while a precondition ran (%v)", err)
		case <-time.After(200 * time.Millisecond):
		}
		return nil
	})
	if err != nil || hs.Name != "first" || hs.Version == v1 {
		t.Fatalf("the update whose precondition passed: %+v, %v", hs, err)
	}
	select {
	case err := <-other:
		if err != nil {
			t.Fatalf("the write that waited: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the write that waited did not end")
	}
	if got, err := app.HostStatus(id); err != nil || got.Name != "second" || got.Version == hs.Version || got.Version == v1 {
		t.Fatalf("after both writes: %+v, %v", got, err)
	}

	// A passing precondition lets the delete through.
	if err := streams.DeleteHost(ctx, id, func(string) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if !refused(p1) {
		t.Fatalf("port %d still listens after the delete", p1)
	}
}
