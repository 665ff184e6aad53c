package streams_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// Reading the certificates of an app while a reload cleans it up is no
// data race (run with -race).
func TestCertificatesDuringCleanup(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	old := streams.Running()
	ctx := context.Background()
	// Each reader goes on until it sees the storage gone: it reads the
	// app's storage after Cleanup let go of it. Certificate asks for an
	// id that does not exist, so that nothing else orders its reads after
	// Cleanup's write.
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			if _, err := old.Certificate(ctx, 999); errors.Is(err, streams.ErrNoStorage) {
				return
			}
		}
	})
	wg.Go(func() {
		for {
			if _, err := old.Certificates(ctx); errors.Is(err, streams.ErrNoStorage) {
				return
			}
		}
	})
	// The reload cleans the old app up: its storage goes.
	if err := inst.load(hosts(host(1, freePort(t), up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}
