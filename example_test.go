package caddyaegis_test

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/aegis-proxy/caddy-aegis"
)

// TestCaddyfileExampleAdapts adapts Caddyfile.example with the modules the
// binary has, without a warning, and checks the parts that belong to no
// single package: the admin endpoint and the site that serves the API with
// streams_admin. (modules/streams checks its streams app.)
func TestCaddyfileExampleAdapts(t *testing.T) {
	data, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(data, nil)
	if err != nil {
		t.Fatalf("adapting Caddyfile.example: %v", err)
	}
	for _, w := range warnings {
		t.Errorf("Caddyfile.example:%d: adapt warning: %s: %s", w.Line, w.Directive, w.Message)
	}
	var cfg struct {
		Admin struct {
			Listen string `json:"listen"`
		} `json:"admin"`
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "localhost:2019" {
		t.Errorf("admin listen = %q, want localhost:2019", cfg.Admin.Listen)
	}
	for _, app := range []string{"http", "streams"} {
		if _, ok := cfg.Apps[app]; !ok {
			t.Errorf("Caddyfile.example has no %s app", app)
		}
	}
	if !strings.Contains(string(cfg.Apps["http"]), `"handler":"streams_admin"`) {
		t.Errorf("Caddyfile.example's site does not serve the API with streams_admin: %s", cfg.Apps["http"])
	}
}
