package streams

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// writeMu serializes the writes of the API with each other and with a
// config load handing over to a new app, so a write is never applied to an
// app that is on its way out after the new one has read the storage.
var writeMu sync.Mutex

// current is the running streams app.
var current atomic.Pointer[App]

// setCurrent makes a the app that management calls go to, after it has
// caught up with writes stored since it read the storage.
func setCurrent(a *App) {
	writeMu.Lock()
	defer writeMu.Unlock()
	a.syncStored()
	a.prev = current.Swap(a)
}

// handOver takes a, which is stopping, out of management. If a was the
// running app, the app it replaced takes over again when it still runs:
// Caddy stops a new config whose start failed and keeps the old one. It
// returns that app. The caller holds writeMu.
func handOver(a *App) (back *App) {
	a.stopped = true
	switch cur := current.Load(); {
	case cur == a:
		if a.prev != nil && !a.prev.stopped {
			back = a.prev
		}
		current.Store(back)
	case cur != nil && cur.prev == a:
		cur.prev = nil // a was replaced for good
	}
	a.prev = nil
	return back
}

// Running returns the running streams app, or nil.
func Running() *App { return current.Load() }

// staleFor is how long a write that storage refuses as stale (another
// node wrote first) is tried again, each time after applying what it
// missed. While another node writes without pause, a try wins only when
// it takes the database's write lock between two of the other node's
// writes, so it may take many.
const staleFor = 5 * time.Second

// withRunning runs f, a write, on the running app with writes serialized.
// On a cluster, a write the store refuses because another node wrote
// first (storage.ErrStale) applies the changes it missed and runs f again,
// so that its checks (If-Match, ports) see every node's writes; f must
// start from its arguments each time. After a write, the node's snapshot
// is brought up to date.
func withRunning(f func(a *App) error) error {
	writeMu.Lock()
	defer writeMu.Unlock()
	a := current.Load()
	if a == nil || a.stopped {
		return spec.ErrNotRunning
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	start := time.Now()
	for {
		err := f(a)
		if errors.Is(err, storage.ErrStale) && time.Since(start) < staleFor && a.store != nil && a.store.cluster != nil {
			if cerr := a.catchUpFor(a.ctx); cerr != nil {
				return cerr
			}
			continue
		}
		if err == nil && a.store != nil && a.store.cluster != nil {
			a.store.cluster.saveSnapshot(a)
		}
		return err
	}
}
