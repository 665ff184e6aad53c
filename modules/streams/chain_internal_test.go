package streams

import (
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// Building a stream's handler chain (every reload, every API edit) costs
// the handlers and little else: no metrics registry with Go and process
// collectors that nothing serves, as a caddy.NewContext per chain made.
func TestBuildChainAllocations(t *testing.T) {
	c := testenv.New(t)
	port := testenv.FreePort(t)
	err := c.Load(map[string]any{"streams": map[string]any{
		"storage": map[string]any{"disabled": true},
		"hosts": []any{map[string]any{
			"id": 1, "listen_address": "127.0.0.1", "listen_port": port,
			"upstream_host": "127.0.0.1", "upstream_port": 1,
		}}}})
	if err != nil {
		t.Fatal(err)
	}
	a := Running()
	s := *a.Hosts[0]
	s.ID = 2 // a stream of its own: its state comes and goes with the chain
	allocs := testing.AllocsPerRun(20, func() {
		_, release, err := a.buildChain(&s)
		if err != nil {
			t.Fatal(err)
		}
		release()
	})
	t.Logf("%.0f allocations per chain", allocs)
	if allocs > 150 {
		t.Fatalf("%.0f allocations to build and release a chain, want at most 150", allocs)
	}
}
