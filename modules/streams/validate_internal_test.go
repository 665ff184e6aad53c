package streams

import (
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// A config load checks the streams once: Provision does, and Caddy's
// call of Validate after it does not check again.
func TestValidateRunsOncePerLoad(t *testing.T) {
	runs := 0
	onValidate = func() { runs++ }
	defer func() { onValidate = func() {} }()
	c := testenv.New(t)
	port := testenv.FreePort(t)
	err := c.Load(map[string]any{"streams": map[string]any{"hosts": []any{map[string]any{
		"id": 1, "listen_address": "127.0.0.1", "listen_port": port,
		"upstream_host": "127.0.0.1", "upstream_port": 1,
	}}}})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 1 {
		t.Fatalf("the checks ran %d times for one load, want 1", runs)
	}
}
