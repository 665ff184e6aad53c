package testenv

import (
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// yieldBound is logpace's bound on a yield (its yieldWait): only a
// relay's Served ends one sooner.
const yieldBound = time.Millisecond

// YieldsReleased counts, out of tries, the log pacers released early by a
// relay they yielded to: before each try, send gives a watched relay
// something to read; the pacer's Pause finds it ready and yields; after,
// take waits for what the relay passed on. A yield that ends before
// logpace's bound was ended by the relay's Served. Run it with one P, so
// that the relay cannot read before the pacer asks.
func YieldsReleased(t testing.TB, tries int, send, take func() error) int {
	t.Helper()
	released := 0
	for range tries {
		if err := send(); err != nil {
			t.Fatal(err)
		}
		var p logpace.Pacer
		start := time.Now()
		p.Pause()
		if took := time.Since(start); p.Yielded() == 1 && took < yieldBound {
			released++
		}
		if err := take(); err != nil {
			t.Fatalf("the relay did not pass on what it read: %v", err)
		}
	}
	return released
}
