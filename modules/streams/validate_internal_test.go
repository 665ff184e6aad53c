package streams

import (
	"crypto/tls"
	"fmt"
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

// The names a config's streams want Caddy to manage go to the tls app
// when the config has started, at once: nothing polls for it.
func TestManageWhenStarted(t *testing.T) {
	c := testenv.New(t)
	port := testenv.FreePort(t)
	cfg := map[string]any{
		"streams": map[string]any{
			"storage": map[string]any{"disabled": true},
			"hosts": []any{map[string]any{
				"id": 1, "listen_address": "127.0.0.1", "listen_port": port,
				"upstream_host": "127.0.0.1", "upstream_port": 1,
				"ssl_enabled": true, "ssl_domain": "started.test",
			}},
		},
		"tls": map[string]any{"automation": map[string]any{"policies": []any{map[string]any{
			"subjects": []string{"started.test"},
			"issuers":  []any{map[string]any{"module": "internal"}},
		}}}},
		"pki": map[string]any{"certificate_authorities": map[string]any{"local": map[string]any{"install_trust": false}}},
	}
	// Each reload: a new app, whose names must be with the tls app when
	// the load returns.
	for i := range 20 {
		if err := c.Load(cfg); err != nil {
			t.Fatal(err)
		}
		a := Running()
		a.namesMu.Lock()
		running, waiting := a.running, len(a.toManage)
		a.namesMu.Unlock()
		if !running || waiting != 0 {
			t.Fatalf("load %d: when the config has started: running %v, %d names waiting", i+1, running, waiting)
		}
	}
	// Caddy obtains the certificate (in the test's directory) before the
	// test ends.
	testenv.Eventually(t, "a handshake with the certificate Caddy obtained", func() bool {
		c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{ServerName: "started.test", InsecureSkipVerify: true})
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}
