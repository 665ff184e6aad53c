package streams

import (
	"sync"
	"sync/atomic"

	"github.com/aegis-proxy/caddy-aegis/spec"
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

// withRunning runs f on the running app with writes serialized.
func withRunning(f func(a *App) error) error {
	writeMu.Lock()
	defer writeMu.Unlock()
	a := current.Load()
	if a == nil || a.stopped {
		return spec.ErrNotRunning
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return f(a)
}
