package streams

import (
	"crypto/tls"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Which app the API manages as configs start, fail and stop.
func TestHandOver(t *testing.T) {
	defer current.Store(nil)
	old := &App{}
	current.Store(old)

	// A new config started, then Caddy stopped it (another app failed):
	// the old app, still running, is managed again.
	failed := &App{}
	failed.prev = current.Swap(failed)
	if back := handOver(failed); back != old || current.Load() != old {
		t.Fatalf("after a failed reload: hand-back %p, current %p, want the old app %p", back, current.Load(), old)
	}

	// A successful reload: the new app runs, then the old one stops.
	next := &App{}
	next.prev = current.Swap(next)
	if back := handOver(old); back != nil || current.Load() != next || next.prev != nil {
		t.Fatalf("after a reload: hand-back %p, current %p, prev %p", back, current.Load(), next.prev)
	}

	// Caddy stops: nothing is managed, and a stopped app never comes back.
	if back := handOver(next); back != nil || current.Load() != nil {
		t.Fatalf("after stop: hand-back %p, current %p", back, current.Load())
	}
	later := &App{prev: old}
	current.Store(later)
	if back := handOver(later); back != nil || current.Load() != nil {
		t.Fatalf("handed back to a stopped app: %p", back)
	}
	if err := withRunning(func(*App) error { return nil }); err != spec.ErrNotRunning {
		t.Fatalf("withRunning with no running app: %v", err)
	}
}

// A certificate change that storage did not commit is taken back from the
// registry too.
func TestSnapshotCertUndo(t *testing.T) {
	const id = 1 << 50
	a, b := &tls.Certificate{}, &tls.Certificate{}
	app := &App{certsLive: true}
	app.setCert(id, l4aegistls.NewStaticCert(a))
	defer l4aegistls.Unregister(id)
	undo := app.snapshotCert(id)
	app.setCert(id, l4aegistls.NewStaticCert(b))
	undo()
	if got := l4aegistls.Lookup(id).(*l4aegistls.StaticCert).Load(); got != a {
		t.Fatal("undo did not bring the old certificate back")
	}
	undo = app.snapshotCert(id + 1)
	app.setCert(id+1, l4aegistls.NewStaticCert(b))
	undo()
	if l4aegistls.Lookup(id+1) != nil || app.certs[id+1] != nil {
		t.Fatal("undo of a first publish left it registered")
	}
}
